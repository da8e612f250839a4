/* VTL_CALL_REG_PROBE: what VTL1 writes back to VTL0 (a guest-to-guest contract,
 * not VMM ABI).  Register indexes follow struct kvm_regs: rax=0 rbx rcx rdx rsi rdi
 * rsp=6 rbp r8..r15=15. */
#ifndef GUEST_PROBE_H
#define GUEST_PROBE_H

#define RFLAGS_AC (1 << 18)

#ifndef __ASSEMBLER__
#include <stdint.h>
#define PROBE_PAT0(i) (0x5A5A5A5A00000000ULL | (uint64_t)(i))   /* VTL0 -> VTL1 */
#define PROBE_PAT1(i) (0xC3C3C3C300000000ULL | (uint64_t)(i))   /* VTL1 -> VTL0 */

struct reg_probe_result {
	uint64_t received[16];      /* VTL1's registers at entry (its own RSP in slot 6) */
	uint64_t entry_reason;      /* from vtl_control */
	uint64_t ctl_rax, ctl_rcx;  /* from vtl_control */
	uint64_t mismatches;        /* shared registers that did not carry VTL0's pattern */
	uint64_t vtl1_rsp, vtl1_rflags, vtl1_cr3, vtl1_rip;
	uint64_t vtl0_rsp, vtl0_rflags, vtl0_cr3, vtl0_rip;   /* via VTL_HC_GET_VP_REGISTER */
};
#endif
#endif
