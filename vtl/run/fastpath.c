/* The VTL switch's fast path in C (issue 16; docs/smp.md, "The switch path").
 *
 * One VP's loop of KVM_RUNs for as long as its exits are VTL calls and VTL returns the
 * scheduler would handle the same way every time (vtl/run/scheduler.py `_on_vtl_call`,
 * `_on_vtl_return`, the IN_VTL1_CALL case): it moves the shared registers through the
 * synced registers in kvm_run (KVM_CAP_SYNC_REGS, no ioctl), writes vtl_control as the
 * scheduler does and counts.  Every other exit, and every call or return the scheduler
 * must see (CPL3, a lifecycle call, a return while a restart or lifecycle step is pending),
 * goes back to Python untouched, with `cur` saying whose vCPU it came from.
 *
 * Why C: KVM_RUN through cffi releases the GIL, but the Python handling of each exit holds
 * it, so VPs calling at once serialise on it; called through cffi, this loop holds no GIL
 * from the first KVM_RUN to the exit it hands back.  Python remains the one place that
 * decides: this file implements the same rules, and tests/test_fastpath.py checks that
 * both paths give the same registers and counts.
 *
 * Requests and kicks (vtl/run/runner.py): a kick sets immediate_exit on the VP's vCPUs, so
 * the next KVM_RUN here returns -EINTR and the loop returns; nothing here clears it. */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
#include "vtl_abi.h"

struct vtl_fast {
	int32_t fd[2];                  /* VTL0's and VTL1's vCPU fds */
	struct kvm_run *run[2];         /* their mmapped kvm_run */
	struct vtl_control *ctl;        /* this VP's vtl_control, in VTL1's memory */
	uint32_t cur;                   /* in and out: 0 running VTL0, 1 in VTL1 serving a call */
	uint32_t returns_ok;            /* 0: every VTL return goes to Python */
	int32_t err;                    /* out: errno of a failed KVM_RUN (then the result is -1) */
	uint32_t pad;
	uint64_t calls, returns, fast_returns;   /* out: added by this call */
	uint8_t python_codes[256];      /* call codes the scheduler must see (lifecycle steps) */
};

#define SHARED_LO 48                    /* rax rbx rcx rdx rsi rdi */
#define SHARED_HI 72                    /* rbp r8-r15 (rsp between them is private) */

static inline void move_shared(struct kvm_run *dst, const struct kvm_run *src)
{
	memcpy(&dst->s.regs.regs.rax, &src->s.regs.regs.rax, SHARED_LO);
	memcpy(&dst->s.regs.regs.rbp, &src->s.regs.regs.rbp, SHARED_HI);
	if (dst->s.regs.sregs.cr2 != src->s.regs.sregs.cr2) {
		dst->s.regs.sregs.cr2 = src->s.regs.sregs.cr2;
		dst->kvm_dirty_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
	} else {
		dst->kvm_dirty_regs = KVM_SYNC_X86_REGS;
	}
}

/* 0: an exit for Python is in run[cur]; -1: KVM_RUN failed with err (EINTR: a kick). */
int vtl_fast_run(struct vtl_fast *f)
{
	f->calls = f->returns = f->fast_returns = 0;
	for (;;) {
		uint32_t c = f->cur;
		struct kvm_run *r = f->run[c];
		if (ioctl(f->fd[c], KVM_RUN, 0) < 0) {
			f->err = errno;
			return -1;
		}
		if (r->exit_reason != KVM_EXIT_IO || r->io.direction != KVM_EXIT_IO_OUT)
			return 0;
		uint16_t port = r->io.port;
		if (r->s.regs.sregs.cs.selector & 3)
			return 0;                       /* refused by the scheduler: #GP */
		if (c == 0 && port == VTL_PORT_CALL) {
			uint64_t code = r->s.regs.regs.rax;
			if (code < sizeof(f->python_codes) && f->python_codes[code])
				return 0;
			struct vtl_control *ctl = f->ctl;
			ctl->entry_reason = VTL_ENTRY_CALL;
			ctl->vtl0_rax = code;
			ctl->vtl0_rcx = r->s.regs.regs.rcx;
			move_shared(f->run[1], r);
			f->calls++;
			f->cur = 1;
			continue;
		}
		if (c == 1 && f->returns_ok && (port == VTL_PORT_RETURN || port == VTL_PORT_RETURN_FAST)) {
			struct kvm_run *d = f->run[0];
			move_shared(d, r);
			if (port == VTL_PORT_RETURN) {
				d->s.regs.regs.rax = f->ctl->vtl0_rax;
				d->s.regs.regs.rcx = f->ctl->vtl0_rcx;
			} else {
				f->fast_returns++;
			}
			f->returns++;
			f->cur = 0;
			continue;
		}
		return 0;
	}
}
