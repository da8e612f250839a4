#ifndef VTL1_H
#define VTL1_H
#include "lib.h"

extern struct vtl_boot_info *bi;
int in_vtl0(uint64_t gpa, uint64_t len);

/* policy.c: VTL1's memory policy for VTL0 */
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
#endif
