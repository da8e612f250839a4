/* Exception entry stubs and the setjmp/longjmp pair used by try_run. */
	.text

.macro ISR vec, has_err
isr_\vec:
	.if \has_err == 0
	pushq $0
	.endif
	pushq $\vec
	jmp isr_common
.endm

.irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
	ISR \v, 0
.endr
.irp v, 8,10,11,12,13,14,17,21,29,30
	ISR \v, 1
.endr

isr_common:
	pushq %rax; pushq %rbx; pushq %rcx; pushq %rdx; pushq %rsi; pushq %rdi; pushq %rbp
	pushq %r8; pushq %r9; pushq %r10; pushq %r11; pushq %r12; pushq %r13; pushq %r14; pushq %r15
	movq %rsp, %rdi
	movq %rsp, %rbx
	andq $-16, %rsp
	cld
	call exception_handler
	movq %rbx, %rsp
	popq %r15; popq %r14; popq %r13; popq %r12; popq %r11; popq %r10; popq %r9; popq %r8
	popq %rbp; popq %rdi; popq %rsi; popq %rdx; popq %rcx; popq %rbx; popq %rax
	addq $16, %rsp
	iretq

	.section .rodata
	.globl isr_table
	.balign 8
isr_table:
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad isr_\v
.endr

	.text
/* int guest_setjmp(struct jmpbuf *) : rbx rbp r12-r15 rsp rip */
	.globl guest_setjmp
guest_setjmp:
	movq %rbx, 0(%rdi)
	movq %rbp, 8(%rdi)
	movq %r12, 16(%rdi)
	movq %r13, 24(%rdi)
	movq %r14, 32(%rdi)
	movq %r15, 40(%rdi)
	leaq 8(%rsp), %rax
	movq %rax, 48(%rdi)
	movq (%rsp), %rax
	movq %rax, 56(%rdi)
	xorl %eax, %eax
	ret

/* void guest_longjmp(struct jmpbuf *, int) */
	.globl guest_longjmp
guest_longjmp:
	movl %esi, %eax
	movq 0(%rdi), %rbx
	movq 8(%rdi), %rbp
	movq 16(%rdi), %r12
	movq 24(%rdi), %r13
	movq 32(%rdi), %r14
	movq 40(%rdi), %r15
	movq 48(%rdi), %rsp
	jmpq *56(%rdi)
