/* VTL1's policy for VTL0 (issues 3, 9 and 10).  VTL1 keeps its own view of every VTL0
 * page (attributes it applied + policy flags), asks the VMM to apply attributes through
 * VTL_HC_MODIFY_VTL_PROTECTION, and from VTL_CALL_LOCK_PAGE_TABLES on judges VTL0's
 * register writes (register intercepts, MSR intercepts).  Invariants it keeps whatever
 * VTL0 asks (docs/writing-guests.md, "VTL1's policy"):
 *   - no page VTL0 can write is ever executable (W^X), at every step: at the lock every
 *     executable mapping must be of a page VTL0 cannot write (whatever VTL1's NX says:
 *     where the host has no NX memory attribute the tables alone decide), and from then
 *     on an executable page never becomes writable; a module area (mapped executable,
 *     kept NW|NX by VTL1) is filled by VTL1 only, and gets X only through MODULE_LOAD
 *     after its bytes were authenticated against the allowlist and scanned; pages a
 *     module occupied without being mapped executable (rw- NX ones VTL0 filled) lose X
 *     (NW|NX) at MODULE_UNLOAD before they get W back;
 *   - an immutable page never changes again, but for the two VTL1 releases: a loaded
 *     module's pages at MODULE_UNLOAD, a sealed kexec image's at KEXEC_UNLOAD or a
 *     refused KEXEC_VALIDATE (back to exactly what they were), and everything at a kexec
 *     (the new kernel's protections replace the old one's before its first instruction);
 *   - VTL1 writes into VTL0 memory only where VTL0 itself may write, and reads VTL0
 *     buffers once, into its own memory, before it checks them (vtl0_write/vtl0_read);
 *     what it authenticates (kexec segments, modules) it seals NW first and reads after;
 *   - a flag that grants anything (VTL_PROTECT_AUDIT) lives only as long as the
 *     protection it came with, and never grants access to immutable, executable,
 *     page-table or privileged-section pages;
 *   - from the lock on, CR0.PE/WP/PG, CR4 (all but MCE/PGE/PCE/VMXE), CR3 (locked root),
 *     XCR0, GDTR/IDTR/LDTR/TR and EFER keep their values, and what GDTR/IDTR/LDTR/TR
 *     load (GDT, IDT, TSS, LDT: base, limit and contents) stays as it was: LLDT/LTR are
 *     judged by the descriptor's base and limit, the tables' pages are immutable, and
 *     no gate, handler, stack or table lies in the privileged section; the syscall MSRs from
 *     END_OF_BOOT; every value VTL1 allows is checked first (canonical, reserved bits);
 *     CR0/CR4/EFER/XCR0 stay pinned across a kexec with the persist policy ("carried");
 *   - nothing touching VTL1's region, no protection change after END_OF_BOOT but
 *     through the authenticated paths (modules, kexec). */
#include "lib.h"
#include "vtl1.h"

#define PTE_P (1ULL << 0)
#define PTE_PS (1ULL << 7)
#define PTE_NX (1ULL << 63)
#define PTE_ADDR 0x000FFFFFFFFFF000ULL
#define CR0_NE (1ULL << 5)
#define CR0_NW (1ULL << 29)
#define CR0_CD (1ULL << 30)
#define CR4_LA57 (1ULL << 12)
#define CR4_PCIDE (1ULL << 17)
#define CR3_PWT (1ULL << 3)
#define CR3_PCD (1ULL << 4)

/* What VTL1 judges (VTL_HC_SET_INTERCEPT_CONTROL), as LVBS's VTL1 pins them. */
#define CR0_PINNED (CR0_PE | CR0_WP | CR0_PG)
#define CR4_PINNED (~(CR4_MCE | CR4_PGE | CR4_PCE | CR4_VMXE))
/* The CR4 bits the architecture defines (VME..SMXE, FSGSBASE..PKS, LAM_SUP): the mask
 * VTL1 hands the VMM names only those (a write setting a reserved bit is the #GP the VMM
 * raises as the CPU would, before any judging). */
#define CR4_DEFINED 0x13FF7FFFULL
#define MAX_ROOTS 1                     /* CR3: the root VTL0 had at the lock */
#define MAX_XLEAVES 8192                /* executable leaf mappings the lock can scan */

static uint8_t page[MAX_PAGES] __attribute__((used));   /* attrs | F_* per VTL0 page */
static int boot_over, locked;
/* Pinned CR0/CR4/EFER/XCR0 carried over a kexec with the persist policy: enforced
 * from the new kernel's first instruction, before it locks anything itself. */
static int carried;
/* Pages the locked tables map executable but VTL1 keeps NX (a module area): not
 * executable for VTL0, and only MODULE_LOAD (authenticated, scanned) drops their NX. */
static uint8_t xmapped[MAX_PAGES / 8];
static uint64_t list_buf[VTL_PROTECT_MAX_PER_CALL];
static struct vtl_protect_request req;
uint64_t audit_allowed;

/* VTL0's privileged section, as named at the first lock (0 pages: none): the partition's,
 * as its memory is (every VP's lock names the same). */
static uint64_t priv_gpa, priv_pages;
/* The page-table roots the first lock locked: every VP's CR3 must be one of them. */
static uint64_t roots[MAX_ROOTS];
static int nroots;
/* The section is NR for VTL0 and the VMM decodes it (the first lock's register pinning
 * succeeded): each VP's own lock then asks the VMM to judge that VP's register writes. */
static int section_judged;
/* Registers are private to each VP, so their pins are per VP (docs/smp.md): each VP's
 * VTL0 locks its own (VTL_CALL_LOCK_PAGE_TABLES on that VP), judged against its own
 * pins from then on; END_OF_BOOT waits for every AP VTL1 started. */
struct vp_pins {
	int locked;             /* this VP's registers are pinned (its own lock) */
	int pinning;            /* VTL_HC_SET_INTERCEPT_CONTROL succeeded for this VP */
	uint64_t cr0, cr4, efer, xcr0, gdtr, idtr, ldtr, tr;
	int have_xcr0, have_gdtr, have_idtr, have_ldtr, have_tr;
	/* What the descriptor-table registers load, read from the VMM at the lock: a
	 * pinned register is judged by its base and limit, not only by its value. */
	uint64_t gdtr_limit, idtr_limit, ldtr_base, ldtr_limit, tr_base, tr_limit;
	int have_tables;
};
static struct vp_pins pins[VTL1_MAX_VPS];
/* APs VTL1 started (VTL_CALL_START_AP accepted by the VMM): online from then on, so
 * END_OF_BOOT waits for their locks even before their VTL1 has come up. */
static uint8_t started[VTL1_MAX_VPS];

static struct vp_pins *my_pins(void) { return &pins[this_vp()]; }
static struct vtl_intercept_control ictl;

static uint64_t npages(void) { return bi->mem_size >> 12; }

static int in_priv(uint64_t gpa)
{
	return priv_pages && gpa >= priv_gpa && gpa - priv_gpa < (priv_pages << 12);
}

static int valid_attrs(uint64_t a)
{
	return !(a & ~7ULL) && (!(a & VTL_MEM_NR) || a == 7);
}

/* ---- VTL1's only ways into VTL0 memory on VTL0's behalf --------------------------------
 * Every VTL call that writes results into VTL0 memory (call output buffers, register
 * dumps, measurements) goes through vtl0_write: VTL1 writes only where VTL0 itself may
 * write, judged by VTL1's own attribute map, so VTL0 cannot make VTL1 its deputy against
 * immutable text or rodata, locked page tables or the privileged section.  Every VTL0
 * buffer VTL1 acts on is copied once into VTL1 memory by vtl0_read and checked there. */
static int vtl0_writable(uint64_t gpa, uint64_t len)
{
	if (len == 0 || !in_vtl0(gpa, len))
		return 0;
	for (uint64_t p = gpa >> 12; p <= (gpa + len - 1) >> 12; p++)
		if ((page[p] & (VTL_MEM_NW | F_IMMUTABLE | F_TABLE | F_EXEC)) || in_priv(p << 12))
			return 0;
	return 1;
}

uint64_t vtl0_write(uint64_t gpa, const void *src, uint64_t len)
{
	if (!in_vtl0(gpa, len))
		return VTL_E_INVALID_ARG;
	if (!vtl0_writable(gpa, len)) {
		printf("refused: VTL0 may not write %lu bytes at %#lx, so VTL1 does not either\n", len, gpa);
		return VTL_E_ACCESS_DENIED;
	}
	memcpy((void *)gpa, src, len);
	return VTL_OK;
}

uint64_t vtl0_read(void *dst, uint64_t gpa, uint64_t len)
{
	if (len == 0 || !in_vtl0(gpa, len))
		return VTL_E_INVALID_ARG;
	for (uint64_t p = gpa >> 12; p <= (gpa + len - 1) >> 12; p++)
		if (page[p] & VTL_MEM_NR)
			return VTL_E_ACCESS_DENIED;
	memcpy(dst, (const void *)gpa, len);
	return VTL_OK;
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
	if ((flags & VTL_PROTECT_AUDIT) && (flags & VTL_PROTECT_IMMUTABLE))
		return VTL_E_INVALID_ARG;       /* an immutable page grants nothing */
	/* A module area (mapped executable at the lock, VTL1 keeps it NW|NX) changes only
	 * through MODULE_LOAD, which authenticates and scans it first, and grants nothing:
	 * looked up only for requests where it matters, outside the per-page loop below
	 * (every instruction in it costs ~1 us per page on this host). */
	int area_matters = locked && ((flags & VTL_PROTECT_AUDIT) || (attrs & (VTL_MEM_NW | VTL_MEM_NX)) !=
				       (VTL_MEM_NW | VTL_MEM_NX));
	for (uint64_t i = 0; i < pages; i++) {
		uint8_t p = page[(gpa >> 12) + i];
		if ((p & F_IMMUTABLE) && (p & ATTR_MASK) != attrs)
			return VTL_E_IMMUTABLE;
		if ((flags & VTL_PROTECT_AUDIT) && (p & (F_IMMUTABLE | F_TABLE | F_EXEC)))
			return VTL_E_IMMUTABLE;
		/* W^X after the lock: a page the locked tables map executable stays unwritable. */
		if ((p & F_EXEC) && !(attrs & VTL_MEM_NW))
			return VTL_E_POLICY;
	}
	for (uint64_t i = 0; area_matters && i < pages; i++)
		if (policy_xmapped(gpa + (i << 12)))
			return (flags & VTL_PROTECT_AUDIT) ? VTL_E_IMMUTABLE : VTL_E_POLICY;
	if ((flags & VTL_PROTECT_AUDIT) && !(attrs & VTL_MEM_NX))
		return VTL_E_POLICY;            /* audit never on code */
	return VTL_OK;
}

/* A page's protection changed: its flags are the request's.  VTL_PROTECT_AUDIT is
 * cleared by any change that does not ask for it again (no stale grant survives). */
/* The page range that may hold F_AFTER_BOOT (only record() sets it): END_OF_BOOT looks
 * there, not at every page (~1 us per page on this host). */
static uint64_t after_boot_lo = ~0ULL, after_boot_hi;

static void record(uint64_t gpa, uint64_t pages, uint64_t attrs, uint64_t flags)
{
	if (flags & VTL_PROTECT_AFTER_BOOT) {
		if ((gpa >> 12) < after_boot_lo)
			after_boot_lo = gpa >> 12;
		if ((gpa >> 12) + pages > after_boot_hi)
			after_boot_hi = (gpa >> 12) + pages;
	}
	uint8_t f = (flags & VTL_PROTECT_IMMUTABLE ? F_IMMUTABLE : 0) |
		    (flags & VTL_PROTECT_AFTER_BOOT ? F_AFTER_BOOT : 0) |
		    (flags & VTL_PROTECT_AUDIT ? F_AUDIT : 0);
	for (uint64_t i = 0; i < pages; i++) {
		uint8_t *p = &page[(gpa >> 12) + i];
		*p = (uint8_t)((*p & ~(ATTR_MASK | F_AUDIT)) | attrs | f);
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
	if (!valid_attrs(attrs) || (flags & ~7ULL) || count == 0 || count > VTL_PROTECT_MAX_PER_CALL)
		return VTL_E_INVALID_ARG;
	/* Copied once: VTL0 cannot change the list between the check and the use. */
	uint64_t st = vtl0_read(list_buf, list, count * 8);
	if (st != VTL_OK)
		return VTL_E_INVALID_ARG;
	for (uint64_t i = 0; i < count; i++) {       /* all or nothing */
		st = check_range(list_buf[i], 1, attrs, flags);
		if (st != VTL_OK)
			return st;
	}
	st = vmm_protect((uint64_t)list_buf, count, attrs, 0);
	if (st == VTL_OK)
		for (uint64_t i = 0; i < count; i++)
			record(list_buf[i], 1, attrs, flags);
	return st;
}

uint64_t policy_get(uint64_t gpa)
{
	return (gpa >> 12) < npages() ? page[gpa >> 12] & ATTR_MASK : 0;
}

/* ---- the lock ------------------------------------------------------------------------
 * Walk VTL0's page tables: every table page becomes read-only for good; every executable
 * mapping must be of a page VTL0 cannot write; every byte VTL0 can execute is scanned for
 * instructions that write CR0/CR3/CR4/XCR0/GDTR/IDTR/LDTR/TR, which may only lie in the
 * privileged section.  Seal first, then read (as for kexec images and modules): VTL0 on
 * another VP runs while VTL1 walks, so each table page is made NW|NX for VTL0 before the
 * walk reads it, and the tree the walk checks is the tree that is locked (docs/smp.md,
 * "Cross-VP attacks").  A refused lock gives every page it sealed its attributes back. */
static uint64_t tables[VTL_PROTECT_MAX_PER_CALL];
static uint64_t ntables, wx_violations, priv_violations, first_priv_violation;
static uint64_t tcopy[4][512] __attribute__((aligned(4096)));
static struct xleaf { uint64_t va, pa, size; } xleaves[MAX_XLEAVES];
static uint64_t nxleaves;
static int xleaves_overflow;

static uint64_t apply_range(uint64_t gpa, uint64_t pages, uint64_t attrs);

/* A page sealed for a lock in progress: NW|NX at the VMM, page[] unchanged until the lock
 * holds (the lock's own checks judge what the page was), put back if it is refused. */
static uint64_t seal_page(uint64_t pa)
{
	if ((page[pa >> 12] & ATTR_MASK) == (VTL_MEM_NW | VTL_MEM_NX))
		return VTL_OK;
	return apply_range(pa, 1, VTL_MEM_NW | VTL_MEM_NX);
}

static void unseal_page(uint64_t pa)
{
	if ((page[pa >> 12] & ATTR_MASK) != (VTL_MEM_NW | VTL_MEM_NX) &&
	    apply_range(pa, 1, page[pa >> 12] & ATTR_MASK) != VTL_OK)
		printf("lock: could not give %#lx its attributes back\n", pa);
}

/* The next table page of the walk: VTL0's, one VTL1 may make read-only for good, sealed
 * before anything of it is read.  VTL_OK, or why the lock is refused. */
static uint64_t add_table(uint64_t pa)
{
	if (!in_vtl0(pa, 4096) || ntables >= VTL_PROTECT_MAX_PER_CALL)
		return VTL_E_INVALID_ARG;
	if (check_range(pa, 1, VTL_MEM_NW | VTL_MEM_NX, 0) != VTL_OK || in_priv(pa))
		return VTL_E_IMMUTABLE;
	uint64_t st = seal_page(pa);
	if (st != VTL_OK)
		return st;
	tables[ntables++] = pa;
	return VTL_OK;
}

static void unseal_tables(void)
{
	for (uint64_t i = 0; i < ntables; i++)
		unseal_page(tables[i]);
	ntables = 0;
}

static void check_exec(uint64_t va, uint64_t pa, uint64_t size)
{
	if (nxleaves < MAX_XLEAVES)
		xleaves[nxleaves++] = (struct xleaf){ va, pa, size };
	else
		xleaves_overflow = 1;
	for (uint64_t off = 0; off < size; off += 4096) {
		uint64_t p = pa + off;
		if ((p >> 12) >= npages() || !in_vtl0(p, 4096))
			continue;       /* not VTL0 memory: nothing VTL0 can run there */
		uint8_t a = page[p >> 12];
		/* Whatever VTL1's NX says: on a host without an NX memory attribute (`vtl caps`)
		 * the tables alone decide what runs.  A page the tables map executable that VTL1
		 * keeps NW|NX is a module area, which only VTL1 fills (MODULE_VALIDATE). */
		if (!(a & VTL_MEM_NW)) {
			if (wx_violations++ < 4)
				printf("lock: executable mapping of %#lx, which VTL0 may write\n", p);
		}
	}
}

/* Byte `off` of the executable stream that starts at leaf k, continuing into the next
 * leaves while their virtual addresses follow on; -1 where VTL0 could not fetch it. */
static int stream_byte(uint64_t k, uint64_t off, uint64_t *pa)
{
	while (off >= xleaves[k].size) {
		if (k + 1 >= nxleaves || xleaves[k + 1].va != xleaves[k].va + xleaves[k].size)
			return -1;
		off -= xleaves[k].size;
		k++;
	}
	*pa = xleaves[k].pa + off;
	if (!in_vtl0(*pa, 1))
		return -1;
	return *(const volatile uint8_t *)*pa;
}

/* A 0F byte at offset off of leaf k: is it the start of MOV to CRn (0F 22 /r), CLTS
 * (0F 06), LGDT/LIDT/LMSW (0F 01 /2 /3 /6, which also covers XSETBV and XGETBV),
 * LLDT/LTR (0F 00 /2 /3)?  Any ModRM.mod and any prefixes: the scanner is
 * conservative.  Allowed only if every opcode byte is in the privileged section. */
/* The rule, for the lock's scan and policy_scan_range alike: after a 0F byte, the bytes
 * b1, b2 (-1: not fetchable) make a privileged write of this many bytes, or 0. */
static int priv_match(int b1, int b2)
{
	int reg = (b2 >> 3) & 7;
	if (b1 == 0x06)
		return 2;
	if (b1 == 0x22 && b2 >= 0)
		return 3;
	if (b1 == 0x01 && b2 >= 0 && (reg == 2 || reg == 3 || reg == 6))
		return 3;
	if (b1 == 0x00 && b2 >= 0 && (reg == 2 || reg == 3))
		return 3;
	return 0;
}

static void check_opcode(uint64_t k, uint64_t off)
{
	uint64_t pa0 = xleaves[k].pa + off, pa1 = 0, pa2 = 0;
	int b1 = stream_byte(k, off + 1, &pa1);
	int b2 = stream_byte(k, off + 2, &pa2);
	int len = priv_match(b1, b2);
	if (!len)
		return;
	if (in_priv(pa0) && in_priv(pa1) && (len == 2 || in_priv(pa2)))
		return;
	uint64_t va = xleaves[k].va + off;
	if (priv_violations++ == 0)
		first_priv_violation = va;
	if (priv_violations <= 4)
		printf("lock: privileged instruction %02x %02x %02x at %#lx (GPA %#lx), outside the "
		       "privileged section\n", 0x0F, b1, len == 3 ? b2 : 0, va, pa0);
}

/* This host emulates every guest instruction (~0.7 us each), so the scan is written for
 * instruction count: a word at a time, a mask of its bytes that may be 0x0F, and only a
 * 0x0F followed by 00, 01, 06 or 22 goes on to the full check. */
/* Offset of the next 0x0F byte in p[0..n), or n: one REPNE SCASB.  This host emulates
 * every guest instruction (~0.7 us each) but runs the repeats of a string instruction
 * in one go: twice as fast here as a word-at-a-time loop, and still fast on hardware. */
static uint64_t find_0f(const uint8_t *p, uint64_t n)
{
	const uint8_t *d = p;
	uint64_t c = n;
	asm volatile("repne scasb" : "+D"(d), "+c"(c) : "a"(0x0F) : "cc", "memory");
	if (d == p + n && (n == 0 || p[n - 1] != 0x0F))
		return n;
	return (uint64_t)(d - p) - 1;
}

static uint64_t scan_executable(void)
{
	uint64_t scanned = 0;
	for (uint64_t k = 0; k < nxleaves; k++) {
		for (uint64_t off = 0; off < xleaves[k].size; off += 4096) {
			uint64_t pa = xleaves[k].pa + off;
			if (!in_vtl0(pa, 4096))
				continue;
			scanned++;
			const uint8_t *b = (const uint8_t *)pa;
			for (uint64_t o = find_0f(b, 4096); o < 4096; o += 1 + find_0f(b + o + 1, 4095 - o)) {
				if (o < 4095) {
					uint8_t b1 = b[o + 1];
					if (b1 != 0x22 && b1 != 0x06 && b1 != 0x01 && b1 != 0x00)
						continue;
				}
				check_opcode(k, off + o);
			}
		}
	}
	return scanned;
}

static uint64_t walk(uint64_t root)
{
	uint64_t st;
	ntables = wx_violations = priv_violations = nxleaves = 0;
	xleaves_overflow = 0;
	if ((st = add_table(root)) != VTL_OK)
		return st;
	memcpy(tcopy[3], (void *)root, 4096);
	for (uint64_t i4 = 0; i4 < 512; i4++) {
		uint64_t e4 = tcopy[3][i4];
		if (!(e4 & PTE_P))
			continue;
		uint64_t pdpt = e4 & PTE_ADDR;
		if ((st = add_table(pdpt)) != VTL_OK)
			return st;
		memcpy(tcopy[2], (void *)pdpt, 4096);
		for (uint64_t i3 = 0; i3 < 512; i3++) {
			uint64_t e3 = tcopy[2][i3];
			if (!(e3 & PTE_P))
				continue;
			if (e3 & PTE_PS)
				return VTL_E_POLICY;    /* 1 GiB pages: not supported by the check */
			uint64_t pd = e3 & PTE_ADDR;
			if ((st = add_table(pd)) != VTL_OK)
				return st;
			memcpy(tcopy[1], (void *)pd, 4096);
			for (uint64_t i2 = 0; i2 < 512; i2++) {
				uint64_t e2 = tcopy[1][i2];
				if (!(e2 & PTE_P))
					continue;
				int nx2 = !!((e4 | e3 | e2) & PTE_NX);
				uint64_t va2 = (i4 >= 256 ? 0xFFFF000000000000ULL : 0) | (i4 << 39) | (i3 << 30) |
					       (i2 << 21);
				if (e2 & PTE_PS) {
					if (!nx2)
						check_exec(va2, e2 & PTE_ADDR & ~0x1FFFFFULL, 2ULL << 20);
					continue;
				}
				uint64_t pt = e2 & PTE_ADDR;
				if ((st = add_table(pt)) != VTL_OK)
					return st;
				memcpy(tcopy[0], (void *)pt, 4096);
				for (uint64_t i1 = 0; i1 < 512; i1++) {
					uint64_t e1 = tcopy[0][i1];
					if ((e1 & PTE_P) && !nx2 && !(e1 & PTE_NX))
						check_exec(va2 | (i1 << 12), e1 & PTE_ADDR, 4096);
				}
			}
		}
	}
	return VTL_OK;
}

static uint64_t vp_reg(uint64_t reg, uint64_t *v)
{
	return hypercall(VTL_HC_GET_VP_REGISTER, this_vp(), reg, 0, v);   /* this VP's VTL0 */
}

static uint64_t set_intercept_control(uint32_t flags)
{
	memset(&ictl, 0, sizeof(ictl));
	ictl.flags = flags;
	if (flags) {
		ictl.cr0_mask = CR0_PINNED;
		ictl.cr4_mask = CR4_PINNED & CR4_DEFINED;
		ictl.priv_gpa = priv_gpa;
		ictl.priv_pages = priv_pages;
	}
	return hypercall(VTL_HC_SET_INTERCEPT_CONTROL, (uint64_t)&ictl, 0, 0, NULL);
}

/* ---- the memory pinned registers read ---------------------------------------------
 * GDTR, IDTR, LDTR and TR take effect through memory: the GDT (descriptors LLDT/LTR
 * load), the IDT (gates: where every exception and interrupt goes), the TSS (RSP0 and
 * the IST stacks) and the LDT.  At the lock VTL1 checks them through the locked tables
 * and makes their pages NW|NX and immutable, so that what a pinned register loads can
 * never change; and no gate, handler, IST or RSP0 stack, and no table itself, may lie
 * in the privileged section (a step there maps the section: register-intercepts.md). */
#define MAX_DESC_PAGES 64
static uint64_t desc_pages[MAX_DESC_PAGES];
static uint64_t ndesc, desc_violations;

/* VTL0's translation of `va` through the tables at `root` (the walk above made sure
 * they are VTL0 memory); 0 if not mapped. */
static int vtl0_translate(uint64_t root, uint64_t va, uint64_t *pa)
{
	uint64_t t = root;
	for (int shift = 39; shift >= 12; shift -= 9) {
		if (!in_vtl0(t, 4096))
			return 0;
		uint64_t e = ((const volatile uint64_t *)t)[(va >> shift) & 511];
		if (!(e & PTE_P))
			return 0;
		if (shift == 21 && (e & PTE_PS)) {
			*pa = (e & PTE_ADDR & ~0x1FFFFFULL) | (va & 0x1FFFFF);
			return 1;
		}
		t = e & PTE_ADDR;
	}
	*pa = t | (va & 0xFFF);
	return 1;
}

static void desc_violation(const char *what, uint64_t va)
{
	if (desc_violations++ < 4)
		printf("lock: %s at %#lx lies in the privileged section\n", what, va);
}

/* [va, va+len) of a table a pinned register reads: every page mapped, VTL0's, outside
 * the section; recorded for protection.  0 = refused. */
static int desc_range(uint64_t root, uint64_t va, uint64_t len, const char *what)
{
	for (uint64_t p = va & ~0xFFFULL; p < va + len; p += 4096) {
		uint64_t pa;
		if (!vtl0_translate(root, p, &pa) || !in_vtl0(pa & ~0xFFFULL, 4096)) {
			printf("lock: the %s page at %#lx is not mapped to VTL0 memory\n", what, p);
			return 0;
		}
		pa &= ~0xFFFULL;
		if (in_priv(pa)) {
			desc_violation(what, p);
			continue;
		}
		int seen = 0;
		for (uint64_t i = 0; i < ndesc; i++)
			seen |= desc_pages[i] == pa;
		if (seen)
			continue;
		if (ndesc >= MAX_DESC_PAGES) {
			printf("lock: descriptor tables span more than %d pages\n", MAX_DESC_PAGES);
			return 0;
		}
		desc_pages[ndesc++] = pa;
	}
	return 1;
}

/* A code or stack address the CPU may reach through a gate: not in the section. */
static void desc_address(uint64_t root, uint64_t va, uint64_t len, const char *what)
{
	for (uint64_t a = va; ; a = (a | 0xFFF) + 1) {
		uint64_t pa;
		if (vtl0_translate(root, a, &pa) && in_priv(pa)) {
			desc_violation(what, va);
			return;
		}
		if ((a | 0xFFF) >= va + len - 1)
			return;
	}
}

static uint64_t read_u64_va(uint64_t root, uint64_t va, int *ok)
{
	uint64_t v = 0, pa;
	if ((va & 0xFFF) <= 0xFF8) {         /* one page: one walk (each costs ~50 instructions) */
		*ok = vtl0_translate(root, va, &pa) && in_vtl0(pa, 8);
		return *ok ? *(const volatile uint64_t *)pa : 0;
	}
	for (int i = 0; i < 8; i++) {
		if (!vtl0_translate(root, va + i, &pa) || !in_vtl0(pa, 1)) {
			*ok = 0;
			return 0;
		}
		v |= (uint64_t)*(const volatile uint8_t *)pa << (8 * i);
	}
	*ok = 1;
	return v;
}

/* The pages of the tables the pinned registers read (desc_pages[]): mapped, VTL0's.
 * Nothing of what they hold is read yet: desc_contents does, once they are sealed. */
static uint64_t desc_collect(const struct vp_pins *pin, uint64_t root)
{
	ndesc = desc_violations = 0;
	uint64_t gdt = pin->gdtr, idt = pin->idtr, tss = pin->tr_base, ldt = pin->ldtr_base;
	/* An IDT too short for one gate delivers nothing (every event is a triple fault). */
	if (!desc_range(root, gdt, pin->gdtr_limit + 1, "GDT") ||
	    (pin->idtr_limit >= 15 && !desc_range(root, idt, pin->idtr_limit + 1, "IDT")))
		return VTL_E_POLICY;
	if ((pin->tr & ~3ULL) && !desc_range(root, tss, pin->tr_limit + 1, "TSS"))
		return VTL_E_POLICY;
	if ((pin->ldtr & ~3ULL) && !desc_range(root, ldt, pin->ldtr_limit + 1, "LDT"))
		return VTL_E_POLICY;
	return VTL_OK;
}

/* What the sealed tables hold: no stack the TSS names and no gate's handler in the
 * privileged section (nor, desc_collect found, a table itself). */
static uint64_t desc_contents(const struct vp_pins *pin, uint64_t root)
{
	uint64_t idt = pin->idtr, tss = pin->tr_base;
	/* The stacks the TSS names: RSP0-2 and IST1-7 (the frame below each top). */
	for (uint64_t slot = 0; (pin->tr & ~3ULL) && slot < 10; slot++) {
		uint64_t off = 4 + 8 * (slot < 3 ? slot : slot + 1);
		if (off + 8 > pin->tr_limit + 1)
			break;
		int ok;
		uint64_t top = read_u64_va(root, tss + off, &ok);
		if (ok && top)
			desc_address(root, top - 64, 64, slot < 3 ? "an RSP0-2 stack" : "an IST stack");
	}
	/* Every gate's handler (its first 15 bytes). */
	for (uint64_t v = 0; v < 256 && 16 * v + 15 <= pin->idtr_limit; v++) {
		int ok1, ok2;
		uint64_t lo = read_u64_va(root, idt + 16 * v, &ok1), hi = read_u64_va(root, idt + 16 * v + 8, &ok2);
		uint64_t type = (lo >> 40) & 0xF;
		if (!ok1 || !ok2 || !((lo >> 47) & 1) || (type != 0xE && type != 0xF))
			continue;
		uint64_t target = (lo & 0xFFFF) | ((lo >> 48) & 0xFFFF) << 16 | (hi & 0xFFFFFFFFULL) << 32;
		desc_address(root, target, 15, "an IDT gate's handler");
	}
	if (desc_violations) {
		report_value("lock_idt_violations", desc_violations);
		printf("lock refused: %lu descriptor-table entries lead into the privileged section\n",
		       desc_violations);
		return VTL_E_POLICY;
	}
	return VTL_OK;
}

/* The registers a lock pins, as the VMM reads them for the calling VP (whose VTL0 is
 * stopped while its VTL1 runs), into `n`; VTL_OK, or why there is no lock. */
static uint64_t read_pins(struct vp_pins *n, uint64_t *cr3)
{
	if (vp_reg(VTL_REG_CR0, &n->cr0) != VTL_OK || vp_reg(VTL_REG_CR3, cr3) != VTL_OK ||
	    vp_reg(VTL_REG_CR4, &n->cr4) != VTL_OK || vp_reg(VTL_REG_EFER, &n->efer) != VTL_OK)
		return VTL_E_INVALID_ARG;
	n->have_tables = 0;
	if (vp_reg(VTL_REG_GDTR, &n->gdtr) != VTL_OK || vp_reg(VTL_REG_IDTR, &n->idtr) != VTL_OK ||
	    vp_reg(VTL_REG_LDTR, &n->ldtr) != VTL_OK || vp_reg(VTL_REG_TR, &n->tr) != VTL_OK ||
	    vp_reg(VTL_REG_GDTR_LIMIT, &n->gdtr_limit) != VTL_OK ||
	    vp_reg(VTL_REG_IDTR_LIMIT, &n->idtr_limit) != VTL_OK ||
	    vp_reg(VTL_REG_LDTR_BASE, &n->ldtr_base) != VTL_OK ||
	    vp_reg(VTL_REG_LDTR_LIMIT, &n->ldtr_limit) != VTL_OK ||
	    vp_reg(VTL_REG_TR_BASE, &n->tr_base) != VTL_OK || vp_reg(VTL_REG_TR_LIMIT, &n->tr_limit) != VTL_OK)
		return VTL_E_INVALID_ARG;   /* a VMM that cannot say what the tables are: no lock */
	if (!(n->efer & EFER_NXE))
		return VTL_E_POLICY;    /* NX bits would mean nothing */
	if ((n->cr0 & CR0_PINNED) != CR0_PINNED)
		return VTL_E_POLICY;    /* pinning WP clear would pin nothing worth having */
	return VTL_OK;
}

/* The descriptor-table pages desc_collect found become NW|NX (immutable), but
 * those VTL0 cannot write already (its text, rodata, or sealed by an earlier lock): they
 * must be data VTL1 may seal.  The pages to seal go to seal[]. */
static uint64_t seal[MAX_DESC_PAGES];
static uint64_t nsealed;                /* of seal[], sealed by the lock in progress */
static uint64_t desc_to_seal(uint64_t *nseal)
{
	*nseal = 0;
	for (uint64_t i = 0; i < ndesc; i++) {
		uint8_t a = page[desc_pages[i] >> 12];
		if (a & VTL_MEM_NW)
			continue;
		if (a & (F_IMMUTABLE | F_EXEC) || policy_xmapped(desc_pages[i]))
			return VTL_E_IMMUTABLE;
		seal[(*nseal)++] = desc_pages[i];
	}
	return VTL_OK;
}

/* Seal first, then read: the descriptor tables a lock pins are NW|NX for VTL0 before VTL1
 * reads a gate or a stack out of them (VTL0 on another VP runs meanwhile). */
static uint64_t desc_seal(const struct vp_pins *pin, uint64_t root, uint64_t *nseal)
{
	uint64_t st = desc_collect(pin, root);
	if (st == VTL_OK)
		st = desc_to_seal(nseal);
	for (nsealed = 0; st == VTL_OK && nsealed < *nseal; nsealed++)
		st = seal_page(seal[nsealed]);
	if (st == VTL_OK)
		st = desc_contents(pin, root);
	return st;
}

static void unseal_desc(void)
{
	for (uint64_t i = 0; i < nsealed; i++)
		unseal_page(seal[i]);
	nsealed = 0;
}

static int is_root(uint64_t root);
static uint64_t lock(uint64_t sec_gpa, uint64_t sec_pages, uint64_t *pinning_out);
static uint64_t lock_ap(uint64_t sec_gpa, uint64_t sec_pages, uint64_t *pinning_out);

/* VTL_CALL_LOCK_PAGE_TABLES.  The first call (the boot VP's, in the built-in kernel) locks
 * what is the partition's, the page tables and the privileged section, and pins the
 * caller's registers; every later call is another VP pinning its own (lock_ap).  APs may
 * run VTL0 during the first lock's walk: VTL0 is trusted until END_OF_BOOT (design §9),
 * and from the lock on the tables are read-only on every VP. */
uint64_t policy_lock_page_tables(uint64_t sec_gpa, uint64_t sec_pages, uint64_t *pinning_out)
{
	*pinning_out = 0;
	nsealed = 0;
	if (locked) {
		uint64_t st = lock_ap(sec_gpa, sec_pages, pinning_out);
		if (st != VTL_OK)
			unseal_desc();
		return st;
	}
	ntables = 0;
	uint64_t st = lock(sec_gpa, sec_pages, pinning_out);
	if (st != VTL_OK && !locked) {
		unseal_desc();                  /* a refused lock leaves nothing sealed ... */
		unseal_tables();
		priv_gpa = priv_pages = 0;      /* ... and names no section */
	}
	return st;
}

static uint64_t lock(uint64_t sec_gpa, uint64_t sec_pages, uint64_t *pinning_out)
{
	if (boot_over || locked)
		return VTL_E_POLICY;
	/* The privileged section: page aligned, VTL0's, and not writable by VTL0. */
	if (sec_pages) {
		if (sec_gpa & 0xFFF)
			return VTL_E_MISALIGNED;
		if (sec_pages > PRIV_MAX_PAGES || !in_vtl0(sec_gpa, sec_pages << 12))
			return VTL_E_OUT_OF_RANGE;
		for (uint64_t i = 0; i < sec_pages; i++)
			if (!(page[(sec_gpa >> 12) + i] & VTL_MEM_NW))
				return VTL_E_POLICY;
	} else {
		sec_gpa = 0;
	}
	priv_gpa = sec_gpa;
	priv_pages = sec_pages;

	/* This VP's pins, recorded only once the lock holds. */
	struct vp_pins n = *my_pins();
	uint64_t cr3 = 0;
	uint64_t rst = read_pins(&n, &cr3);
	if (rst != VTL_OK)
		return rst;
	uint64_t efer = n.efer;

	uint64_t root = cr3 & PTE_ADDR;
	uint64_t st = walk(root);
	if (st != VTL_OK)
		return st;
	if (xleaves_overflow) {
		printf("lock refused: more than %d executable mappings to scan\n", MAX_XLEAVES);
		return VTL_E_NO_RESOURCES;
	}
	if (wx_violations) {
		report_value("lock_wx_violations", wx_violations);
		printf("lock refused: %lu executable mappings of writable pages\n", wx_violations);
		return VTL_E_POLICY;
	}
	uint64_t t0 = rdtsc();
	uint64_t scanned = scan_executable();
	uint64_t scan_ticks = rdtsc() - t0;
	if (priv_violations) {
		report_value("lock_priv_violations", priv_violations);
		report_value("lock_priv_violation_va", first_priv_violation);
		printf("lock refused: %lu privileged instructions outside the privileged section\n",
		       priv_violations);
		return VTL_E_POLICY;
	}
	uint64_t nseal = 0;
	st = desc_seal(&n, root, &nseal);
	if (st != VTL_OK)
		return st;

	/* Register pinning.  VTL_E_INVALID_CODE: this VMM cannot decode the privileged
	 * section; the section then stays executable for VTL0 and registers are unpinned. */
	int pinning = 0;
	st = set_intercept_control(VTL_ICTL_ALL);
	report_value("set_intercept_control", st);
	if (st == VTL_OK) {
		pinning = 1;
	} else if (st == VTL_E_INVALID_CODE) {
		pinning = 0;
		printf("register pinning unavailable: VTL_HC_SET_INTERCEPT_CONTROL -> %s\n",
		       vtl_status_name(st));
	} else {
		printf("VTL_HC_SET_INTERCEPT_CONTROL refused: %s\n", vtl_status_name(st));
		return st;
	}

	/* The tables and descriptor tables were sealed as the walk and the checks read them:
	 * from here on they are VTL1's record too. */
	for (uint64_t i = 0; i < ntables; i++) {
		record(tables[i], 1, VTL_MEM_NW | VTL_MEM_NX, VTL_PROTECT_IMMUTABLE);
		page[tables[i] >> 12] |= F_TABLE;
	}
	for (uint64_t i = 0; i < nseal; i++)
		record(seal[i], 1, VTL_MEM_NW | VTL_MEM_NX, VTL_PROTECT_IMMUTABLE);
	nsealed = 0;
	n.have_tables = 1;
	for (uint64_t k = 0; k < nxleaves; k++)
		for (uint64_t off = 0; off < xleaves[k].size; off += 4096) {
			uint64_t pa = xleaves[k].pa + off;
			if (!in_vtl0(pa, 4096))
				continue;
			if ((page[pa >> 12] & VTL_MEM_NX) && !in_priv(pa))
				xmapped[pa >> 15] |= (uint8_t)(1u << ((pa >> 12) & 7));
			else
				page[pa >> 12] |= F_EXEC;
		}
	locked = 1;
	/* The privileged section: immutable; NR while the VMM decodes it for VTL1. */
	for (uint64_t i = 0; i < priv_pages; i++)
		page[(priv_gpa >> 12) + i] |= F_IMMUTABLE;
	if (pinning && priv_pages) {
		uint64_t pst = apply_range(priv_gpa, priv_pages, VTL_MEM_NR | VTL_MEM_NW | VTL_MEM_NX);
		if (pst == VTL_OK) {
			record(priv_gpa, priv_pages, VTL_MEM_NR | VTL_MEM_NW | VTL_MEM_NX, VTL_PROTECT_IMMUTABLE);
		} else {
			/* Without an NR section the VMM sees no register write: say so, pin nothing. */
			set_intercept_control(0);
			pinning = 0;
			report_value("set_intercept_control", pst);
		}
	}
	section_judged = pinning;

	/* The values pinned from now on. */
	roots[0] = root;
	nroots = 1;
	if (pinning) {   /* where the VMM reads them; else each intercept's old value is the pin */
		n.have_xcr0 = vp_reg(VTL_REG_XCR0, &n.xcr0) == VTL_OK;
		n.have_gdtr = n.have_idtr = n.have_ldtr = n.have_tr = 1;   /* read above */
	}
	n.pinning = pinning;
	n.locked = 1;
	*my_pins() = n;
	*pinning_out = (uint64_t)pinning;
	report_value("locked_table_pages", ntables);
	report_value("scan_bytes", scanned << 12);     /* every byte VTL0 can execute */
	report_value("scan_ticks", scan_ticks);        /* TSC ticks the scan took */
	report_value("register_pinning", (uint64_t)pinning);
	report_value("descriptor_table_pages", ndesc);
	printf("VTL0 page tables locked: %lu table pages read-only, CR3 %#lx, EFER %#lx pinned; "
	       "%lu executable pages scanned; privileged section %#lx (+%lu pages) %s\n",
	       ntables, cr3, efer, scanned, priv_gpa, priv_pages,
	       pinning ? "NR, registers pinned" : "left executable: register pinning unavailable");
	return VTL_OK;
}

/* An AP's own lock.  The page tables and the privileged section are the partition's,
 * locked by the first lock; what is this VP's is its registers.  The same rules as for
 * the boot VP: EFER.NXE and CR0.PE/WP/PG set, a CR3 that is a root VTL1 locked (its VTL0
 * runs on tables VTL1 checked), descriptor tables sealed with nothing of theirs in the
 * section; then the VMM judges this VP's register writes too (the section is NR already). */
static uint64_t lock_ap(uint64_t sec_gpa, uint64_t sec_pages, uint64_t *pinning_out)
{
	uint32_t vp = this_vp();
	struct vp_pins *pin = my_pins(), n = *pin;
	if (boot_over || pin->locked)
		return VTL_E_POLICY;
	if (!sec_pages)
		sec_gpa = 0;
	if (sec_gpa != priv_gpa || sec_pages != priv_pages) {
		printf("lock refused: VP%u names the section %#lx (+%lu pages), not the partition's "
		       "%#lx (+%lu)\n", vp, sec_gpa, sec_pages, priv_gpa, priv_pages);
		return VTL_E_POLICY;
	}
	uint64_t cr3 = 0;
	uint64_t st = read_pins(&n, &cr3);
	if (st != VTL_OK)
		return st;
	uint64_t root = cr3 & PTE_ADDR;
	if (!is_root(root)) {
		printf("lock refused: VP%u runs on CR3 %#lx, not a root VTL1 locked\n", vp, cr3);
		return VTL_E_POLICY;
	}
	uint64_t nseal = 0;
	st = desc_seal(&n, root, &nseal);
	if (st != VTL_OK)
		return st;
	n.have_tables = 1;
	n.pinning = 0;
	if (section_judged) {
		st = set_intercept_control(VTL_ICTL_ALL);     /* this VP's: the VMM keeps one per VP */
		report_value("set_intercept_control", st);
		if (st == VTL_OK)
			n.pinning = 1;
		else if (st != VTL_E_INVALID_CODE)
			return st;
	}
	if (n.pinning) {
		n.have_xcr0 = vp_reg(VTL_REG_XCR0, &n.xcr0) == VTL_OK;
		n.have_gdtr = n.have_idtr = n.have_ldtr = n.have_tr = 1;
	}
	for (uint64_t i = 0; i < nseal; i++)
		record(seal[i], 1, VTL_MEM_NW | VTL_MEM_NX, VTL_PROTECT_IMMUTABLE);
	nsealed = 0;
	n.locked = 1;
	*pin = n;
	*pinning_out = (uint64_t)n.pinning;
	report_value("register_pinning", (uint64_t)n.pinning);
	printf("VP%u's registers pinned: CR0 %#lx, CR4 %#lx, EFER %#lx, on the locked root %#lx%s\n", vp,
	       n.cr0, n.cr4, n.efer, root, n.pinning ? "" : " (register pinning unavailable)");
	return VTL_OK;
}

/* A STATUS report of a refusal, with VTL1's reason: the VMM shows it beside the status
 * (and tests read it), value[2] = the VP it is about. */
static uint64_t refused(const char *what, uint64_t code, uint64_t st, uint64_t vp, const char *why)
{
	report(VTL_REPORT_STATUS, what, code, st, vp, 0, why);
	printf("%s refused (VP%lu): %s\n", what, vp, why);
	return st;
}

uint64_t policy_end_of_boot(void)
{
	if (boot_over)
		return VTL_E_POLICY;
	/* With APs online, every online VP (the boot VP and each AP VTL1 started) must have
	 * pinned its registers first: from here on VTL0 is untrusted on every VP, and a VP
	 * without pins would be judged by nothing.  (One VP alone may end its boot unlocked,
	 * as before there were APs.) */
	int aps = 0;
	for (uint32_t v = 1; v < bi->nr_vps; v++)
		aps |= started[v];
	for (uint32_t v = 0; aps && v < bi->nr_vps; v++)
		if ((v == 0 || started[v]) && !pins[v].locked)
			return refused("end_of_boot", VTL_CALL_END_OF_BOOT, VTL_E_POLICY, v,
				       v ? "an AP has not locked its registers" :
				       "the boot VP has not locked its registers");
	uint64_t n = 0, end = after_boot_hi < npages() ? after_boot_hi : npages();
	for (uint64_t i = after_boot_lo; i < end; i++) {
		if (!(page[i] & F_AFTER_BOOT))
			continue;
		uint64_t j = i;
		while (j < end && (page[j] & F_AFTER_BOOT))
			j++;
		uint64_t st = apply_range(i << 12, j - i, VTL_MEM_NW | VTL_MEM_NX);
		if (st != VTL_OK)
			return st;
		for (uint64_t k = i; k < j; k++)
			page[k] = (uint8_t)((page[k] & ~(ATTR_MASK | F_AFTER_BOOT | F_AUDIT)) | VTL_MEM_NW |
					    VTL_MEM_NX | F_IMMUTABLE);
		n += j - i;
		i = j;
	}
	boot_over = 1;
	report_value("ro_after_init_pages", n);
	printf("end of boot: %lu ro_after_init pages now read-only\n", n);
	return VTL_OK;
}

/* ---- VTL_CALL_START_AP ------------------------------------------------------------------
 * With VTL1 enabled only VTL1 may start an AP (VTL_HC_START_VP from VTL0 is refused), so
 * what an AP's VTL0 starts with is VTL1's decision: code VTL1 protected (r-x, immutable),
 * a stack VTL0 may write, and once the page tables are locked, the locked root.  Boot
 * only: after END_OF_BOOT VTL0 is untrusted, and an AP that could start then would do so
 * with nothing of its registers pinned.  VTL0's request is copied once into VTL1 memory
 * (VTL0 on another VP may rewrite it while VTL1 checks); that copy is what is checked and
 * what the VMM is given. */
static struct vtl_start_vp start_req;

uint64_t policy_start_ap(uint64_t gpa)
{
	if (vtl0_read(&start_req, gpa, sizeof(start_req)) != VTL_OK)
		return refused("start_ap", VTL_CALL_START_AP, VTL_E_INVALID_ARG, 0, "request not readable");
	const struct vtl_start_vp *r = &start_req;
	uint32_t vp = r->vp_index;
	if (boot_over)
		return refused("start_ap", VTL_CALL_START_AP, VTL_E_POLICY, vp, "boot is over: no AP starts now");
	if (r->flags)
		return refused("start_ap", VTL_CALL_START_AP, VTL_E_INVALID_ARG, vp, "unknown flags");
	if (vp == 0 || vp >= bi->nr_vps)
		return refused("start_ap", VTL_CALL_START_AP, VTL_E_INVALID_ARG, vp, "no such AP");
	if (!in_vtl0(r->rip, 1) || r->rsp < 8 || !in_vtl0(r->rsp - 8, 8) || (r->cr3 & 0xFFF) ||
	    !in_vtl0(r->cr3, 4096))
		return refused("start_ap", VTL_CALL_START_AP, VTL_E_INVALID_ARG, vp,
			       "rip, rsp or cr3 outside VTL0 memory");
	/* Code VTL1 protected: r-x and immutable (VTL_CALL_PROTECT's text), not the section. */
	uint8_t code = page[r->rip >> 12];
	if ((code & ATTR_MASK) != VTL_MEM_NW || !(code & F_IMMUTABLE) || in_priv(r->rip))
		return refused("start_ap", VTL_CALL_START_AP, VTL_E_POLICY, vp,
			       "rip is not in the text VTL1 protected");
	if (!vtl0_writable(r->rsp - 8, 8))
		return refused("start_ap", VTL_CALL_START_AP, VTL_E_POLICY, vp,
			       "rsp is not on memory VTL0 may write");
	if (locked && !is_root(r->cr3))
		return refused("start_ap", VTL_CALL_START_AP, VTL_E_POLICY, vp, "cr3 is not the root VTL1 locked");
	uint64_t st = hypercall(VTL_HC_START_VP, (uint64_t)&start_req, 0, 0, NULL);
	if (st != VTL_OK)
		return refused("start_ap", VTL_CALL_START_AP, st, vp, "VTL_HC_START_VP refused");
	started[vp] = 1;        /* online from now on: END_OF_BOOT waits for its lock */
	printf("starting AP %u at %#lx (stack %#lx, CR3 %#lx)\n", vp, r->rip, r->rsp, r->cr3);
	return VTL_OK;
}

/* ---- for lifecycle.c ------------------------------------------------------------------ */
/* page[] ranges in one REP STOSB: a per-page loop costs ~1 us per page on this host. */
static void fill_pages(uint64_t first, uint64_t n, uint8_t v)
{
	uint8_t *d = &page[first];
	asm volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(v) : "memory");
}

uint8_t policy_page(uint64_t gpa) { return (gpa >> 12) < npages() ? page[gpa >> 12] : 0; }
int policy_locked(void) { return locked; }
int policy_in_priv(uint64_t gpa) { return in_priv(gpa); }

int policy_xmapped(uint64_t gpa)
{
	return (gpa >> 12) < npages() && (xmapped[gpa >> 15] >> ((gpa >> 12) & 7) & 1);
}

uint64_t policy_set(uint64_t gpa, uint64_t pages, uint64_t attrs, uint8_t flags)
{
	uint64_t st = apply_range(gpa, pages, attrs);
	if (st != VTL_OK)
		return st;
	fill_pages(gpa >> 12, pages, (uint8_t)(attrs | flags));
	return VTL_OK;
}

uint64_t policy_scan_range(uint64_t gpa, uint64_t len, uint64_t ok_gpa, uint64_t ok_len, uint64_t *first)
{
	const uint8_t *b = (const uint8_t *)gpa;
	uint64_t n = 0;
	for (uint64_t o = find_0f(b, len); o < len; o += 1 + find_0f(b + o + 1, len - o - 1)) {
		int b1 = o + 1 < len ? b[o + 1] : -1, b2 = o + 2 < len ? b[o + 2] : -1;
		uint64_t mlen = (uint64_t)priv_match(b1, b2);
		if (!mlen)
			continue;
		uint64_t at = gpa + o;
		if (at >= ok_gpa && at + mlen <= ok_gpa + ok_len)
			continue;
		if (n++ == 0)
			*first = at;
		if (n <= 4)
			printf("scan: privileged instruction %02x %02x %02x at %#lx\n", 0x0F, b1 & 0xFF,
			       mlen == 3 ? b2 : 0, at);
	}
	return n;
}

void policy_persist_reset(uint64_t new_priv_gpa, uint64_t new_priv_pages)
{
	struct vp_pins *pin = my_pins();
	if (!pin->locked) {             /* never pinned: the old kernel's values carry over */
		vp_reg(VTL_REG_CR0, &pin->cr0);
		vp_reg(VTL_REG_CR4, &pin->cr4);
		vp_reg(VTL_REG_EFER, &pin->efer);
		pin->have_xcr0 = vp_reg(VTL_REG_XCR0, &pin->xcr0) == VTL_OK;
	}
	/* The new kernel starts on this VP (the APs are offline until it starts them): what
	 * this VP carries holds on every VP, and each VP's own lock comes anew. */
	struct vp_pins c = { .cr0 = pin->cr0, .cr4 = pin->cr4, .efer = pin->efer, .xcr0 = pin->xcr0,
			     .have_xcr0 = pin->have_xcr0 };
	for (uint32_t v = 0; v < VTL1_MAX_VPS; v++) {
		pins[v] = c;
		started[v] = 0;
	}
	carried = 1;
	locked = boot_over = 0;
	nroots = 0;
	section_judged = 0;
	uint64_t v1 = bi->vtl1_base >> 12, v1e = (bi->vtl1_base + bi->vtl1_size) >> 12;
	fill_pages(0, v1, VTL_MEM_NX);
	fill_pages(v1, v1e - v1, 0);
	if (npages() > v1e)
		fill_pages(v1e, npages() - v1e, VTL_MEM_NX);
	uint8_t *x = xmapped;
	uint64_t xn = sizeof(xmapped);
	asm volatile("rep stosb" : "+D"(x), "+c"(xn) : "a"(0) : "memory");
	after_boot_lo = ~0ULL;
	after_boot_hi = 0;
	priv_gpa = new_priv_pages ? new_priv_gpa : 0;
	priv_pages = new_priv_pages;
}

uint64_t policy_persist_pin(void)
{
	uint64_t st = set_intercept_control(priv_pages ? VTL_ICTL_ALL : 0);
	my_pins()->pinning = priv_pages && st == VTL_OK;
	section_judged = my_pins()->pinning;
	return st;
}

/* ---- secure intercepts ------------------------------------------------------------ */
static int canonical(const struct vp_pins *pin, uint64_t v)
{
	int bits = (pin->cr4 & CR4_LA57) ? 57 : 48;
	return (uint64_t)((int64_t)(v << (64 - bits)) >> (64 - bits)) == v;
}

static uint64_t said;               /* intercept lines printed (the console costs exits) */
static int say(void)
{
	said++;
	return said <= 12 || said % 1000 == 0;
}

static void deny_gp(struct vtl_intercept *m)
{
	m->verdict = VTL_VERDICT_INJECT_FAULT;
	m->fault_vector = 13;
	m->fault_has_error_code = 1;
	m->fault_error_code = 0;
}

static int is_root(uint64_t root)
{
	for (int i = 0; i < nroots; i++)
		if (roots[i] == root)
			return 1;
	return 0;
}

/* XCR0 as XSETBV would take it: x87 on, AVX needs SSE, AVX-512 all or none and needs
 * AVX, MPX both or none, AMX both or none, and only user state CPUID 0xD lists. */
static int xcr0_legal(uint64_t v)
{
	uint32_t a, b, c, d;
	cpuid(0xD, 0, &a, &b, &c, &d);
	uint64_t supported = ((uint64_t)d << 32) | a;
	if (!(v & XCR0_X87) || (v & ~supported))
		return 0;
	if ((v & XCR0_AVX) && !(v & XCR0_SSE))
		return 0;
	uint64_t avx512 = v & 0xE0;
	if (avx512 && (avx512 != 0xE0 || !(v & XCR0_AVX)))
		return 0;
	if (((v >> 3) & 1) != ((v >> 4) & 1) || ((v >> 17) & 1) != ((v >> 18) & 1))
		return 0;
	return 1;
}

/* A register write VTL0 made from its privileged section; NULL = allow, else why not. */
static const char *judge_register(const struct vtl_intercept *m)
{
	uint64_t v = m->new_value, old = m->old_value;
	const struct vp_pins *pin = my_pins();   /* this VP's: registers are per VP */
	if (!pin->locked && !carried)
		return NULL;                    /* before this VP's lock its VTL0 is trusted */
	if (!pin->locked && m->reg != VTL_REG_CR0 && m->reg != VTL_REG_CR0_LOW && m->reg != VTL_REG_CR4 &&
	    m->reg != VTL_REG_XCR0)
		return NULL;                    /* a kexec'd kernel sets up its own CR3 and tables */
	switch (m->reg) {
	case VTL_REG_CR0:
		if (v >> 32)
			return "reserved CR0 bits";
		if ((v & CR0_NW) && !(v & CR0_CD))
			return "CR0.NW without CR0.CD";
		if ((v & CR0_PG) && !(v & CR0_PE))
			return "CR0.PG without CR0.PE";
		if ((v ^ pin->cr0) & CR0_PINNED)
			return "CR0.PE/WP/PG are pinned";
		return NULL;
	case VTL_REG_CR0_LOW:           /* LMSW/CLTS: bits 0-3; only PE is pinned there */
		if (!(v & CR0_PE) || ((v ^ old) & CR0_PE))
			return "CR0.PE is pinned";
		return NULL;
	case VTL_REG_CR4:
		if ((v ^ pin->cr4) & CR4_PINNED)
			return "CR4 is pinned but for MCE, PGE, PCE, VMXE";
		return NULL;
	case VTL_REG_CR3: {
		uint64_t root = v & PTE_ADDR;
		uint64_t extra = (pin->cr4 & CR4_PCIDE) ? ((1ULL << 63) | 0xFFF) : (CR3_PWT | CR3_PCD);
		if (v & ~(root | extra))
			return "reserved CR3 bits";
		if (!is_root(root))
			return "not a page-table root VTL1 locked";
		return NULL;
	}
	case VTL_REG_XCR0:
		if (!xcr0_legal(v))
			return "illegal XCR0";
		if (!pin->locked && !pin->have_xcr0)
			return NULL;            /* carried, but never read: nothing to hold it to */
		if (v != (pin->have_xcr0 ? pin->xcr0 : old))
			return "XCR0 is pinned";
		return NULL;
	case VTL_REG_GDTR:
	case VTL_REG_IDTR: {
		int have = m->reg == VTL_REG_GDTR ? pin->have_gdtr : pin->have_idtr;
		uint64_t base = m->reg == VTL_REG_GDTR ? pin->gdtr : pin->idtr;
		uint64_t limit = m->reg == VTL_REG_GDTR ? pin->gdtr_limit : pin->idtr_limit;
		if (!canonical(pin, v))
			return "non-canonical base";
		if (v != old || m->new_limit != m->old_limit || (have && v != base) ||
		    (pin->have_tables && m->new_limit != limit))
			return "descriptor tables are fixed at the lock";
		return NULL;
	}
	case VTL_REG_LDTR:
	case VTL_REG_TR: {
		int ldtr = m->reg == VTL_REG_LDTR;
		int have = ldtr ? pin->have_ldtr : pin->have_tr;
		uint64_t sel = ldtr ? pin->ldtr : pin->tr;
		if ((v >> 16) || v != old || (have && v != sel))
			return "LDTR/TR are fixed at the lock";
		/* Judged by what it loads: the descriptor behind the selector, as the VMM read
		 * it (and will load it), must hold the base and limit pinned at the lock. */
		if (pin->have_tables && (v & ~3ULL) &&
		    (m->new_base != (ldtr ? pin->ldtr_base : pin->tr_base) ||
		     m->new_limit != (ldtr ? pin->ldtr_limit : pin->tr_limit)))
			return "LDTR/TR load only the table pinned at the lock (base and limit)";
		return NULL;
	}
	default:
		return "unknown register";
	}
}

static const char *judge_msr(uint32_t msr, uint64_t v)
{
	const struct vp_pins *pin = my_pins();
	switch (msr) {
	case MSR_EFER:
		if ((pin->locked || carried) && v != pin->efer)
			return "EFER is pinned from the lock";
		return NULL;
	case MSR_LSTAR:
	case MSR_CSTAR:
	case MSR_SYSENTER_ESP:
	case MSR_SYSENTER_EIP:
		if (!canonical(pin, v))
			return "non-canonical address";
		break;
	case MSR_SFMASK:
	case MSR_SYSENTER_CS:
		if (v >> 32)
			return "reserved bits";
		break;
	case MSR_STAR:
		break;
	default:
		break;
	}
	if (boot_over)
		return "pinned from END_OF_BOOT";
	return NULL;
}

static const char *const reg_names[] = { "?", "rip", "rsp", "rflags", "cr0", "cr3", "cr4", "efer",
	"xcr0", "gdtr", "idtr", "ldtr", "tr", "cr0_low" };

/* A secure intercept: judge it and write the verdict. */
void policy_intercept(struct vtl_intercept *m)
{
	m->verdict = VTL_VERDICT_INJECT_FAULT;
	if (m->type == VTL_INTERCEPT_REGISTER) {
		const char *why = judge_register(m);
		if (say())
			printf("intercept: %s %#lx -> %#lx at rip %#lx: %s%s\n",
			       m->reg < sizeof(reg_names) / sizeof(reg_names[0]) ? reg_names[m->reg] : "?",
			       m->old_value, m->new_value, m->rip, why ? "denied (#GP): " : "allowed",
			       why ? why : "");
		if (why)
			deny_gp(m);
		else
			m->verdict = VTL_VERDICT_ALLOW;
		return;
	}
	if (m->type == VTL_INTERCEPT_MSR) {
		const char *why = judge_msr(m->msr, m->data);
		if (say())
			printf("intercept: wrmsr %#x <- %#lx at rip %#lx: %s%s\n", m->msr, m->data, m->rip,
			       why ? "denied (#GP): " : "allowed", why ? why : "");
		if (why)
			deny_gp(m);
		else
			m->verdict = VTL_VERDICT_ALLOW;
		return;
	}
	if (m->type != VTL_INTERCEPT_MEMORY) {
		deny_gp(m);
		return;
	}
	uint64_t gfn = m->gpa >> 12;
	/* An audit grant holds only for plain data pages, and never for a fetch. */
	if (gfn < npages() && (page[gfn] & F_AUDIT) && m->access != VTL_ACCESS_EXECUTE &&
	    !(page[gfn] & (F_IMMUTABLE | F_TABLE | F_EXEC)) && (page[gfn] & VTL_MEM_NX) && !in_priv(m->gpa) &&
	    !policy_xmapped(m->gpa)) {
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
	if (say())
		printf("intercept: %s of GPA %#lx at rip %#lx%s: denied (#PF err %#x)\n", what, m->gpa, m->rip,
		       (m->flags & VTL_ICPT_F_RIP_AFTER) ? " (after the instruction)" : "", m->fault_error_code);
}
