/* Heki mode (docs/heki-mode.md): the same VTL0 kernel hardening itself through the Heki
 * hypercalls when the boot info announces them (VTL_BOOT_F_HEKI) instead of VTL calls.
 *
 * As Linux's heki_late_init() (RFC v2/v3, after mark_readonly()): lock the control
 * registers first (kvm_lock_crs: CR0.WP, then CR4 & cr4_pinned_mask), then give the
 * hypervisor the kernel's permissions as page lists (heki_arch_late_init ->
 * heki_protect): text R-X and immutable ("the immutable attribute is set on kernel
 * text"), rodata and ro_after_init R--, everything else RW-.  Each step reports a STATUS
 * (code = the hypercall number, value = what RAX came back with). */
#include "vtl0.h"

#define CR0_CD   (UINT64_C(1) << 30)
#define CR4_PAE  (UINT64_C(1) << 5)
#define CR4_FSGSBASE (UINT64_C(1) << 16)
#define CR4_CET  (UINT64_C(1) << 23)
#define CR4_FRED (UINT64_C(1) << 32)
#define HEKI_CR4_MASK (CR4_SMEP | CR4_SMAP | CR4_UMIP | CR4_FSGSBASE | CR4_CET | CR4_FRED)
#define NEG(e) ((uint64_t)-(int64_t)(e))
#define R  MEM_ATTR_READ
#define W  MEM_ATTR_WRITE
#define X  MEM_ATTR_EXEC
#define IMM MEM_ATTR_IMMUTABLE

extern char _scenarios_page_end[], _ro_after_init_start[], _ro_after_init_end[], _data_start[];

int heki_mode(void)
{
	return (boot_info->flags & VTL_BOOT_F_HEKI) != 0;
}

static uint64_t lock_cr(uint64_t cr, uint64_t pin, uint64_t flags)
{
	return hypercall(KVM_HC_LOCK_CR_UPDATE, cr, pin, flags, NULL);
}

static uint64_t protect(const void *list)
{
	return hypercall(KVM_HC_PROTECT_MEMORY, (uint64_t)list, 0, 0, NULL);
}

/* Page lists: one page each (identity-mapped: a list's address is its GPA). */
#define LIST_ENTRIES ((4096 - sizeof(struct heki_page_list)) / sizeof(struct heki_pages))
struct list_page {
	struct heki_page_list h;
	struct heki_pages pages[LIST_ENTRIES];
	uint8_t pad[4096 - sizeof(struct heki_page_list) - LIST_ENTRIES * sizeof(struct heki_pages)];
};
static struct list_page lists[3] __attribute__((aligned(4096)));

static void list_reset(struct list_page *l, struct list_page *next)
{
	memset(l, 0, sizeof(*l));
	l->h.next = (uint64_t)next;
	l->h.next_pa = (uint64_t)next;
}

static void list_add(struct list_page *l, uint64_t pa, uint64_t epa, uint64_t perms)
{
	if (l->h.npages >= LIST_ENTRIES)
		return;
	struct heki_pages *p = &l->pages[l->h.npages++];
	p->pa = pa;
	p->epa = epa;
	p->permissions = perms;
}

static void heki_check(const char *name, const char *key, uint64_t code, const char *what, uint64_t got,
		       uint64_t want)
{
	report_status(key, code, got);
	printf("%s -> %ld\n", what, (int64_t)got);
	if (got != want)
		fail(name, what);
}

/* The version query still answers (the Heki analogue of echo_still_works). */
void heki_still_served(const char *name)
{
	heki_check(name, "heki_version", KVM_HC_LOCK_CR_UPDATE, "KVM_HC_LOCK_CR_UPDATE version query",
		   lock_cr(0, 0, KVM_LOCK_CR_UPDATE_VERSION), HEKI_ABI_VERSION);
}

/* kvm_lock_crs: CR0.WP, then the CR4 bits of cr4_pinned_mask this CPU runs with.  Pins
 * only add bits, so a kernel started by kexec gets 0 for the pins it inherited. */
void heki_lock_crs(const char *name)
{
	heki_check(name, "heki_lock_cr0", KVM_HC_LOCK_CR_UPDATE, "pin CR0.WP", lock_cr(0, CR0_WP, 0), 0);
	uint64_t cr4 = read_cr4() & HEKI_CR4_MASK;
	report_value("heki_cr4_pin", cr4);
	heki_check(name, "heki_lock_cr4", KVM_HC_LOCK_CR_UPDATE, "pin CR4 bits", lock_cr(4, cr4, 0), 0);
}

/* heki_arch_late_init: this kernel's view of all of memory as one page list (text R-X
 * immutable, rodata R--, ro_after_init R-- once boot is over, the rest RW-); RAX. */
uint64_t heki_protect_kernel(int end_of_boot)
{
	uint64_t ts = (uint64_t)_text_start, te = (uint64_t)_text_end;
	uint64_t v1 = boot_info->vtl1_base, v1e = v1 + boot_info->vtl1_size, mem = boot_info->mem_size;
	struct list_page *l = &lists[0];
	list_reset(l, NULL);
	list_add(l, 0, ts, R | W);
	list_add(l, ts, te, R | X | IMM);
	uint64_t ro_end = end_of_boot ? (uint64_t)_ro_after_init_end : (uint64_t)_ro_after_init_start;
	list_add(l, te, ro_end, R);
	if ((uint64_t)_data_start > ro_end)
		list_add(l, ro_end, (uint64_t)_data_start, R | W);
	list_add(l, (uint64_t)_data_start, v1, R | W);
	if (mem > v1e)
		list_add(l, v1e, mem, R | W);
	return protect(l);
}

void heki_harden(const char *name, int end_of_boot)
{
	paging_set_nx_except((uint64_t)_text_start, (uint64_t)_text_end);   /* own tables, as mark_readonly */
	heki_still_served(name);
	heki_lock_crs(name);
	heki_check(name, "heki_protect", KVM_HC_PROTECT_MEMORY, "protect memory (text r-x immutable, rodata r--)",
		   heki_protect_kernel(end_of_boot), 0);
}

/* The end of boot for a kernel that hardened with end_of_boot = 0: ro_after_init R--, as
 * heki_late_init gives it after mark_readonly (where VTL mode calls VTL_CALL_END_OF_BOOT). */
void heki_end_of_boot(const char *name)
{
	list_reset(&lists[0], NULL);
	list_add(&lists[0], (uint64_t)_ro_after_init_start, (uint64_t)_ro_after_init_end, R);
	heki_check(name, "heki_ro_after_init", KVM_HC_PROTECT_MEMORY, "protect ro_after_init r--",
		   protect(&lists[0]), 0);
}

/* `vtl run --mode heki` (scenario boot): harden, the version still answers. */
void heki_boot(void)
{
	heki_harden("boot", 1);
	heki_still_served("boot");
	pass("boot");
}

/* ---- hostile hypercalls: one rule per case (param = case; 0 = every case in turn) ----
 * Each reports STATUS <case> (code = hypercall number, value = RAX) and, for the memory
 * cases, VALUE heki_target (the page the request would protect), then writes
 * HEKI_MARK there: the VMM reads the page back to see whether anything was protected. */
#define HEKI_MARK 0x48454B494D41524BULL
static uint64_t target[512] __attribute__((aligned(4096)));
static uint64_t target2[512] __attribute__((aligned(4096)));

struct heki_case {
	const char *name;
	uint64_t want;
};

static void write_target(void *p) { *(volatile uint64_t *)p = HEKI_MARK; }

static void touch(const char *name, uint64_t *page)
{
	struct fault_info fi;
	int faulted = try_run(write_target, page, &fi);
	report_value(faulted ? "target_write_faulted" : "target_write_landed", (uint64_t)page);
	if (faulted)
		report_fault(name, &fi);
}

static uint64_t one_entry(uint64_t pa, uint64_t epa, uint64_t perms)
{
	list_reset(&lists[0], NULL);
	list_add(&lists[0], pa, epa, perms);
	return protect(&lists[0]);
}

static uint64_t run_case(int c, const char **name)
{
	uint64_t t = (uint64_t)target, mem = boot_info->mem_size;
	switch (c) {
	case 1: *name = "version"; return lock_cr(0, 0, KVM_LOCK_CR_UPDATE_VERSION);
	case 2: *name = "version_with_cr"; return lock_cr(4, 0, KVM_LOCK_CR_UPDATE_VERSION);
	case 3: *name = "version_with_pin"; return lock_cr(0, CR0_WP, KVM_LOCK_CR_UPDATE_VERSION);
	case 4: *name = "unknown_flags"; return lock_cr(0, CR0_WP, 2);
	case 5: *name = "bad_cr"; return lock_cr(3, CR0_WP, 0);
	case 6: *name = "cr_over_u32"; return lock_cr(UINT64_C(1) << 32, CR0_WP, 0);
	case 7: *name = "pin_zero"; return lock_cr(0, 0, 0);
	case 8: *name = "cr0_without_wp"; return lock_cr(0, CR0_PE, 0);
	case 9: *name = "cr0_not_in_host"; return lock_cr(0, CR0_WP | CR0_CD, 0);
	case 10: *name = "cr4_outside_mask"; return lock_cr(4, CR4_SMEP | CR4_PAE, 0);
	case 11: *name = "list_bad_gpa"; return protect((void *)(UINT64_C(1) << 40));
	case 12: *name = "list_in_vtl1_hole"; return protect((void *)boot_info->vtl1_base);
	case 13:
		*name = "list_loop";
		list_reset(&lists[0], &lists[0]);          /* next_pa: itself */
		list_add(&lists[0], t, t + 4096, R);
		return protect(&lists[0]);
	case 14:
		*name = "list_loop_two";
		list_reset(&lists[0], &lists[1]);
		list_reset(&lists[1], &lists[0]);
		list_add(&lists[0], t, t + 4096, R);
		return protect(&lists[0]);
	case 15:
		*name = "npages_huge";
		list_reset(&lists[0], NULL);
		list_add(&lists[0], t, t + 4096, R);
		lists[0].h.npages = UINT64_C(1) << 40;
		return protect(&lists[0]);
	case 16:
		*name = "npages_over_page";        /* 170 entries: past the list's page, in memory */
		list_reset(&lists[0], NULL);
		for (int i = 0; i < (int)LIST_ENTRIES; i++)
			list_add(&lists[0], t, t + 4096, R);
		lists[0].h.npages = LIST_ENTRIES + 1;
		{
			struct heki_pages extra = { t, t + 4096, R };   /* the 170th entry, valid too */
			memcpy(lists[0].pad, &extra, sizeof(extra));    /* runs into lists[1] */
		}
		return protect(&lists[0]);
	case 17: *name = "entry_outside_memory"; return one_entry(mem, mem + 4096, R);
	case 18: *name = "entry_in_vtl1_hole"; return one_entry(boot_info->vtl1_base, boot_info->vtl1_base + 4096, R);
	case 19: *name = "entry_misaligned"; return one_entry(t + 8, t + 4096, R);
	case 20: *name = "entry_empty"; return one_entry(t, t, R);
	case 21: *name = "perm_zero"; return one_entry(t, t + 4096, 0);
	case 22: *name = "perm_unknown"; return one_entry(t, t + 4096, R | 0x10);
	case 23:
		*name = "all_or_nothing";           /* a good entry, then a bad one */
		list_reset(&lists[0], NULL);
		list_add(&lists[0], t, t + 4096, R);
		list_add(&lists[0], t + 4096, t + 8192, 0);
		return protect(&lists[0]);
	case 24:
		*name = "all_or_nothing_lists";     /* a good list, then one outside memory */
		list_reset(&lists[0], NULL);
		list_add(&lists[0], t, t + 4096, R);
		lists[0].h.next_pa = mem;
		return protect(&lists[0]);
	case 25: {
		*name = "immutable_then_change";
		uint64_t st = one_entry(t, t + 4096, R | IMM);
		report_status("immutable_first", KVM_HC_PROTECT_MEMORY, st);
		return one_entry(t, t + 4096, R | W);
	}
	case 26: *name = "no_exec"; return one_entry((uint64_t)target2, (uint64_t)target2 + 4096, R | W);
	case 27: *name = "cr4_host_lacks_cet"; return lock_cr(4, CR4_CET, 0);
	case 28: {
		*name = "pins_or_only";
		uint64_t st = lock_cr(4, CR4_SMEP, 0);
		report_status("pin_smep", KVM_HC_LOCK_CR_UPDATE, st);
		return lock_cr(4, CR4_SMAP, 0);
	}
	case 29:
		*name = "too_many_pages";          /* 169 entries of 16 MiB each: past the budget */
		list_reset(&lists[0], NULL);
		for (int i = 0; i < (int)LIST_ENTRIES; i++)
			list_add(&lists[0], 0, boot_info->vtl1_base, R);
		return protect(&lists[0]);
	default: *name = NULL; return 0;
	}
}

SCENARIO(sc_heki_hc, "heki-hypercalls", "Heki mode: the Heki hypercalls with bad arguments (param = case, 0 = all)")
{
	const char *name = "heki-hypercalls";
	if (!heki_mode())
		fail(name, "needs --mode heki");
	report_value("heki_target", (uint64_t)target);
	report_value("heki_target2", (uint64_t)target2);
	report_value("cr0_before", read_cr0());
	report_value("cr4_before", read_cr4());
	int first = boot_info->param ? (int)boot_info->param : 1;
	int last = boot_info->param ? first : 1000;
	for (int c = first; c <= last; c++) {
		const char *key = NULL;
		uint64_t st = run_case(c, &key);
		if (!key)
			break;
		report_status(key, (c >= 11 && c <= 26) || c == 29 ? KVM_HC_PROTECT_MEMORY : KVM_HC_LOCK_CR_UPDATE, st);
		printf("case %d %s -> %ld\n", c, key, (int64_t)st);
		touch(key, target);
	}
	touch("target2", target2);
	report_value("cr0_after", read_cr0());
	report_value("cr4_after", read_cr4());
	pass(name);
}
