#include "vtl_abi.h"
#include "stack.h"
#if VTL_CALL_NOP != VTL_OK || VTL_CALL_NOP != 0
#error "the NOP fast path tests RAX for 0 and returns it unchanged as the status"
#endif
	.section .text.entry, "ax"
	.globl _start
_start:
	/* RDI = this VP's boot info (the VMM's, in VTL1 memory).  Its vp_index picks the VP's
	 * own stack: VTL1 on VP0 and on an AP may run at the same time.  Bounded, though the
	 * VMM wrote it: an index beyond the stacks ends the run before any stack is used. */
	movl VTL_BOOT_INFO_VP_INDEX_OFF(%rdi), %eax
	cmpl $VTL1_MAX_VPS, %eax
	jae 2f
	incl %eax               /* the stack's top: the end of stack vp_index */
	shlq $VTL1_STACK_SHIFT, %rax
	leaq vtl1_stacks(%rip), %rsp
	addq %rax, %rsp
	call vtl1_main          /* RDI = boot info; returns once initialised */
	/* First VTL return: nothing of VTL1 may leak through the shared registers. */
	xorl %eax, %eax; xorl %ebx, %ebx; xorl %ecx, %ecx; xorl %edx, %edx
	xorl %esi, %esi; xorl %edi, %edi; xorl %ebp, %ebp
	xorl %r8d, %r8d; xorl %r9d, %r9d; xorl %r10d, %r10d; xorl %r11d, %r11d
	xorl %r12d, %r12d; xorl %r13d, %r13d; xorl %r14d, %r14d; xorl %r15d, %r15d
	outb %al, $VTL_PORT_RETURN
	jmp vtl1_loop
2:	movl $2, %eax           /* no stack for this VP: exit status 2, as for bad boot info */
	outl %eax, $VTL_PORT_EXIT
	hlt
	jmp 2b

/* Every later entry resumes after the VTL-return OUT it left by, with VTL0's values in
 * all registers but RSP.  Fast path for VTL_CALL_NOP: this host emulates every guest
 * instruction (each costs ~0.7 us), so the null call is answered in four instructions
 * through %gs, which points at this VP's vtl_control (set in vtl1_main), without
 * touching a shared register; the OUT sits at the top so that no jump closes the loop. */
vtl1_fast_return:
	/* RAX holds the status (VTL_CALL_NOP == VTL_OK) and no shared register was touched,
	 * so the fast return (registers as they are) is exact and costs the VMM less. */
	outb %al, $VTL_PORT_RETURN_FAST
vtl1_loop:
	cmpl $VTL_ENTRY_CALL, %gs:VTL_CONTROL_ENTRY_REASON_OFF
	jne vtl1_slow
	/* On a call entry the shared registers are VTL0's: RAX is the call code. */
	testq %rax, %rax        /* VTL_CALL_NOP == 0 */
	jz vtl1_fast_return
vtl1_slow:
	pushq %rax; pushq %rbx; pushq %rcx; pushq %rdx; pushq %rsi; pushq %rdi; pushq %rbp
	pushq %r8; pushq %r9; pushq %r10; pushq %r11; pushq %r12; pushq %r13; pushq %r14; pushq %r15
	movq %rsp, %rdi
	subq $8, %rsp           /* 15 pushes: realign for the call */
	cld
	call vtl1_dispatch      /* 0 = VTL return, 1 = fast VTL return */
	addq $8, %rsp
	testl %eax, %eax        /* the pops below keep the flags */
	popq %r15; popq %r14; popq %r13; popq %r12; popq %r11; popq %r10; popq %r9; popq %r8
	popq %rbp; popq %rdi; popq %rsi; popq %rdx; popq %rcx; popq %rbx; popq %rax
	jnz 1f
	outb %al, $VTL_PORT_RETURN
	jmp vtl1_loop
1:	outb %al, $VTL_PORT_RETURN_FAST
	jmp vtl1_loop
