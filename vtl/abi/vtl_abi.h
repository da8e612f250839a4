/*
 * vtl_abi.h - the one definition of the guest <-> VMM ABI of the VTL prototype.
 *
 * Read by the C guests (guest_vtl0/, guest_vtl1/) with #include and by the
 * Python VMM (vtl/abi.py), which feeds the part between the ABI-CDEF markers to
 * cffi.  Keep that part to what cffi's cdef understands: integer #defines
 * with literal values and structs of fixed-width types with explicit padding.
 *
 * Transport (docs/design.md section 3): port I/O on the ports below, always from CPL0
 * with an 8- or 32-bit OUT whose port is an immediate (`out %al, $port` or
 * `out %eax, $port`).  Register conventions:
 *   VTL call     (VTL0): RAX = call code, RCX = first argument; RDX, RSI, RDI,
 *                        R8-R11 free for more.  All general registers but RSP
 *                        are shared with VTL1; VTL1 gets VTL0's RAX/RCX also in
 *                        vtl_control.  Result: RAX (status), others as the call
 *                        defines.
 *   VTL return   (VTL1): VTL_PORT_RETURN restores VTL0's RAX/RCX from
 *                        vtl_control (VTL1 puts results there);
 *                        VTL_PORT_RETURN_FAST leaves the shared registers as
 *                        VTL1 left them.
 *   hypercall   (either): RAX = code, RDI, RSI, RDX = arguments; result RAX =
 *                        status, RDX = value where the call returns one.
 * Refusals (the VMM never stops on bad guest input):
 *   port access from CPL > 0 ............ #GP(0) at the OUT
 *   VTL return from VTL0 ................. #UD at the OUT
 *   VTL call with no VTL1 ................ RAX = VTL_E_NOT_ENABLED
 *   hypercall of the wrong VTL ........... RAX = VTL_E_ACCESS_DENIED
 *   unknown hypercall code ............... RAX = VTL_E_INVALID_CODE
 *   VTL0 access to VTL1 memory ........... the access does not reach memory
 *   (while VTL1 exists)                    (reads see all-ones), then #GP(0)
 *                                          with RIP at the next instruction
 * While no VTL1 exists (before the enable, after a teardown or reset), VTL0's reads
 * and writes of VTL1's region reach memory (emulated by the VMM, slowly): it reads
 * what is there, zeros after a teardown or reset.  Fetches from it are #GP(0).
 */
#ifndef VTL_ABI_H
#define VTL_ABI_H

#ifndef __ASSEMBLER__
#include <stdint.h>
#endif

/* ABI-CDEF-BEGIN */
#define VTL_ABI_VERSION            1

/* ---- ports ---------------------------------------------------------- */
#define VTL_PORT_CONSOLE           0xE9   /* OUT byte: one console character        */
#define VTL_PORT_CALL              0xF0   /* VTL0 -> VTL1                            */
#define VTL_PORT_RETURN            0xF1   /* VTL1 -> VTL0, restores RAX/RCX          */
#define VTL_PORT_RETURN_FAST       0xF2   /* VTL1 -> VTL0, registers as they are     */
#define VTL_PORT_HYPERCALL         0xF3   /* guest -> VMM                            */
#define VTL_PORT_EXIT              0xF4   /* OUT dword: guest exit status (0 = pass) */

/* ---- hypercall codes (RAX at VTL_PORT_HYPERCALL) --------------------- */
#define VTL_HC_ENABLE_VTL1         0x0001 /* VTL0: load, measure and start VTL1      */
                                       /* 0x0002: retired (was BENCH_REPORT; use VTL_REPORT_STAMPS) */
#define VTL_HC_REPORT              0x0003 /* either VTL: RDI = GPA of a struct vtl_report in
                                             memory the caller may read.  RAX = VTL_OK,
                                             VTL_E_INVALID_ARG (bad kind, name or text not
                                             NUL-terminated, data too long),
                                             VTL_E_OUT_OF_RANGE (report or data not readable
                                             by the caller), VTL_E_NO_RESOURCES (the run's
                                             report budget is spent).  See docs/abi.md. */
#define VTL_HC_RESET               0x0004 /* either VTL: emulated RESET of the partition (docs/design.md
                                             section 7).  Does not return: VTL1 (if any) is
                                             destroyed, every VTL0 protection and register
                                             intercept cleared, VTL1's region zeroed, and VTL0
                                             restarts from its image with boot_count + 1. */
#define VTL_HC_START_VP            0x0005 /* RDI = GPA of a struct vtl_start_vp (in memory the
                                             caller may read): start an offline AP, after the
                                             TLFS's HvCallStartVirtualProcessor.  VTL0 may call
                                             it while VTL1 is not enabled; once it is, only
                                             VTL1 may (VTL0 asks it: VTL_CALL_START_AP), and the
                                             AP's VTL1 initialises first (entry reason NONE,
                                             as at enable), then its VTL0 starts at rip in
                                             long mode on cr3 with RSP = rsp, RDI = arg, the
                                             boot GDT, everything else as at the vCPU's RESET.
                                             RAX = VTL_OK (the AP starts asynchronously),
                                             VTL_E_INVALID_ARG (no such AP, the boot VP, flags,
                                             rip outside VTL0's image, rsp or cr3 outside VTL0
                                             memory or cr3 not page aligned),
                                             VTL_E_OUT_OF_RANGE (request not readable),
                                             VTL_E_ACCESS_DENIED (VTL0 with VTL1 enabled),
                                             VTL_E_BUSY (the AP is already started). */
#define VTL_HC_SEND_IPI            0x0006 /* either VTL: RDI = target VP.  Wakes it from HLT:
                                             with more than one VP, a VTL0 HLT idles its VP
                                             until a wake (or the run's end); a wake for a VP
                                             that is not halted stays pending and ends its
                                             next HLT at once.  No vector is delivered (no
                                             local APIC here).  RAX = VTL_OK,
                                             VTL_E_INVALID_ARG (no such VP). */
#define VTL_HC_SNAPSHOT            0x0007 /* VTL0: save the whole partition to the directory
                                             the run was given (`vtl run --snapshot DIR`,
                                             docs/snapshot.md), once per run.  Saved after
                                             every other VP is paused where no switch or
                                             intercept is half done.  RAX = VTL_OK and RDX = 0
                                             in the run that saved, RDX = 1 in a run restored
                                             from it (as fork returns twice); VTL_E_DISABLED
                                             (no directory), VTL_E_BUSY (taken already, or an
                                             intercept is being judged on another VP: ask
                                             again), VTL_E_NO_RESOURCES (it could not be
                                             written; the run goes on). */
#define VTL_HC_GET_VP_REGISTER     0x0101 /* VTL1: RDI = vp, RSI = VTL_REG_*; RDX = value */
#define VTL_HC_MODIFY_VTL_PROTECTION 0x0102 /* VTL1: RDI = GPA of struct vtl_protect_request
                                           (in VTL1 memory).  RAX = status, RDX = index of
                                           the next entry to process: == count when done;
                                           < count with VTL_OK means "call again with
                                           start_index = RDX" (rep-style partial progress);
                                           with an error, the index of the refused entry
                                           (entries before it were applied). */
#define VTL_HC_SET_INTERCEPT_CONTROL 0x0103 /* VTL1: RDI = GPA of struct vtl_intercept_control
                                           (in VTL1 memory): which register writes of VTL0
                                           VTL1 judges on the calling VP (per VP, as the
                                           TLFS's HvX64RegisterCrInterceptControl), and VTL0's
                                           privileged section (per partition: every VP's
                                           control names the same one or none).
                                           RAX = status (VTL_E_INVALID_ARG, ..._OUT_OF_RANGE) */
#define VTL_HC_VTL0_RESTART        0x0104 /* VTL1: RDI = GPA of struct vtl_restart (in VTL1
                                           memory).  At VTL1's next VTL return from the VTL
                                           call it serves, VTL0 restarts at `entry` in the
                                           boot state (RDI = boot info, RSP = boot stack, the
                                           VMM's identity map and GDT) with its CR0, CR4,
                                           EFER and XCR0 carried over, everything else as
                                           at the vCPU's RESET (docs/lifecycle.md); with
                                           VTL_RESTART_F_TEARDOWN VTL1 ends first: its VM and
                                           vCPUs destroyed, every VTL0 protection and register
                                           intercept cleared, its region zeroed.  RAX =
                                           VTL_OK, VTL_E_INVALID_ARG (entry or image outside
                                           VTL0's image window, unknown flags, scenario not
                                           NUL-terminated; asked for on an AP: the next
                                           kernel starts on the boot VP), VTL_E_OUT_OF_RANGE
                                           (request not in VTL1 memory). */
#define VTL_HC_VTL1_FIRST          0x0100 /* codes >= this are VTL1-only             */

/* registers readable through VTL_HC_GET_VP_REGISTER (VTL0's private state) */
#define VTL_REG_RIP                1
#define VTL_REG_RSP                2
#define VTL_REG_RFLAGS             3
#define VTL_REG_CR0                4
#define VTL_REG_CR3                5
#define VTL_REG_CR4                6
#define VTL_REG_EFER               7
#define VTL_REG_XCR0               8      /* also: register intercepts (vtl_intercept.reg) */
#define VTL_REG_GDTR               9      /* base; the limit in vtl_intercept.*_limit      */
#define VTL_REG_IDTR               10
#define VTL_REG_LDTR               11     /* selector                                       */
#define VTL_REG_TR                 12     /* selector                                       */
#define VTL_REG_CR0_LOW            13     /* LMSW / CLTS: a write of CR0 bits 0-3 only      */
/* What a descriptor-table register loaded, beyond its value above (read only, through
 * VTL_HC_GET_VP_REGISTER: VTL1 pins a table by what it holds, not by its selector).
 * LDTR/TR: the base and limit in the hidden part, as the CPU uses them. */
#define VTL_REG_GDTR_LIMIT         0x20
#define VTL_REG_IDTR_LIMIT         0x21
#define VTL_REG_LDTR_BASE          0x22
#define VTL_REG_LDTR_LIMIT         0x23
#define VTL_REG_TR_BASE            0x24
#define VTL_REG_TR_LIMIT           0x25

/* ---- VTL call codes (RAX at VTL_PORT_CALL; served by the VTL1 kernel) - */
#define VTL_CALL_NOP               0x00   /* returns VTL_OK                           */
#define VTL_CALL_ECHO              0x01   /* RAX = VTL_OK, RCX = RCX + 1              */
#define VTL_CALL_REG_PROBE         0x02   /* register-isolation probe, see guest_vtl1 */
#define VTL_CALL_GET_MEASUREMENT   0x03   /* RDI = GPA of 32 bytes in VTL0: VTL1's measurement */
#define VTL_CALL_PROTECT           0x04   /* RCX = GPA, RDI = pages, RDX = VTL_MEM_* wanted,
                                             RSI = VTL_PROTECT_* flags.  Boot only.         */
#define VTL_CALL_PROTECT_PAGES     0x05   /* RCX = GPA of a uint64 page-GPA list in VTL0,
                                             RDI = count, RDX = VTL_MEM_*, RSI = flags.
                                             All or nothing.  Boot only.                    */
#define VTL_CALL_LOCK_PAGE_TABLES  0x06   /* VTL1 walks VTL0's CR3: tables become R, and
                                             every executable mapping must be of a page VTL0
                                             cannot write.  RCX = GPA of VTL0's privileged
                                             section, RDI = its pages (0: none): no register
                                             write may be executable outside it.  Returns RCX
                                             = 1 if VTL1 now judges register writes (built-in
                                             VTL1: docs/writing-guests.md).  Boot only.
                                             Pins the registers of the VP that calls it: the
                                             first call (on the boot VP) also locks the tables
                                             and names the section; each AP then calls it on
                                             itself with the same section, on the locked root
                                             (docs/smp.md).  Each table and descriptor-table
                                             page is sealed before VTL1 reads it; a refused
                                             lock gives them their attributes back           */
#define VTL_CALL_END_OF_BOOT       0x07   /* ro_after_init becomes R; boot-only calls refused.
                                             VTL_E_POLICY while an AP VTL1 started has not
                                             locked its registers (its own LOCK_PAGE_TABLES) */
#define VTL_CALL_GET_PROTECTION    0x08   /* RCX = GPA: RCX = VTL_MEM_* VTL1 applied there  */
#define VTL_CALL_SHA256            0x09   /* RCX = GPA of data in VTL0, RDI = length (at most
                                             VTL_SHA256_MAX_LEN), RDX = GPA of 32 bytes in VTL0:
                                             VTL1's SHA-256 of the data (for tests)          */
#define VTL_CALL_KEXEC_VALIDATE    0x0A   /* RCX = GPA of struct vtl_kexec_request in VTL0.
                                             VTL1 copies it, write-protects every segment page
                                             (NW|NX), then measures the segments as the VMM
                                             measures an image (docs/abi.md, Measurement) and
                                             checks the allowlist; for the persist policy it
                                             also scans the text for privileged instructions
                                             outside the new privileged section.  Refused:
                                             every page back as it was.  RCX = 1 on success.
                                             The bytes from filesz to the end of a segment's
                                             last page must be zero (unmeasured otherwise).
                                             One image at a time (VTL_E_POLICY while one is
                                             validated: KEXEC_UNLOAD first).  VTL_E_INVALID_ARG:
                                             request unreadable or malformed (segments outside
                                             [VTL0_IMAGE_MIN, VTL1_BASE), entry not in an X
                                             segment; persist: no privileged section, or it is
                                             not inside an X segment).  VTL_E_POLICY: not on the
                                             allowlist / pages VTL1 will not seal (immutable,
                                             page tables, the privileged section, executable,
                                             ro_after_init) / persist: a W+X segment or a
                                             privileged instruction outside the section.  The
                                             DENY policy still validates: it refuses the jump */
#define VTL_CALL_KEXEC_JUMP        0x0B   /* no arguments.  With a validated image and a
                                             policy that allows it: teardown or persist (see
                                             VTL_KEXEC_POLICY_*); VTL0 never sees the return.
                                             Else (no validated image, policy DENY, asked
                                             for on an AP: the boot VP jumps) VTL_E_POLICY,
                                             nothing changed.  A jump keeps VTL1's lock until
                                             the next kernel's first VTL1 entry (smp.md)     */
#define VTL_CALL_KEXEC_UNLOAD      0x0C   /* drop the validated image: its pages get their
                                             attributes from before the validation back.
                                             VTL_E_POLICY if there is none                   */
#define VTL_CALL_MODULE_VALIDATE   0x0D   /* RCX = GPA, RDI = pages (at most
                                             VTL_MODULE_MAX_PAGES) of new code in VTL0.  VTL1
                                             write-protects them (NW|NX), hashes the pages'
                                             bytes against the allowlist and scans them for
                                             privileged instructions.  After the lock only.
                                             RDX = 0: VTL0 wrote the code there, each page
                                             rw- NX today; refused: rw- NX again.
                                             RDX = GPA of the code elsewhere in VTL0 memory: the
                                             pages are a module area, mapped executable by the
                                             locked tables and so kept NW|NX by VTL1 (where the
                                             host has no NX memory attribute the tables alone
                                             decide what runs, so W^X needs them unwritable);
                                             VTL1 copies the code in once; refused: NW|NX and
                                             zeroed again.  VTL_E_POLICY: not on the allowlist,
                                             a privileged instruction, pages in another state */
#define VTL_CALL_MODULE_LOAD       0x0E   /* RCX = GPA, RDI = pages (RDX as for VALIDATE): a
                                             range validated by MODULE_VALIDATE (or validated
                                             now) becomes r-x and immutable until
                                             MODULE_UNLOAD                                   */
#define VTL_CALL_MODULE_UNLOAD     0x0F   /* RCX = GPA, RDI = pages of a validated or loaded
                                             module: NW|NX first, then rw- NX (a module area:
                                             stays NW|NX, zeroed)                           */
#define VTL_CALL_START_AP          0x10   /* RCX = GPA of a struct vtl_start_vp in VTL0 memory:
                                             with VTL1 enabled VTL0 may not call VTL_HC_START_VP
                                             (VTL_E_ACCESS_DENIED), so it asks VTL1, which copies
                                             the request once (VTL0 on another VP may change it
                                             meanwhile), checks its copy and issues
                                             VTL_HC_START_VP with it from VTL1 memory.  Built-in
                                             VTL1 (docs/smp.md): refused with VTL_E_POLICY after
                                             END_OF_BOOT, before the page tables are locked, when
                                             rip is not in the text VTL1 protected (r-x, outside
                                             the privileged section), rsp's stack is not memory
                                             VTL0 may write or cr3 is not the root VTL1 locked;
                                             VTL_E_INVALID_ARG: request unreadable, flags, no
                                             such AP or the boot VP, rip/rsp/cr3 outside VTL0
                                             memory; otherwise the hypercall's status
                                             (VTL_E_BUSY: already started).  The AP's VTL1
                                             initialises first, then its VTL0 runs at rip.  Its
                                             VTL0 must then lock its own registers
                                             (VTL_CALL_LOCK_PAGE_TABLES on that AP) before
                                             END_OF_BOOT.                                    */

/* ---- memory attributes per page per VTL (KVM_MEMORY_ATTRIBUTE_*) ------ */
#define VTL_MEM_NR                 0x1    /* no read                                  */
#define VTL_MEM_NW                 0x2    /* no write                                 */
#define VTL_MEM_NX                 0x4    /* no execute; 0 = unrestricted             */
#define VTL_PROTECT_IMMUTABLE      0x1    /* VTL1 never relaxes these pages again     */
#define VTL_PROTECT_AFTER_BOOT     0x2    /* ro_after_init: NW added at END_OF_BOOT   */
#define VTL_PROTECT_AUDIT          0x4    /* violations are intercepted and allowed   */
#define VTL_PROTECT_F_RANGES       0x1    /* request entries are vtl_gpa_range, not GPAs */
#define VTL_PROTECT_MAX_PER_CALL   4096   /* entries the VMM processes per hypercall  */

/* ---- lifecycle (docs/design.md section 7) ------------------------------------- */
#define VTL_KEXEC_POLICY_TEARDOWN  0      /* VTL1 validates, then ends itself; VTL0 starts
                                             the new kernel with no VTL1 (it may enable a
                                             new one)                                     */
#define VTL_KEXEC_POLICY_PERSIST   1      /* VTL1 stays: the new kernel's text r-x and
                                             rodata r-- (immutable), the rest rw- NX, its
                                             privileged section judged, CR0/CR4/EFER/XCR0
                                             pins kept, all before its first instruction  */
#define VTL_KEXEC_POLICY_DENY      2      /* VTL1 refuses every kexec                     */
#define VTL_KEXEC_MAX_SEGMENTS     8
#define VTL_SEG_X                  0x1    /* vtl_kexec_segment.flags: ELF p_flags         */
#define VTL_SEG_W                  0x2
#define VTL_SEG_R                  0x4
#define VTL_RESTART_F_TEARDOWN     0x1    /* vtl_restart.flags: VTL1 ends first           */
#define VTL_TRUST_MAX              256    /* SHA-256 digests in VTL1's allowlist          */
#define VTL_SHA256_MAX_LEN         0x10000    /* VTL_CALL_SHA256: 64 KiB (a test call; ~2.4 s
                                                 of VTL1 on a host that emulates every
                                                 guest instruction) */
#define VTL_MODULE_MAX_PAGES       64

/* ---- status codes (RAX) --------------------------------------------- */
#define VTL_OK                     0
#define VTL_E_INVALID_CODE         1
#define VTL_E_ACCESS_DENIED        2
#define VTL_E_INVALID_ARG          3
#define VTL_E_NOT_ENABLED          4
#define VTL_E_ALREADY_ENABLED      5
#define VTL_E_DISABLED             6      /* VTL1 switched off for this partition    */
#define VTL_E_MISALIGNED           7
#define VTL_E_OUT_OF_RANGE         8
#define VTL_E_OVERLAPS_VTL1        9
#define VTL_E_NO_RESOURCES         10     /* e.g. the host's memslots are exhausted   */
#define VTL_E_IMMUTABLE            11     /* VTL1 policy: the page is locked for good */
#define VTL_E_POLICY               12     /* VTL1 policy: e.g. W+X, or boot is over   */
#define VTL_E_BUSY                 13     /* the VP is not in the state asked for     */

/* ---- report channel (VTL_HC_REPORT), in the spirit of KVM selftests' ucall ----
 * Guests tell the VMM results and measurements as records, never as console text.
 * value[] meanings per kind: */
#define VTL_REPORT_RESULT          1      /* the scenario's verdict: name = scenario, value[0] =
                                             0 pass / nonzero fail, text = why it failed     */
#define VTL_REPORT_TARGET          2      /* attack target in memory: value[0] = GPA, value[1] =
                                             length (1..8), value[2] = its value before the
                                             attack; the VMM reads it back itself           */
#define VTL_REPORT_MSR             3      /* attack target MSR: value[0] = index, value[1] =
                                             value before the attack                        */
#define VTL_REPORT_STATUS          4      /* a status the guest was given: name = what was asked,
                                             value[0] = call or hypercall code, value[1] = status */
#define VTL_REPORT_FAULT           5      /* a fault the guest took: name = what it tried,
                                             value[0] = vector, value[1] = error code,
                                             value[2] = RIP, value[3] = CR2                  */
#define VTL_REPORT_VALUE           6      /* a named measurement: name = key, value[0]        */
#define VTL_REPORT_STAMPS          7      /* TSC stamps: data_count uint64s at data_gpa,
                                             value[0] = operations between two stamps        */
#define VTL_REPORT_EXEC            8      /* attack: code planted at GVA value[0], GPA value[1];
                                             if it runs it stores value[3] into the 8-byte
                                             marker at GPA value[2] (0: no marker).  The
                                             VMM reads the marker back itself            */
#define VTL_REPORT_BYTES           9      /* named bytes: data_count bytes at data_gpa        */
#define VTL_REPORT_REGISTER        10     /* attack target register: value[0] = VTL_REG_*,
                                             value[1] = its value before the attack
                                             (GDTR/IDTR: base), value[2] = limit; the VMM
                                             reads it from KVM after the run              */
#define VTL_REPORT_MAX_STAMPS      0x200000 /* STAMPS: most uint64s per report (2^21); a
                                             literal: cffi takes no expressions       */
#define VTL_REPORT_MAX_BYTES       4096   /* BYTES: most bytes per report                    */

/* ---- entry reasons (vtl_control.entry_reason) ------------------------ */
#define VTL_ENTRY_NONE             0      /* first entry: initialise, then return    */
#define VTL_ENTRY_CALL             1      /* VTL0 made a VTL call                     */
#define VTL_ENTRY_INTERCEPT        2      /* a secure intercept: see vtl_control.intercept */

/* ---- secure intercepts ---------------------------------------------- */
#define VTL_INTERCEPT_MEMORY       1
#define VTL_INTERCEPT_MSR          2
#define VTL_INTERCEPT_REGISTER     3      /* a privileged instruction in VTL0's privileged
                                             section writes a register VTL1 judges:
                                             reg, old_value/new_value (+ limits), rip,
                                             insn_len/insn_bytes.  ALLOW: the VMM writes it
                                             and advances RIP; INJECT_FAULT: at the insn   */

/* ---- register intercept control (VTL_HC_SET_INTERCEPT_CONTROL), after the TLFS's
 * HvX64RegisterCrInterceptControl and its CR0/CR4 masks ----
 * Once set, VTL0 instruction fetches from the privileged section (which VTL1 must keep
 * NR for VTL0) are decoded by the VMM: MOV to CR0/CR3/CR4, LMSW, CLTS, LGDT, LIDT, LLDT,
 * LTR and XSETBV.  A write to a register VTL1 judges (for CR0/CR4: one that changes a
 * bit of the mask) becomes a register intercept; any other write is applied by the VMM
 * after the checks hardware makes (#GP on reserved bits, non-canonical bases, ...); any
 * other instruction there is single-stepped by the VMM on a temporary mapping. */
#define VTL_ICTL_CR0               0x01
#define VTL_ICTL_CR3               0x02
#define VTL_ICTL_CR4               0x04
#define VTL_ICTL_XCR0              0x08
#define VTL_ICTL_GDTR              0x10
#define VTL_ICTL_IDTR              0x20
#define VTL_ICTL_LDTR              0x40
#define VTL_ICTL_TR                0x80
#define VTL_ICTL_ALL               0xFF
#define VTL_ACCESS_READ            0x1
#define VTL_ACCESS_WRITE           0x2
#define VTL_ACCESS_EXECUTE         0x4
#define VTL_ICPT_F_GVA_VALID       0x1    /* gva holds the linear address             */
#define VTL_ICPT_F_RIP_AFTER       0x2    /* the access was reported after the
                                             instruction retired (memslot host, writes):
                                             rip is the next instruction, insn_len 0    */
#define VTL_VERDICT_INJECT_FAULT   1      /* fault_vector/fault_error_code into VTL0  */
#define VTL_VERDICT_ALLOW          2      /* the VMM completes the access             */
#define VTL_VERDICT_STOP           3      /* stop the partition                       */

/* byte offsets in struct vtl_control and vtl_boot_info, for assembly (checked by tests/test_abi.py) */
#define VTL_CONTROL_ENTRY_REASON_OFF 0
#define VTL_CONTROL_VTL0_RAX_OFF     8
#define VTL_CONTROL_VTL0_RCX_OFF     16
#define VTL_BOOT_INFO_VP_INDEX_OFF   16   /* struct vtl_boot_info.vp_index: VTL1 picks its stack */

/* ---- guest-physical memory map -------------------------------------- */
#define VTL_BOOT_MAGIC             0x544F4F424C54560AULL /* "\nVTLBOOT" */
#define VTL0_BOOT_INFO_GPA         0x1000     /* VP n's boot info at + n * VTL_BOOT_INFO_STRIDE */
#define VTL_BOOT_INFO_STRIDE       0x100
#define VTL0_BOOT_STACKS_GPA       0x10000    /* VP n's boot stack: the page at + n * 4096;
                                                 RSP at entry = the page's end              */
#define VTL0_BOOT_TABLES_GPA       0x2000 /* VMM's identity map: PML4, PDPT, PDs     */
#define VTL0_BOOT_GDT_GPA          0x9000
#define VTL0_IMAGE_MIN             0x100000   /* VTL0 ELF segments live in [MIN, VTL1_BASE) */
#define VTL1_BASE                  0x1000000  /* 16 MiB: VTL1's private region        */
#define VTL1_SIZE                  0x1000000  /* 16 MiB                                */
#define VTL1_BOOT_INFO_OFF         0x0000     /* VP n's at + n * VTL_BOOT_INFO_STRIDE    */
#define VTL1_CONTROL_OFF           0x1000     /* one vtl_control page per VP          */
#define VTL1_MAX_VPS               16         /* VPs a partition may have (boot infos, stacks, control pages) */
#define VTL1_BOOT_TABLES_OFF       0x20000
#define VTL1_BOOT_GDT_OFF          0x2F000
#define VTL1_BOOT_STACKS_OFF       0x30000    /* VP n's boot stack page at + n * 4096      */
#define VTL1_TRUST_OFF             0x40000    /* VTL1's allowlist: trust_count digests of 32 bytes */
#define VTL1_IMAGE_MIN_OFF         0x100000   /* VTL1 ELF segments in [BASE+this, BASE+SIZE) */
#define VTL_MEM_MIN                0x4000000  /* 64 MiB: smallest guest memory        */
#define VTL_MEM_MAX                0x100000000ULL /* 4 GiB: largest guest memory, what each
                                                 kernel's own identity map (guest_lib/paging.c)
                                                 and VTL1's page policy (guest_vtl1/vtl1.h) cover;
                                                 guest memory is a multiple of 2 MiB between the two */

/* ---- boot_info.flags ------------------------------------------------- */
#define VTL_BOOT_F_VTL1_AVAILABLE  0x1        /* VTL0: VTL_HC_ENABLE_VTL1 may succeed  */
#define VTL_BOOT_F_HEKI            0x2        /* VTL0: Heki mode (vtl run --mode heki): no VTL1;
                                                 the VMM plays KVM with the Heki patches and
                                                 serves KVM_HC_LOCK_CR_UPDATE and
                                                 KVM_HC_PROTECT_MEMORY (below)            */
#define VTL_BOOT_F_VTL1_PERSISTS   0x4        /* VTL0: VTL1 is already running, kept from the
                                                 previous kernel by a persist kexec: VTL calls
                                                 work now, VTL_HC_ENABLE_VTL1 returns
                                                 VTL_E_ALREADY_ENABLED (never with _AVAILABLE) */

/* ---- Heki mode (docs/heki-mode.md): the hypercalls of the Heki RFC patches, with the
 * patches' numbers, argument layouts and error codes.  In-KVM Heki takes them as VMCALL
 * (a0..a2 in RBX, RCX, RDX); a VMCALL never reaches userspace on the hosts this project
 * targets, so here they are carried on VTL_PORT_HYPERCALL like every hypercall: RAX =
 * number, RDI = a0, RSI = a1, RDX = a2; RAX = the return value (0, a version, or a
 * negative KVM error code as a two's-complement uint64).  VTL0 only, CPL0 only. ---- */
#define KVM_HC_LOCK_CR_UPDATE      13     /* RFC v2/v3 (include/uapi/linux/kvm_para.h):
                                             a0 = CR number (0 or 4), a1 = bits to pin,
                                             a2 = flags.  CR0 pins must include WP and be set
                                             in the host's CR0; CR4 pins a subset of SMEP, SMAP,
                                             UMIP, FSGSBASE, CET, FRED (bits the host's CR4
                                             lacks are silently dropped).  Pins are OR-ed into
                                             VM-wide masks, never removed; a MOV to CR0/CR4
                                             clearing a pinned bit gets #GP(0), CR unchanged.
                                             -KVM_EINVAL: a0 > U32_MAX, another CR, pin = 0,
                                             CR0 without WP, bits outside the rules, flags */
#define KVM_LOCK_CR_UPDATE_VERSION 1      /* a2 flag (1 << 0): with a0 = a1 = 0 returns
                                             HEKI_ABI_VERSION, pins nothing               */
#define HEKI_ABI_VERSION           1
#define KVM_HC_PROTECT_MEMORY      14     /* RFC v2: a0 = GPA of a struct heki_page_list,
                                             chained by next_pa (0 ends the chain).  Each
                                             entry sets the permissions of [pa, epa) (page
                                             aligned, pa < epa).  0, or -KVM_EFAULT (a list or
                                             its pages not in guest memory), -KVM_E2BIG (more
                                             lists than guest memory holds pages, e.g. a loop
                                             in next_pa; npages beyond one page), -KVM_EINVAL
                                             (misaligned, empty range, permissions 0 or beyond
                                             MEM_ATTR_PROT, a range outside guest memory),
                                             -KVM_EPERM (a page already IMMUTABLE).  Here all or
                                             nothing: on any error nothing changed        */
#define MEM_ATTR_READ              0x1    /* include/linux/kvm_mem_attr.h (RFC v2)          */
#define MEM_ATTR_WRITE             0x2
#define MEM_ATTR_EXEC              0x4    /* without MBEC a no-exec request becomes
                                             executable (the patch: "Clearing kernel exec
                                             depends on MBEC"); this host has none        */
#define MEM_ATTR_IMMUTABLE         0x8    /* the page's permissions never change again    */
#define MEM_ATTR_PROT              0xF
#define HEKI_PAGE_LIST_MAX_PAGES   169    /* (4096 - 24) / 24: a list occupies one page    */
#define KVM_EPERM                  1      /* include/uapi/linux/kvm_para.h; returned negated */
#define KVM_E2BIG                  7
#define KVM_EFAULT                 14
#define KVM_EINVAL                 22
#define KVM_ENOSYS                 1000
#define KVM_HEKI_EXIT_REASON_CR0   0x1    /* KVM_CAP_HEKI_CONFIGURE / _DENIAL reasons (RFC v3
                                             3/5); events heki_configure / heki_denial here */
#define KVM_HEKI_EXIT_REASON_CR4   0x2

#ifndef __ASSEMBLER__
/* Handed to each kernel in RDI at entry.  VTL0's at VTL0_BOOT_INFO_GPA,
 * VTL1's at VTL1_BASE + VTL1_BOOT_INFO_OFF. */
struct vtl_boot_info {
    uint64_t magic;          /* VTL_BOOT_MAGIC                                  */
    uint32_t abi_version;    /* VTL_ABI_VERSION                                 */
    uint32_t vtl;            /* 0 or 1                                          */
    uint32_t vp_index;
    uint32_t nr_vps;
    uint64_t mem_size;       /* guest-physical memory is [0, mem_size)          */
    uint64_t vtl1_base;      /* VTL1's region [vtl1_base, vtl1_base + vtl1_size) */
    uint64_t vtl1_size;
    uint64_t image_start;    /* the loaded ELF occupies [image_start, image_end) */
    uint64_t image_end;
    uint64_t free_start;     /* free RAM this kernel may use                    */
    uint64_t free_end;
    uint64_t control_gpa;    /* VTL1: vtl_control of VP0 (VP n at + n*4096)     */
    uint64_t flags;          /* VTL_BOOT_F_*                                    */
    uint64_t param;          /* scenario parameter (e.g. iteration count)       */
    char     scenario[48];   /* VTL0: scenario to run, NUL-terminated; "" = default */
    uint8_t  measurement[32];/* VTL1: SHA-256 of its image as loaded (entry point
                                and PT_LOAD segments; docs/abi.md "Measurement") */
    /* VTL1: its allowlist (vtl run --trust), SHA-256 digests of 32 bytes each, in VTL1
     * memory at VTL1_BASE + VTL1_TRUST_OFF; and its kexec policy (vtl run --kexec-policy). */
    uint64_t trust_gpa;
    uint32_t trust_count;    /* at most VTL_TRUST_MAX                           */
    uint32_t kexec_policy;   /* VTL_KEXEC_POLICY_*                              */
    /* VTL0: a file the user staged in its memory (vtl run --stage FILE, vtl kexec
     * --image), e.g. the next kernel's ELF, as a boot loader stages an initrd; 0 = none.
     * Free RAM as far as the VMM is concerned: the kernel must not overwrite it before use. */
    uint64_t staged_gpa;
    uint64_t staged_size;
    uint64_t boot_count;     /* VTL0: resets and kexecs before this boot (0: first boot) */
    uint64_t reserved[3];
};

/* Per VP, in VTL1's memory; written by the VMM on every entry into VTL1. */
/* Written by the VMM into vtl_control.intercept before entering VTL1 with
 * VTL_ENTRY_INTERCEPT; VTL1 fills in the verdict and makes a VTL return.  VTL0's
 * general registers are delivered here and restored unchanged on that return. */
struct vtl_intercept {
    uint32_t type;           /* VTL_INTERCEPT_*                                 */
    uint32_t access;         /* VTL_ACCESS_*                                    */
    uint64_t gpa;            /* memory: the page's guest-physical address       */
    uint64_t gva;            /* memory: linear address (VTL_ICPT_F_GVA_VALID)   */
    uint64_t rip;
    uint32_t flags;          /* VTL_ICPT_F_*                                    */
    uint32_t insn_len;       /* 0 when unknown                                  */
    uint8_t  insn_bytes[16];
    uint32_t size;           /* bytes accessed                                  */
    uint32_t msr;            /* msr: index                                      */
    uint64_t data;           /* memory write / wrmsr: the value being written   */
    uint64_t gprs[16];       /* VTL0's RAX RCX RDX RBX RSP RBP RSI RDI R8-R15   */
    uint64_t cr0, cr3, cr4, efer;
    /* VTL1's answer */
    uint32_t verdict;        /* VTL_VERDICT_*                                   */
    uint32_t fault_vector;   /* exception vector 0-31 (not 2, not 15, not 22-31) */
    uint32_t fault_has_error_code;
    uint32_t fault_error_code;
    uint64_t fault_cr2;      /* for #PF                                         */
    /* register intercepts (VTL_INTERCEPT_REGISTER) */
    uint32_t reg;            /* VTL_REG_*                                       */
    uint32_t reserved1;
    uint64_t old_value;      /* CRn/XCR0: the value; GDTR/IDTR: base; LDTR/TR: selector */
    uint64_t new_value;
    uint32_t old_limit;      /* GDTR/IDTR; LDTR/TR: the descriptor's limit      */
    uint32_t new_limit;
    uint64_t old_base;       /* LDTR/TR: the base loaded now and the base the   */
    uint64_t new_base;       /*   new selector's GDT descriptor holds (as read) */
};

struct vtl_control {
    uint32_t entry_reason;   /* VTL_ENTRY_*                                     */
    uint32_t vp_index;
    uint64_t vtl0_rax;       /* VTL0's RAX/RCX at the VTL call; restored by     */
    uint64_t vtl0_rcx;       /*   VTL_PORT_RETURN (VTL1 may change them)        */
    uint64_t reserved[13];
    struct vtl_intercept intercept;
};

/* VTL_CALL_KEXEC_VALIDATE's request, in VTL0 memory (VTL1 copies it once).  The
 * segments are the new kernel's PT_LOADs, already placed by VTL0 at paddr: filesz bytes,
 * then zeros up to memsz; page aligned paddr, ascending, not overlapping. */
struct vtl_kexec_segment {
    uint64_t paddr;
    uint64_t filesz;
    uint64_t memsz;
    uint32_t flags;          /* VTL_SEG_* (ELF p_flags)                         */
    uint32_t reserved;       /* 0                                               */
};

struct vtl_kexec_request {
    uint64_t entry;          /* e_entry: inside an executable segment           */
    uint32_t nr_segments;    /* 1..VTL_KEXEC_MAX_SEGMENTS                       */
    uint32_t reserved0;      /* 0                                               */
    uint64_t priv_gpa;       /* the new kernel's privileged section (persist:    */
    uint64_t priv_pages;     /*   judged from its first instruction); 0 pages: none */
    uint64_t param;          /* the new kernel's boot_info.param ...            */
    char     scenario[48];   /* ... and boot_info.scenario: its "command line"  */
    struct vtl_kexec_segment seg[8];  /* VTL_KEXEC_MAX_SEGMENTS                  */
};

/* VTL_HC_START_VP's argument (and VTL_CALL_START_AP's, in VTL0 memory). */
struct vtl_start_vp {
    uint32_t vp_index;       /* 1 .. nr_vps - 1 (VP0 is the boot VP)            */
    uint32_t flags;          /* 0                                               */
    uint64_t rip;            /* in VTL0's image (boot_info.image_start/end)     */
    uint64_t rsp;            /* in VTL0 memory                                  */
    uint64_t cr3;            /* page aligned, in VTL0 memory                    */
    uint64_t arg;            /* RDI at rip                                      */
};

/* VTL_HC_VTL0_RESTART's argument, in VTL1 memory. */
struct vtl_restart {
    uint64_t entry;          /* where VTL0 starts                               */
    uint64_t flags;          /* VTL_RESTART_F_*                                 */
    uint64_t image_start;    /* boot_info.image_start/end of the new kernel     */
    uint64_t image_end;
    uint64_t param;          /* boot_info.param                                 */
    char     scenario[48];   /* boot_info.scenario, NUL-terminated              */
};

/* VTL_HC_SET_INTERCEPT_CONTROL's argument, in VTL1 memory. */
struct vtl_intercept_control {
    uint32_t flags;          /* VTL_ICTL_*: the registers VTL1 judges           */
    uint32_t reserved0;      /* 0                                               */
    uint64_t cr0_mask;       /* CR0 bits VTL1 judges (with VTL_ICTL_CR0)        */
    uint64_t cr4_mask;       /* CR4 bits VTL1 judges (with VTL_ICTL_CR4)        */
    uint64_t priv_gpa;       /* VTL0's privileged section: page-aligned GPA ...  */
    uint64_t priv_pages;     /* ... and pages, in VTL0 memory; 0 pages: none     */
};

/* VTL_HC_MODIFY_VTL_PROTECTION's request, and its list, in VTL1 memory. */
struct vtl_protect_request {
    uint32_t target_vtl;     /* must be lower than the caller's: 0              */
    uint32_t attributes;     /* VTL_MEM_*: 0, NW, NX, NW|NX or NR|NW|NX         */
    uint32_t flags;          /* VTL_PROTECT_F_RANGES                            */
    uint32_t count;          /* entries in the list                             */
    uint64_t start_index;    /* first entry to process (rep continuation)       */
    uint64_t list_gpa;       /* uint64 page GPAs, or struct vtl_gpa_range       */
};

struct vtl_gpa_range {
    uint64_t gpa;            /* page aligned                                    */
    uint64_t pages;
};

/* VTL_HC_REPORT's record (152 bytes), in memory the caller may read. */
struct vtl_report {
    uint32_t kind;           /* VTL_REPORT_*                                    */
    uint32_t reserved0;      /* 0                                               */
    char     name[32];       /* NUL-terminated                                  */
    uint64_t value[4];       /* per kind, see VTL_REPORT_*                      */
    uint64_t data_gpa;       /* STAMPS / BYTES: where the data is               */
    uint64_t data_count;     /* STAMPS: uint64s; BYTES: bytes                   */
    char     text[64];       /* NUL-terminated free text (e.g. why a FAIL)      */
};

/* KVM_HC_PROTECT_MEMORY's page list (include/linux/heki.h, RFC v2): one page each,
 * `npages` struct heki_pages right after the header.  `next` is the guest's own pointer,
 * ignored by the hypervisor; `next_pa` chains the lists (0: the last). */
struct heki_pages {
    uint64_t pa;             /* first byte, page aligned                        */
    uint64_t epa;            /* end (exclusive), page aligned, > pa             */
    uint64_t permissions;    /* MEM_ATTR_*                                      */
};

struct heki_page_list {
    uint64_t next;           /* guest pointer, not read                         */
    uint64_t next_pa;        /* GPA of the next list, 0 = none                  */
    uint64_t npages;         /* entries following, at most HEKI_PAGE_LIST_MAX_PAGES */
    /* struct heki_pages pages[npages]; */
};

/* A scenario built into a VTL0 image, listed in its ELF section ".vtl_scenarios"
 * so that the VMM can list them without running the guest. */
struct vtl_scenario_desc {
    char     name[32];       /* what `vtl run --scenario` takes                 */
    char     description[96];/* one line                                        */
    uint64_t entry;          /* the guest's function: void fn(void)             */
};
#endif /* __ASSEMBLER__ */
/* ABI-CDEF-END */

#endif
