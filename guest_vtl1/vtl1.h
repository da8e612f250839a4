#ifndef VTL1_H
#define VTL1_H
#include "lib.h"

extern struct vtl_boot_info *bi;
int in_vtl0(uint64_t gpa, uint64_t len);

/* policy.c: VTL1's memory policy for VTL0.
 * page[] (one byte per VTL0 page; tests/test_fuzz.py reads it): VTL_MEM_* | F_* */
#define MAX_PAGES (VTL_MEM_MAX >> 12)   /* all of VTL0 memory */
#define ATTR_MASK 0x07
#define F_EXEC 0x08                     /* executable for VTL0 per the locked page tables */
#define F_IMMUTABLE 0x10                /* (a sealed kexec image or loaded module: until unload) */
#define F_AFTER_BOOT 0x20
#define F_TABLE 0x40
#define F_AUDIT 0x80
#define PRIV_MAX_PAGES 16

uint64_t policy_protect(uint64_t gpa, uint64_t pages, uint64_t attrs, uint64_t flags);
uint64_t policy_protect_pages(uint64_t list, uint64_t count, uint64_t attrs, uint64_t flags);
uint64_t policy_lock_page_tables(uint64_t priv_gpa, uint64_t priv_pages, uint64_t *pinning);
uint64_t policy_end_of_boot(void);
uint64_t policy_get(uint64_t gpa);
void policy_intercept(struct vtl_intercept *m);
/* The only ways VTL1 touches VTL0 memory on VTL0's behalf: VTL_OK, VTL_E_INVALID_ARG (not
 * VTL0 memory), VTL_E_ACCESS_DENIED (VTL0 itself may not write / read it there). */
uint64_t vtl0_write(uint64_t gpa, const void *src, uint64_t len);
uint64_t vtl0_read(void *dst, uint64_t gpa, uint64_t len);

/* For lifecycle.c (kexec, modules): VTL1's own view of a page, and changes to it that go
 * through the VMM first and are recorded only once applied. */
uint8_t policy_page(uint64_t gpa);
int policy_locked(void);
int policy_in_priv(uint64_t gpa);
int policy_xmapped(uint64_t gpa);       /* mapped executable at the lock, but kept NX */
/* Apply attrs to [gpa, +pages) through the VMM; on success page[] = attrs | flags (F_*). */
uint64_t policy_set(uint64_t gpa, uint64_t pages, uint64_t attrs, uint8_t flags);
/* Privileged-write encodings (the lock's rule) in the bytes of [gpa, gpa+len), whose
 * opcode and ModRM bytes are not all in [ok_gpa, ok_gpa + ok_len); bytes past the range
 * are not fetchable.  Returns how many; *first = the GPA of the first. */
uint64_t policy_scan_range(uint64_t gpa, uint64_t len, uint64_t ok_gpa, uint64_t ok_len, uint64_t *first);
/* kexec, persist policy: VTL1 starts over for the new kernel (nothing locked, boot not
 * over, no CR3 root or descriptor-table pins), but keeps CR0/CR4/EFER/XCR0 pinned
 * ("carried"); page[] = NX everywhere, then the caller sets the new kernel's pages. */
void policy_persist_reset(uint64_t new_priv_gpa, uint64_t new_priv_pages);
/* Register pinning for the new kernel's privileged section (VTL_HC_SET_INTERCEPT_CONTROL);
 * returns the VMM's status, sets the pinning state. */
uint64_t policy_persist_pin(void);

/* lifecycle.c: the allowlist, kexec, modules (docs/design.md section 7). */
void lifecycle_init(void);
uint64_t sha256_call(uint64_t gpa, uint64_t len, uint64_t out);
uint64_t kexec_validate(uint64_t req_gpa);
uint64_t kexec_jump(void);
uint64_t kexec_unload(void);
uint64_t module_validate(uint64_t gpa, uint64_t pages, uint64_t src);
uint64_t module_load(uint64_t gpa, uint64_t pages, uint64_t src);
uint64_t module_unload(uint64_t gpa, uint64_t pages);
#endif
