/* VTL1: the secure kernel.  Serves VTL calls; trusts nothing VTL0 passes in. */
#include "vtl1.h"
#include "probe.h"

/* One stack per VP (entry.S picks it by vp_index; this_vp() finds it back). */
uint8_t vtl1_stacks[VTL1_MAX_VPS][VTL1_STACK_SIZE] __attribute__((aligned(VTL1_STACK_SIZE)));
struct vtl_boot_info *bi;
struct spinlock vtl1_lock;
int vtl1_lock_kept;
_Static_assert(__builtin_offsetof(struct vtl_boot_info, vp_index) == VTL_BOOT_INFO_VP_INDEX_OFF,
	       "entry.S reads vp_index at VTL_BOOT_INFO_VP_INDEX_OFF");

/* The shared registers as VTL0 left them (pushed by entry.S, lowest address first). */
struct frame {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
};

/* The running VP for guest_lib's exception handler (from the stack, as this_vp()). */
uint32_t cpu_index(void)
{
	return this_vp();
}

static int boot_info_ok(const struct vtl_boot_info *boot, uint32_t vp)
{
	return boot->magic == VTL_BOOT_MAGIC && boot->abi_version == VTL_ABI_VERSION && boot->vtl == 1 &&
	       boot->vp_index == vp && boot->nr_vps <= VTL1_MAX_VPS && vp < boot->nr_vps;
}

/* The first entry on a VP (entry reason NONE).  The boot VP (at VTL_HC_ENABLE_VTL1) sets
 * up what VTL1 has once for the partition: descriptor tables, page tables, the allowlist.
 * An AP (started by VTL1 itself, VTL_CALL_START_AP) only loads those and sets its own
 * %gs; the partition's state is the boot VP's, which is up before any AP can start. */
void vtl1_main(struct vtl_boot_info *boot)
{
	uint32_t vp = this_vp();
	if (vp == 0)
		arch_init();
	if (!boot_info_ok(boot, vp) || (vp != 0 && !bi)) {
		printf("bad boot info\n");
		guest_exit(2);
	}
	if (vp != 0)
		arch_init_ap();         /* the boot VP's GDT and IDT (no TR: a #DF is fatal here) */
	if (vp == 0) {
		bi = boot;
		paging_init(bi->mem_size);
	} else {
		paging_load();
	}
	/* %gs -> this VP's vtl_control, for the fast path in entry.S */
	wrmsr(MSR_GS_BASE, bi->control_gpa + vp * 4096ULL);
	/* VALUE "vtl1_up" = the VP index, from every VP (the VMM records which VP sent it). */
	report_value("vtl1_up", vp);
	if (vp != 0) {
		printf("secure kernel up on AP %u of %u\n", vp, bi->nr_vps);
		return;
	}
	printf("secure kernel up (vp %u of %u), image %#lx-%#lx\n", vp, bi->nr_vps,
	       bi->image_start, bi->image_end);
	/* BYTES "vtl1_measurement": what the VMM wrote into boot_info (docs/abi.md, Measurement) */
	report_bytes("vtl1_measurement", bi->measurement, sizeof(bi->measurement));
	printf("measurement ");
	print_hex_bytes(bi->measurement, 32);
	printf("\n");
	lifecycle_init();       /* the allowlist and kexec policy from boot_info */
}

/* [gpa, gpa+len) entirely in VTL0's memory?  Overflow-safe. */
int in_vtl0(uint64_t gpa, uint64_t len)
{
	if (len > bi->mem_size || gpa > bi->mem_size - len)
		return 0;
	return gpa + len <= bi->vtl1_base || gpa >= bi->vtl1_base + bi->vtl1_size;
}

static uint64_t vp_register(uint64_t reg)
{
	uint64_t v = 0;
	if (hypercall(VTL_HC_GET_VP_REGISTER, this_vp(), reg, 0, &v) != VTL_OK)
		printf("GET_VP_REGISTER %lu failed\n", reg);
	return v;
}

/* VTL_CALL_REG_PROBE: the result is built in VTL1 memory and written to VTL0 in one
 * checked copy (vtl0_write); only then are the shared registers changed. */
static int reg_probe(struct frame *f, struct vtl_control *ctl)
{
	static struct reg_probe_result r;
	uint64_t got[16] = { f->rax, f->rbx, f->rcx, f->rdx, f->rsi, f->rdi, 0, f->rbp,
			     f->r8, f->r9, f->r10, f->r11, f->r12, f->r13, f->r14, f->r15 };
	uint64_t rsp;
	asm volatile("mov %%rsp, %0" : "=r"(rsp));
	got[6] = rsp;
	memset(&r, 0, sizeof(r));
	memcpy(r.received, got, sizeof(got));
	r.entry_reason = ctl->entry_reason;
	r.ctl_rax = ctl->vtl0_rax;
	r.ctl_rcx = ctl->vtl0_rcx;
	for (int i = 1; i < 16; i++)
		if (i != 2 && i != 6 && got[i] != PROBE_PAT0(i))
			r.mismatches++;
	r.vtl1_rsp = rsp;
	r.vtl1_rflags = read_rflags();
	r.vtl1_cr3 = read_cr3();
	asm volatile("lea 0(%%rip), %0" : "=r"(r.vtl1_rip));
	r.vtl0_rsp = vp_register(VTL_REG_RSP);
	r.vtl0_rflags = vp_register(VTL_REG_RFLAGS);
	r.vtl0_cr3 = vp_register(VTL_REG_CR3);
	r.vtl0_rip = vp_register(VTL_REG_RIP);
	uint64_t st = vtl0_write(f->rcx, &r, sizeof(r));
	if (st != VTL_OK) {
		ctl->vtl0_rax = st;
		return 0;
	}
	/* Hand back a second pattern in every shared register, RAX/RCX included. */
	uint64_t *slot[16] = { &f->rax, &f->rbx, &f->rcx, &f->rdx, &f->rsi, &f->rdi, 0, &f->rbp,
			       &f->r8, &f->r9, &f->r10, &f->r11, &f->r12, &f->r13, &f->r14, &f->r15 };
	for (int i = 0; i < 16; i++)
		if (slot[i])
			*slot[i] = PROBE_PAT1(i);
	return 1;
}

static int dispatch_locked(struct frame *f, struct vtl_control *ctl);

int vtl1_dispatch(struct frame *f)
{
	uint32_t vp = this_vp();
	struct vtl_control *ctl = (struct vtl_control *)(bi->control_gpa + vp * 4096ULL);
	if (ctl->entry_reason == VTL_ENTRY_NONE) {
		/* An AP started again after a kexec that kept VTL1 (persist): its VTL1 is up
		 * already (its pins were reset with the kexec); its VTL0 may start. */
		report_value("vtl1_up", vp);
		return 0;
	}
	if (ctl->entry_reason == VTL_ENTRY_CALL && ctl->vtl0_rax == VTL_CALL_ECHO) {
		ctl->vtl0_rcx += 1;             /* touches nothing shared: no lock */
		ctl->vtl0_rax = VTL_OK;
		return 0;
	}
	if (vtl1_lock_kept && vp == 0)
		vtl1_lock_kept = 0;     /* the next kernel's first entry: the lock is held already */
	else
		spin_lock(&vtl1_lock);
	int fast = dispatch_locked(f, ctl);
	if (!vtl1_lock_kept)
		spin_unlock(&vtl1_lock);
	return fast;
}

/* Everything else, under vtl1_lock: VTL1 on another VP may be in here too. */
static int dispatch_locked(struct frame *f, struct vtl_control *ctl)
{
	if (ctl->entry_reason == VTL_ENTRY_NONE) {
		/* An AP the old kernel had in here (waiting for the lock a kexec kept), started
		 * again by the next kernel: its start, as at the top of vtl1_dispatch. */
		report_value("vtl1_up", this_vp());
		return 0;
	}
	if (ctl->entry_reason == VTL_ENTRY_INTERCEPT) {
		policy_intercept(&ctl->intercept);
		return 0;
	}
	if (ctl->entry_reason != VTL_ENTRY_CALL) {
		printf("unexpected entry reason %u\n", ctl->entry_reason);
		return 0;
	}
	switch (ctl->vtl0_rax) {
	case VTL_CALL_NOP:
		ctl->vtl0_rax = VTL_OK;
		return 0;
	case VTL_CALL_REG_PROBE:
		return reg_probe(f, ctl);
	case VTL_CALL_GET_MEASUREMENT:
		ctl->vtl0_rax = vtl0_write(f->rdi, bi->measurement, 32);
		return 0;
	case VTL_CALL_PROTECT:
		ctl->vtl0_rax = policy_protect(f->rcx, f->rdi, f->rdx, f->rsi);
		return 0;
	case VTL_CALL_PROTECT_PAGES:
		ctl->vtl0_rax = policy_protect_pages(f->rcx, f->rdi, f->rdx, f->rsi);
		return 0;
	case VTL_CALL_LOCK_PAGE_TABLES:
	{
		uint64_t pinning = 0;   /* RCX = privileged section GPA, RDI = its pages */
		ctl->vtl0_rax = policy_lock_page_tables(f->rcx, f->rdi, &pinning);
		ctl->vtl0_rcx = pinning;   /* 1: register writes are judged by VTL1 from now on */
		return 0;
	}
	case VTL_CALL_END_OF_BOOT:
		ctl->vtl0_rax = policy_end_of_boot();
		return 0;
	case VTL_CALL_GET_PROTECTION:
		ctl->vtl0_rcx = policy_get(f->rcx);
		ctl->vtl0_rax = VTL_OK;
		return 0;
	case VTL_CALL_SHA256:           /* RCX = data, RDI = length, RDX = 32-byte output */
		ctl->vtl0_rax = sha256_call(f->rcx, f->rdi, f->rdx);
		return 0;
	case VTL_CALL_KEXEC_VALIDATE:   /* RCX = struct vtl_kexec_request; RCX = 1 if valid */
		ctl->vtl0_rax = kexec_validate(f->rcx);
		ctl->vtl0_rcx = ctl->vtl0_rax == VTL_OK;
		return 0;
	case VTL_CALL_KEXEC_JUMP:       /* VTL0 sees this return only if refused */
		ctl->vtl0_rax = kexec_jump();
		return 0;
	case VTL_CALL_KEXEC_UNLOAD:
		ctl->vtl0_rax = kexec_unload();
		return 0;
	case VTL_CALL_MODULE_VALIDATE:  /* RCX = GPA, RDI = pages, RDX = source or 0 */
		ctl->vtl0_rax = module_validate(f->rcx, f->rdi, f->rdx);
		return 0;
	case VTL_CALL_MODULE_LOAD:
		ctl->vtl0_rax = module_load(f->rcx, f->rdi, f->rdx);
		return 0;
	case VTL_CALL_MODULE_UNLOAD:
		ctl->vtl0_rax = module_unload(f->rcx, f->rdi);
		return 0;
	case VTL_CALL_START_AP:         /* RCX = struct vtl_start_vp in VTL0 memory */
		ctl->vtl0_rax = policy_start_ap(f->rcx);
		return 0;
	default:
		ctl->vtl0_rax = VTL_E_INVALID_CODE;
		return 0;
	}
}
