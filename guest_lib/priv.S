/* The privileged section: the ONLY place in a kernel built from guest_lib that holds an
 * instruction writing CR0, CR3, CR4, XCR0, GDTR, IDTR, LDTR or TR (MOV to CRn, LMSW,
 * CLTS, LGDT, LIDT, LLDT, LTR, XSETBV), plus XGETBV, whose encoding (0F 01 D0) the
 * lock's conservative scanner also flags.
 *
 * VTL0 links the input section .privtext into its own page-aligned pages and names them
 * to VTL1 at VTL_CALL_LOCK_PAGE_TABLES; VTL1 scans every page VTL0 can execute for these
 * encodings, refuses the lock if one lies outside the section, and then makes the
 * section NR for VTL0, so that every instruction here reaches the VMM, which decodes it
 * and asks VTL1 about the register write (docs/writing-guests.md, "Register pinning").
 * VTL1 links .privtext into its ordinary text and is never scanned.
 *
 * One small function per instruction, with only register and register-indirect operand
 * forms, so that the VMM's decoder has a handful of encodings to understand:
 *   void priv_write_cr0(uint64_t v)      mov %rdi, %cr0
 *   void priv_write_cr3(uint64_t v)      mov %rdi, %cr3
 *   void priv_write_cr4(uint64_t v)      mov %rdi, %cr4
 *   void priv_lgdt(const void *ptr)      lgdt (%rdi)      (10-byte limit:base)
 *   void priv_lidt(const void *ptr)      lidt (%rdi)
 *   void priv_lldt(uint16_t sel)         lldt %di
 *   void priv_ltr(uint16_t sel)          ltr %di
 *   void priv_lmsw(uint16_t v)           lmsw %di
 *   void priv_clts(void)                 clts
 *   void priv_xsetbv(uint32_t idx, uint64_t v)   xsetbv (ECX = idx, EDX:EAX = v)
 */
	.section .privtext, "ax"
	.balign 16
	/* 16 bytes of int3 first: an instruction that starts before the section and runs
	 * into it meets 0xCC, never the opcode bytes of a privileged instruction. */
	.fill 16, 1, 0xCC

	.globl priv_write_cr0
priv_write_cr0:
	movq %rdi, %cr0
	ret

	.globl priv_write_cr3
priv_write_cr3:
	movq %rdi, %cr3
	ret

	.globl priv_write_cr4
priv_write_cr4:
	movq %rdi, %cr4
	ret

	.globl priv_lgdt
priv_lgdt:
	lgdt (%rdi)
	ret

	.globl priv_lidt
priv_lidt:
	lidt (%rdi)
	ret

	.globl priv_lldt
priv_lldt:
	lldt %di
	ret

	.globl priv_ltr
priv_ltr:
	ltr %di
	ret

	.globl priv_lmsw
priv_lmsw:
	lmsw %di
	ret

	.globl priv_clts
priv_clts:
	clts
	ret

	.globl priv_xsetbv
priv_xsetbv:
	movl %edi, %ecx
	movl %esi, %eax
	movq %rsi, %rdx
	shrq $32, %rdx
	xsetbv
	ret

