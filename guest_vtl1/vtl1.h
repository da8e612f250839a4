#ifndef VTL1_H
#define VTL1_H
#include "lib.h"

extern struct vtl_boot_info *bi;
int in_vtl0(uint64_t gpa, uint64_t len);

/* policy.c: VTL1's memory policy for VTL0 */
uint64_t policy_protect(uint64_t gpa, uint64_t pages, uint64_t attrs, uint64_t flags);
uint64_t policy_protect_pages(uint64_t list, uint64_t count, uint64_t attrs, uint64_t flags);
uint64_t policy_lock_page_tables(void);
uint64_t policy_end_of_boot(void);
uint64_t policy_get(uint64_t gpa);
void policy_intercept(struct vtl_intercept *m);
#endif
