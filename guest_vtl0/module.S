/* A loadable module (issue 10): position-independent code, one page, zero-padded, built
 * to guest_vtl0/build/module.bin and embedded in the VTL0 image (modules.S).  VTL1 makes
 * it executable only after MODULE_VALIDATE: sealed, its SHA-256 on the allowlist, no
 * privileged instruction in it.
 *     uint64_t module(uint64_t *marker): *marker = MODULE_MARK; return MODULE_RET; */
#include "module.h"
	.text
	.globl module_start
module_start:
	movabsq $MODULE_MARK, %rax
	movq %rax, (%rdi)
	movl $MODULE_RET, %eax
	ret
	.fill MODULE_SIZE - (. - module_start), 1, 0
