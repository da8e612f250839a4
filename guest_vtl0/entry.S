#include "vtl_abi.h"
#include "probe.h"
	.section .text.entry, "ax"
	.globl _start
_start:
	leaq kernel_stack+32768(%rip), %rsp
	call kmain              /* RDI = boot info, from the VMM */
1:	cli
	hlt
	jmp 1b

/* An AP's first instruction (guest_vtl0/smp.c): RSP and RDI (its VP index) as VP0 asked
 * in VTL_HC_START_VP. */
	.globl ap_entry
ap_entry:
	call ap_main
1:	cli
	hlt
	jmp 1b

	.text
/* void reg_probe_call(struct reg_probe_result *res)
 * Loads PROBE_PAT0 into every shared register, sets RFLAGS.AC, makes the VTL call,
 * then records every register VTL0 sees afterwards into probe_after[] and friends.
 * Nothing but RSP can be trusted across the call, so state goes through RIP-relative globals. */
	.globl reg_probe_call
reg_probe_call:
	pushq %rbx; pushq %rbp; pushq %r12; pushq %r13; pushq %r14; pushq %r15
	movq %cr3, %rax
	movq %rax, probe_cr3_before(%rip)
	pushfq
	orq $RFLAGS_AC, (%rsp)
	popfq
	movq %rsp, probe_rsp_before(%rip)
	movq %rdi, %rcx
	movl $VTL_CALL_REG_PROBE, %eax
	movabsq $0x5A5A5A5A00000001, %rbx
	movabsq $0x5A5A5A5A00000003, %rdx
	movabsq $0x5A5A5A5A00000004, %rsi
	movabsq $0x5A5A5A5A00000005, %rdi
	movabsq $0x5A5A5A5A00000007, %rbp
	movabsq $0x5A5A5A5A00000008, %r8
	movabsq $0x5A5A5A5A00000009, %r9
	movabsq $0x5A5A5A5A0000000A, %r10
	movabsq $0x5A5A5A5A0000000B, %r11
	movabsq $0x5A5A5A5A0000000C, %r12
	movabsq $0x5A5A5A5A0000000D, %r13
	movabsq $0x5A5A5A5A0000000E, %r14
	movabsq $0x5A5A5A5A0000000F, %r15
	outb %al, $VTL_PORT_CALL
	movq %rax, probe_after+0(%rip)
	movq %rbx, probe_after+8(%rip)
	movq %rcx, probe_after+16(%rip)
	movq %rdx, probe_after+24(%rip)
	movq %rsi, probe_after+32(%rip)
	movq %rdi, probe_after+40(%rip)
	movq %rsp, probe_after+48(%rip)
	movq %rbp, probe_after+56(%rip)
	movq %r8, probe_after+64(%rip)
	movq %r9, probe_after+72(%rip)
	movq %r10, probe_after+80(%rip)
	movq %r11, probe_after+88(%rip)
	movq %r12, probe_after+96(%rip)
	movq %r13, probe_after+104(%rip)
	movq %r14, probe_after+112(%rip)
	movq %r15, probe_after+120(%rip)
	pushfq
	popq %rax
	movq %rax, probe_rflags_after(%rip)
	movq %cr3, %rax
	movq %rax, probe_cr3_after(%rip)
	pushfq
	andq $~RFLAGS_AC, (%rsp)
	popfq
	popq %r15; popq %r14; popq %r13; popq %r12; popq %rbp; popq %rbx
	ret

/* void null_call_batch(uint64_t n): n VTL_CALL_NOP round trips, nothing else. */
	.globl null_call_batch
null_call_batch:
	pushq %rbx
	movq %rdi, %rbx
	xorl %eax, %eax         /* VTL_CALL_NOP; each return leaves VTL_OK (0) in RAX */
1:	outb %al, $VTL_PORT_CALL
	decq %rbx
	jnz 1b
	popq %rbx
	ret
