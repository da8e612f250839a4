/* VTL1's memory policy for VTL0 (issue 3).  VTL1 keeps its own view of every VTL0 page
 * (attributes it applied + policy flags) and asks the VMM to apply attributes through
 * VTL_HC_MODIFY_VTL_PROTECTION.  Invariants it keeps whatever VTL0 asks:
 *   - no page VTL0 can write is ever executable (W^X),
 *   - an immutable page never changes again,
 *   - nothing touching VTL1's region, nothing after END_OF_BOOT. */
#include "lib.h"
#include "vtl1.h"

#define MAX_PAGES (4ULL << 18)          /* 4 GiB of VTL0 memory */
#define F_IMMUTABLE 0x10
#define F_AFTER_BOOT 0x20
#define F_TABLE 0x40
#define F_AUDIT 0x80
#define ATTR_MASK 0x7
#define PTE_P (1ULL << 0)
#define PTE_PS (1ULL << 7)
#define PTE_NX (1ULL << 63)
#define PTE_ADDR 0x000FFFFFFFFFF000ULL
#define EFER_NXE (1ULL << 11)
#define MSR_EFER 0xC0000080

static uint8_t page[MAX_PAGES];         /* attrs | F_* per VTL0 page */
static int boot_over, locked;
static uint64_t list_buf[VTL_PROTECT_MAX_PER_CALL];
static struct vtl_protect_request req;
uint64_t audit_allowed;

static uint64_t npages(void) { return bi->mem_size >> 12; }

static int valid_attrs(uint64_t a)
{
	return !(a & ~7ULL) && (!(a & VTL_MEM_NR) || a == 7);
}

/* The policy check for one range; VTL_OK or why not. */
static uint64_t check_range(uint64_t gpa, uint64_t pages, uint64_t attrs, uint64_t flags)
{
	if (gpa & 0xFFF)
		return VTL_E_MISALIGNED;
	if (pages == 0 || pages > npages() || (gpa >> 12) > npages() - pages)
		return VTL_E_OUT_OF_RANGE;
	if (gpa < bi->vtl1_base + bi->vtl1_size && gpa + (pages << 12) > bi->vtl1_base)
		return VTL_E_OVERLAPS_VTL1;
	if (!(attrs & (VTL_MEM_NW | VTL_MEM_NX)))
		return VTL_E_POLICY;            /* writable and executable */
	if ((flags & VTL_PROTECT_AFTER_BOOT) && (attrs & VTL_MEM_NW))
		return VTL_E_INVALID_ARG;       /* ro_after_init is writable until END_OF_BOOT */
	for (uint64_t i = 0; i < pages; i++) {
		uint8_t p = page[(gpa >> 12) + i];
		if ((p & F_IMMUTABLE) && (p & ATTR_MASK) != attrs)
			return VTL_E_IMMUTABLE;
	}
	return VTL_OK;
}

static void record(uint64_t gpa, uint64_t pages, uint64_t attrs, uint64_t flags)
{
	uint8_t f = (flags & VTL_PROTECT_IMMUTABLE ? F_IMMUTABLE : 0) |
		    (flags & VTL_PROTECT_AFTER_BOOT ? F_AFTER_BOOT : 0) |
		    (flags & VTL_PROTECT_AUDIT ? F_AUDIT : 0);
	for (uint64_t i = 0; i < pages; i++) {
		uint8_t *p = &page[(gpa >> 12) + i];
		*p = (uint8_t)((*p & ~ATTR_MASK) | attrs | f);
	}
}

/* Ask the VMM; follows rep-style partial progress until done or refused. */
static uint64_t vmm_protect(uint64_t list_gpa, uint64_t count, uint64_t attrs, int ranges)
{
	req.target_vtl = 0;
	req.attributes = (uint32_t)attrs;
	req.flags = ranges ? VTL_PROTECT_F_RANGES : 0;
	req.count = (uint32_t)count;
	req.list_gpa = list_gpa;
	req.start_index = 0;
	for (;;) {
		uint64_t next = 0;
		uint64_t st = hypercall(VTL_HC_MODIFY_VTL_PROTECTION, (uint64_t)&req, 0, 0, &next);
		if (st != VTL_OK) {
			report(VTL_REPORT_STATUS, "vmm_protect", VTL_HC_MODIFY_VTL_PROTECTION, st, next, 0,
			       vtl_status_name(st));   /* value[2] = the refused entry */
			printf("VMM refused protection entry %lu: status %lu\n", next, st);
			return st;
		}
		if (next >= count)
			return VTL_OK;
		req.start_index = next;
	}
}

static uint64_t apply_range(uint64_t gpa, uint64_t pages, uint64_t attrs)
{
	static struct vtl_gpa_range r;
	r.gpa = gpa;
	r.pages = pages;
	return vmm_protect((uint64_t)&r, 1, attrs, 1);
}

uint64_t policy_protect(uint64_t gpa, uint64_t pages, uint64_t attrs, uint64_t flags)
{
	if (boot_over)
		return VTL_E_POLICY;
	if (!valid_attrs(attrs) || (flags & ~7ULL))
		return VTL_E_INVALID_ARG;
	uint64_t st = check_range(gpa, pages, attrs, flags);
	if (st != VTL_OK)
		return st;
	st = apply_range(gpa, pages, attrs);
	if (st == VTL_OK)
		record(gpa, pages, attrs, flags);
	return st;
}

uint64_t policy_protect_pages(uint64_t list, uint64_t count, uint64_t attrs, uint64_t flags)
{
	if (boot_over)
		return VTL_E_POLICY;
	if (!valid_attrs(attrs) || (flags & ~7ULL) || count == 0 || count > VTL_PROTECT_MAX_PER_CALL ||
	    !in_vtl0(list, count * 8))
		return VTL_E_INVALID_ARG;
	memcpy(list_buf, (void *)list, count * 8);   /* VTL0 cannot change it under us */
	for (uint64_t i = 0; i < count; i++) {       /* all or nothing */
		uint64_t st = check_range(list_buf[i], 1, attrs, flags);
		if (st != VTL_OK)
			return st;
	}
	uint64_t st = vmm_protect((uint64_t)list_buf, count, attrs, 0);
	if (st == VTL_OK)
		for (uint64_t i = 0; i < count; i++)
			record(list_buf[i], 1, attrs, flags);
	return st;
}

uint64_t policy_get(uint64_t gpa)
{
	return (gpa >> 12) < npages() ? page[gpa >> 12] & ATTR_MASK : 0;
}

/* Walk VTL0's page tables: every table page becomes read-only for good, and no
 * executable mapping may point at a page VTL0 can write. */
static uint64_t tables[VTL_PROTECT_MAX_PER_CALL];
static uint64_t ntables, wx_violations;

static int add_table(uint64_t pa)
{
	if (!in_vtl0(pa, 4096) || ntables >= VTL_PROTECT_MAX_PER_CALL)
		return 0;
	tables[ntables++] = pa;
	return 1;
}

static void check_exec(uint64_t pa, uint64_t size)
{
	for (uint64_t off = 0; off < size; off += 4096) {
		uint64_t p = pa + off;
		if ((p >> 12) >= npages() || !in_vtl0(p, 4096))
			continue;       /* not VTL0 memory: nothing VTL0 can run there */
		uint8_t a = page[p >> 12];
		if (!(a & VTL_MEM_NW) || (a & VTL_MEM_NX)) {
			if (wx_violations++ < 4)
				printf("lock: executable mapping of %#lx, which VTL0 may write\n", p);
		}
	}
}

uint64_t policy_lock_page_tables(void)
{
	if (boot_over || locked)
		return VTL_E_POLICY;
	uint64_t cr3 = 0, efer = 0;
	if (hypercall(VTL_HC_GET_VP_REGISTER, bi->vp_index, VTL_REG_CR3, 0, &cr3) != VTL_OK ||
	    hypercall(VTL_HC_GET_VP_REGISTER, bi->vp_index, VTL_REG_EFER, 0, &efer) != VTL_OK)
		return VTL_E_INVALID_ARG;
	if (!(efer & EFER_NXE))
		return VTL_E_POLICY;    /* NX bits would mean nothing */
	ntables = wx_violations = 0;
	uint64_t pml4 = cr3 & PTE_ADDR;
	if (!add_table(pml4))
		return VTL_E_INVALID_ARG;
	for (int i4 = 0; i4 < 512; i4++) {
		uint64_t e4 = ((uint64_t *)pml4)[i4];
		if (!(e4 & PTE_P))
			continue;
		uint64_t pdpt = e4 & PTE_ADDR;
		if (!add_table(pdpt))
			return VTL_E_INVALID_ARG;
		for (int i3 = 0; i3 < 512; i3++) {
			uint64_t e3 = ((uint64_t *)pdpt)[i3];
			if (!(e3 & PTE_P))
				continue;
			if (e3 & PTE_PS)
				return VTL_E_POLICY;    /* 1 GiB pages: not supported by the check */
			uint64_t pd = e3 & PTE_ADDR;
			if (!add_table(pd))
				return VTL_E_INVALID_ARG;
			for (int i2 = 0; i2 < 512; i2++) {
				uint64_t e2 = ((uint64_t *)pd)[i2];
				if (!(e2 & PTE_P))
					continue;
				int nx2 = !!((e4 | e3 | e2) & PTE_NX);
				if (e2 & PTE_PS) {
					if (!nx2)
						check_exec(e2 & PTE_ADDR & ~0x1FFFFFULL, 2ULL << 20);
					continue;
				}
				uint64_t pt = e2 & PTE_ADDR;
				if (!add_table(pt))
					return VTL_E_INVALID_ARG;
				for (int i1 = 0; i1 < 512; i1++) {
					uint64_t e1 = ((uint64_t *)pt)[i1];
					if ((e1 & PTE_P) && !nx2 && !(e1 & PTE_NX))
						check_exec(e1 & PTE_ADDR, 4096);
				}
			}
		}
	}
	if (wx_violations) {
		report_value("lock_wx_violations", wx_violations);
		printf("lock refused: %lu executable mappings of writable pages\n", wx_violations);
		return VTL_E_POLICY;
	}
	for (uint64_t i = 0; i < ntables; i++)
		if (check_range(tables[i], 1, VTL_MEM_NW | VTL_MEM_NX, 0) != VTL_OK)
			return VTL_E_IMMUTABLE;
	uint64_t st = vmm_protect((uint64_t)tables, ntables, VTL_MEM_NW | VTL_MEM_NX, 0);
	if (st != VTL_OK)
		return st;
	for (uint64_t i = 0; i < ntables; i++) {
		record(tables[i], 1, VTL_MEM_NW | VTL_MEM_NX, VTL_PROTECT_IMMUTABLE);
		page[tables[i] >> 12] |= F_TABLE;
	}
	locked = 1;
	report_value("locked_table_pages", ntables);
	printf("VTL0 page tables locked: %lu table pages read-only, CR3 %#lx, EFER.NXE pinned\n",
	       ntables, cr3);
	return VTL_OK;
}

uint64_t policy_end_of_boot(void)
{
	if (boot_over)
		return VTL_E_POLICY;
	uint64_t n = 0;
	for (uint64_t i = 0; i < npages(); i++) {
		if (!(page[i] & F_AFTER_BOOT))
			continue;
		uint64_t j = i;
		while (j < npages() && (page[j] & F_AFTER_BOOT))
			j++;
		uint64_t st = apply_range(i << 12, j - i, VTL_MEM_NW | VTL_MEM_NX);
		if (st != VTL_OK)
			return st;
		for (uint64_t k = i; k < j; k++)
			page[k] = (uint8_t)((page[k] & ~(ATTR_MASK | F_AFTER_BOOT)) | VTL_MEM_NW | VTL_MEM_NX |
					    F_IMMUTABLE);
		n += j - i;
		i = j;
	}
	boot_over = 1;
	report_value("ro_after_init_pages", n);
	printf("end of boot: %lu ro_after_init pages now read-only\n", n);
	return VTL_OK;
}

/* A secure intercept: judge it and write the verdict. */
void policy_intercept(struct vtl_intercept *m)
{
	m->verdict = VTL_VERDICT_INJECT_FAULT;
	if (m->type == VTL_INTERCEPT_MSR) {
		int deny = 0;
		if (m->msr == MSR_EFER)
			deny = locked && !(m->data & EFER_NXE);
		else
			deny = boot_over;
		printf("intercept: wrmsr %#x <- %#lx at rip %#lx: %s\n", m->msr, m->data, m->rip,
		       deny ? "denied (#GP)" : "allowed");
		if (!deny) {
			m->verdict = VTL_VERDICT_ALLOW;
			return;
		}
		m->fault_vector = 13;
		m->fault_has_error_code = 1;
		m->fault_error_code = 0;
		return;
	}
	uint64_t gfn = m->gpa >> 12;
	if (gfn < npages() && (page[gfn] & F_AUDIT)) {
		audit_allowed++;
		m->verdict = VTL_VERDICT_ALLOW;
		return;
	}
	const char *what = m->access == VTL_ACCESS_WRITE ? "write" :
			   m->access == VTL_ACCESS_EXECUTE ? "execute" : "read";
	/* A #PF as the hardware would raise it for a present page: P, W/R, I/D. */
	m->fault_vector = 14;
	m->fault_has_error_code = 1;
	m->fault_error_code = 1 | (m->access == VTL_ACCESS_WRITE ? 2 : 0) |
			      (m->access == VTL_ACCESS_EXECUTE ? 0x10 : 0);
	m->fault_cr2 = (m->flags & VTL_ICPT_F_GVA_VALID) ? m->gva : m->gpa;
	printf("intercept: %s of GPA %#lx at rip %#lx%s: denied (#PF err %#x)\n", what, m->gpa, m->rip,
	       (m->flags & VTL_ICPT_F_RIP_AFTER) ? " (after the instruction)" : "", m->fault_error_code);
}
