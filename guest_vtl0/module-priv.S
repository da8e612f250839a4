/* A module with a privileged instruction (MOV to CR4) outside any privileged section:
 * VTL1's scan refuses it even when its digest is on the allowlist. */
#include "module.h"
	.text
	.globl module_priv_start
module_priv_start:
	movq %cr4, %rax
	movq %rax, %cr4         /* 0F 22 E0 */
	movl $MODULE_RET, %eax
	ret
	.fill MODULE_SIZE - (. - module_priv_start), 1, 0
