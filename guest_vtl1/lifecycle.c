/* VTL1's side of the partition lifecycle (docs/design.md section 7): the allowlist provisioned at
 * launch, kexec of VTL1-authenticated images (teardown, persist, deny) and new code after
 * boot (modules).
 *
 * The rule for everything VTL1 authenticates: seal first, then read, then decide.  The
 * pages are made NW|NX for VTL0 (and immutable in VTL1's map) before a byte is hashed,
 * so nothing VTL0 does between the check and the use changes what was checked; a refusal
 * gives every page back exactly the attributes it had.  Sealing only ever takes rights
 * away, so VTL1 refuses to seal pages whose protection is not VTL0's to give up:
 * immutable pages, page tables, the privileged section, ro_after_init data, and code
 * (pages executable for VTL0). */
#include "vtl1.h"
#include "sha256.h"

#define PAGE_UP(x) (((x) + 0xFFFULL) & ~0xFFFULL)
#define KEXEC_MAX_PAGES ((VTL1_BASE - VTL0_IMAGE_MIN) >> 12)   /* the VTL0 image window */
#define MAX_MODULES 8

/* ---- the allowlist -------------------------------------------------------------------- */
static uint8_t trust[VTL_TRUST_MAX][32];
static uint32_t trust_count, kexec_policy;

/* boot_info's allowlist is the VMM's word on VTL1's own region: still checked (count, and
 * the digests inside VTL1's region) before VTL1 copies it. */
void lifecycle_init(void)
{
	uint64_t n = bi->trust_count, gpa = bi->trust_gpa, lo = bi->vtl1_base, hi = lo + bi->vtl1_size;
	if (n > VTL_TRUST_MAX || (n && (gpa < lo || gpa > hi || n * 32 > hi - gpa))) {
		printf("allowlist refused: %lu digests at %#lx, not inside VTL1's region\n", n, gpa);
		n = 0;
	}
	trust_count = (uint32_t)n;
	if (n)
		memcpy(trust, (const void *)gpa, n * 32);
	kexec_policy = bi->kexec_policy;
	if (kexec_policy > VTL_KEXEC_POLICY_DENY) {
		printf("unknown kexec policy %u: treated as deny\n", kexec_policy);
		kexec_policy = VTL_KEXEC_POLICY_DENY;
	}
	report_value("trust_count", trust_count);
	report_value("kexec_policy", kexec_policy);
	static const char *const pname[] = { "teardown", "persist", "deny" };
	printf("allowlist: %u digests, kexec policy %s\n", trust_count, pname[kexec_policy]);
	for (uint32_t i = 0; i < trust_count; i++) {
		printf("  trusted ");
		print_hex_bytes(trust[i], 8);
		printf("...\n");
	}
}

static int trusted(const uint8_t digest[32])
{
	for (uint32_t i = 0; i < trust_count; i++)
		if (memcmp(trust[i], digest, 32) == 0)
			return 1;
	return 0;
}

/* ---- VTL_CALL_SHA256 ------------------------------------------------------------------- */
static uint8_t chunk[4096];

uint64_t sha256_call(uint64_t gpa, uint64_t len, uint64_t out)
{
	if (len > VTL_SHA256_MAX_LEN || !in_vtl0(gpa, len) || !in_vtl0(out, 32))
		return VTL_E_INVALID_ARG;
	struct sha256 s;
	uint8_t d[32];
	sha256_init(&s);
	for (uint64_t off = 0; off < len; off += sizeof(chunk)) {   /* each byte read once */
		uint64_t n = len - off < sizeof(chunk) ? len - off : sizeof(chunk);
		uint64_t st = vtl0_read(chunk, gpa + off, n);
		if (st != VTL_OK)
			return st;
		sha256_update(&s, chunk, n);
	}
	sha256_final(&s, d);
	return vtl0_write(out, d, 32);
}

/* ---- sealing -------------------------------------------------------------------------- */
/* May VTL1 take W and X of this page away for a while and give them back later? */
static int sealable(uint64_t gpa)
{
	uint8_t b = policy_page(gpa);
	if (!in_vtl0(gpa, 4096) || (b & (F_IMMUTABLE | F_TABLE | F_EXEC | F_AFTER_BOOT)))
		return 0;
	if (policy_in_priv(gpa))
		return 0;
	return (b & ATTR_MASK) == 0 || (b & VTL_MEM_NX);   /* 0: never protected; else not code */
}

/* Every byte of [p, p+n) zero?  REPE SCASQ/SCASB: this host runs a string instruction's
 * repeats in one go, where a loop would cost an emulated instruction per step. */
static int all_zero(uint64_t p, uint64_t n)
{
	const void *d = (const void *)p;
	uint64_t q = n / 8, r = n % 8, rest = 0;
	uint8_t ne = 0;
	if (q) {
		asm volatile("repe scasq; setne %0" : "=r"(ne), "+D"(d), "+c"(q) : "a"(0ULL) : "cc", "memory");
		if (ne)
			return 0;
	}
	if (r) {
		rest = r;
		asm volatile("repe scasb; setne %0" : "=r"(ne), "+D"(d), "+c"(rest) : "a"(0ULL) : "cc", "memory");
		if (ne)
			return 0;
	}
	return 1;
}

/* ---- kexec ------------------------------------------------------------------------------ */
static struct vtl_kexec_request kreq;       /* VTL0's request, copied once */
static struct {
	int valid;
	uint64_t pages;
	uint8_t saved[KEXEC_MAX_PAGES];     /* page[] of each segment page before the seal */
} kx;

static int has_nul(const char *s, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		if (!s[i])
			return 1;
	return 0;
}

static uint64_t seg_pages(const struct vtl_kexec_segment *s) { return PAGE_UP(s->memsz) >> 12; }

/* What a sealed page gets back: what it had, but never W if the locked tables have come to
 * map it executable since (a validation before the lock, an unload after it). */
static uint8_t restored(uint64_t k, uint64_t gpa)
{
	uint8_t b = kx.saved[k], cur = policy_page(gpa);
	if ((cur & F_EXEC) || policy_xmapped(gpa))
		b = (uint8_t)(b | VTL_MEM_NW | (cur & F_EXEC));
	return b;
}

/* Give the first `nseg` segments' pages back what they had, in runs of equal state. */
static void kexec_restore(uint32_t nseg)
{
	uint64_t k = 0;
	for (uint32_t i = 0; i < nseg; i++) {
		uint64_t base = kreq.seg[i].paddr, n = seg_pages(&kreq.seg[i]);
		for (uint64_t j = 0; j < n;) {
			uint8_t b = restored(k, base + (j << 12));
			uint64_t e = j + 1;
			while (e < n && restored(k + e - j, base + (e << 12)) == b)
				e++;
			if (policy_set(base + (j << 12), e - j, b & ATTR_MASK, b & (uint8_t)~ATTR_MASK) != VTL_OK)
				printf("kexec: could not restore %#lx\n", base + (j << 12));
			k += e - j;
			j = e;
		}
	}
}

/* The request as copied: shape, bounds, entry, privileged section (persist).  Nothing
 * touched yet.  NULL, or what is wrong (at most 63 bytes: a report's text). */
static const char *kexec_request_problem(void)
{
	const struct vtl_kexec_request *r = &kreq;
	uint64_t prev_end = VTL0_IMAGE_MIN, pages = 0;
	int entry_ok = 0, priv_ok = r->priv_pages == 0;
	if (r->nr_segments < 1 || r->nr_segments > VTL_KEXEC_MAX_SEGMENTS)
		return "request: not 1 to VTL_KEXEC_MAX_SEGMENTS segments";
	if (r->reserved0)
		return "request: reserved0 is not 0";
	if (!has_nul(r->scenario, sizeof(r->scenario)))
		return "request: scenario not NUL-terminated";
	if (r->priv_pages && ((r->priv_gpa & 0xFFF) || r->priv_pages > PRIV_MAX_PAGES))
		return "request: privileged section misaligned or too large";
	for (uint32_t i = 0; i < r->nr_segments; i++) {
		const struct vtl_kexec_segment *s = &r->seg[i];
		if ((s->paddr & 0xFFF) || s->reserved || (s->flags & ~7U) || !s->memsz || s->filesz > s->memsz)
			return "request: a segment misaligned, empty or with bad fields";
		if (s->paddr < prev_end || s->memsz > VTL1_BASE || s->paddr > bi->vtl1_base - PAGE_UP(s->memsz))
			return "request: segments overlap or leave the image window";
		prev_end = s->paddr + PAGE_UP(s->memsz);
		pages += seg_pages(s);
		if (!(s->flags & VTL_SEG_X))
			continue;
		if (r->entry >= s->paddr && r->entry < s->paddr + s->memsz)
			entry_ok = 1;
		if (r->priv_pages && r->priv_gpa >= s->paddr && (r->priv_pages << 12) <= PAGE_UP(s->memsz) &&
		    r->priv_gpa - s->paddr <= PAGE_UP(s->memsz) - (r->priv_pages << 12))
			priv_ok = 1;    /* (no sum that could wrap) */
	}
	if (!entry_ok)
		return "request: entry not in an executable segment";
	if (!priv_ok)
		return "request: privileged section not in an executable segment";
	if (pages > KEXEC_MAX_PAGES)
		return "request: more pages than VTL1 seals for one image";
	if (!in_vtl0(r->seg[0].paddr, prev_end - r->seg[0].paddr))
		return "request: segments not in VTL0 memory";
	return NULL;
}

/* A refused kexec call: VTL1's reason goes to the VMM and its tools through the report
 * channel (STATUS, name = the call, value[0] = code, value[1] = status, text = why) and
 * to people on the console. */
static uint64_t kexec_refused;      /* console lines cost an exit per byte: a VTL0 that asks
				       in a loop gets the first few and every 1000th */
static uint64_t kexec_refuse(const char *call, uint64_t code, uint64_t st, const char *why)
{
	kexec_refused++;
	if (kexec_refused <= 12 || kexec_refused % 1000 == 0)
		printf("%s refused: %s\n", call, why);
	report(VTL_REPORT_STATUS, call, code, st, 0, 0, why);
	return st;
}

/* Seal every segment page NW|NX (immutable in VTL1's map), remembering what it had. */
static uint64_t kexec_seal(void)
{
	uint64_t k = 0;
	for (uint32_t i = 0; i < kreq.nr_segments; i++)
		for (uint64_t j = 0; j < seg_pages(&kreq.seg[i]); j++) {
			uint64_t gpa = kreq.seg[i].paddr + (j << 12);
			if (!sealable(gpa)) {
				printf("kexec: will not seal %#lx (page state %#x)\n", gpa, policy_page(gpa));
				return VTL_E_POLICY;
			}
			kx.saved[k++] = policy_page(gpa);
		}
	kx.pages = k;
	for (uint32_t i = 0; i < kreq.nr_segments; i++) {
		uint64_t st = policy_set(kreq.seg[i].paddr, seg_pages(&kreq.seg[i]), VTL_MEM_NW | VTL_MEM_NX,
					 F_IMMUTABLE);
		if (st != VTL_OK) {
			kexec_restore(i);
			return st;
		}
	}
	return VTL_OK;
}

/* docs/abi.md "Measurement", from the sealed memory: u64 entry, then per segment u64
 * paddr, filesz, memsz, u32 flags and the filesz bytes.  0 if a byte past filesz (up to
 * the segment's last page end) is not zero: that would be unmeasured content. */
static int kexec_measure(uint8_t digest[32])
{
	struct sha256 s;
	sha256_init(&s);
	sha256_update(&s, &kreq.entry, 8);
	for (uint32_t i = 0; i < kreq.nr_segments; i++) {
		const struct vtl_kexec_segment *g = &kreq.seg[i];
		sha256_update(&s, &g->paddr, 8);
		sha256_update(&s, &g->filesz, 8);
		sha256_update(&s, &g->memsz, 8);
		sha256_update(&s, &g->flags, 4);
		sha256_update(&s, (const void *)g->paddr, g->filesz);
		if (!all_zero(g->paddr + g->filesz, PAGE_UP(g->memsz) - g->filesz)) {
			printf("kexec: segment %u has bytes past its file size\n", i);
			return 0;
		}
	}
	sha256_final(&s, digest);
	return 1;
}

/* Persist: the new text may hold privileged writes only in its privileged section; the
 * X segments are scanned as one stream where one follows the other. */
static uint64_t kexec_scan(void)
{
	uint64_t bad = 0, first = 0;
	uint64_t ok_gpa = kreq.priv_gpa, ok_len = kreq.priv_pages << 12;
	for (uint32_t i = 0; i < kreq.nr_segments;) {
		if (!(kreq.seg[i].flags & VTL_SEG_X)) {
			i++;
			continue;
		}
		uint64_t lo = kreq.seg[i].paddr, hi = lo + PAGE_UP(kreq.seg[i].memsz);
		for (i++; i < kreq.nr_segments && (kreq.seg[i].flags & VTL_SEG_X) && kreq.seg[i].paddr == hi; i++)
			hi += PAGE_UP(kreq.seg[i].memsz);
		uint64_t f = 0, n = policy_scan_range(lo, hi - lo, ok_gpa, ok_len, &f);
		if (n && !bad)
			first = f;
		bad += n;
	}
	if (bad) {
		report_value("kexec_priv_violations", bad);
		report_value("kexec_priv_violation_gpa", first);
	}
	return bad;
}

#define VALIDATE(st, why) kexec_refuse("kexec_validate", VTL_CALL_KEXEC_VALIDATE, (st), (why))

uint64_t kexec_validate(uint64_t req_gpa)
{
	if (kx.valid)                   /* one image at a time */
		return VALIDATE(VTL_E_POLICY, "an image is validated already: KEXEC_UNLOAD first");
	if (vtl0_read(&kreq, req_gpa, sizeof(kreq)) != VTL_OK)
		return VALIDATE(VTL_E_INVALID_ARG, "request: not in memory VTL0 may read");
	const char *bad = kexec_request_problem();
	if (bad)
		return VALIDATE(VTL_E_INVALID_ARG, bad);
	int persist = kexec_policy == VTL_KEXEC_POLICY_PERSIST;
	if (persist) {                  /* the new kernel's protection must be expressible */
		if (!kreq.priv_pages)
			return VALIDATE(VTL_E_INVALID_ARG, "the image has no privileged section for persist to judge");
		for (uint32_t i = 0; i < kreq.nr_segments; i++)
			if ((kreq.seg[i].flags & (VTL_SEG_W | VTL_SEG_X)) == (VTL_SEG_W | VTL_SEG_X))
				return VALIDATE(VTL_E_POLICY, "a segment is writable and executable");
	}
	uint64_t st = kexec_seal();
	if (st != VTL_OK)
		return VALIDATE(st, "a segment page cannot be sealed (protected or executable)");
	uint8_t digest[32];
	uint64_t t0 = rdtsc();
	int clean = kexec_measure(digest);
	report_value("kexec_measure_ticks", rdtsc() - t0);     /* the hash and the zero check */
	if (clean) {
		report_bytes("kexec_measurement", digest, 32);
		printf("kexec image measured ");
		print_hex_bytes(digest, 32);
		printf("\n");
	}
	const char *why = !clean ? "bytes past a segment's file size" :
			  !trusted(digest) ? "not on the allowlist" :
			  persist && kexec_scan() ? "privileged instructions outside its privileged section" : NULL;
	if (why) {
		kexec_restore(kreq.nr_segments);
		return VALIDATE(VTL_E_POLICY, why);
	}
	kx.valid = 1;
	printf("kexec image validated: %u segments, %lu pages sealed, entry %#lx\n", kreq.nr_segments, kx.pages,
	       kreq.entry);
	return VTL_OK;
}

uint64_t kexec_unload(void)
{
	if (!kx.valid)
		return kexec_refuse("kexec_unload", VTL_CALL_KEXEC_UNLOAD, VTL_E_POLICY, "no validated image");
	kexec_restore(kreq.nr_segments);
	kx.valid = 0;
	return VTL_OK;
}

static struct vtl_restart restart;

static uint64_t request_restart(uint64_t flags)
{
	const struct vtl_kexec_segment *last = &kreq.seg[kreq.nr_segments - 1];
	memset(&restart, 0, sizeof(restart));
	restart.entry = kreq.entry;
	restart.flags = flags;
	restart.image_start = kreq.seg[0].paddr;
	restart.image_end = last->paddr + PAGE_UP(last->memsz);
	restart.param = kreq.param;
	memcpy(restart.scenario, kreq.scenario, sizeof(restart.scenario));
	return hypercall(VTL_HC_VTL0_RESTART, (uint64_t)&restart, 0, 0, NULL);
}

static void modules_forget(void);

/* Persist: the old kernel's protections go, the new kernel's come, all before VTL0 runs
 * again: text r-x and rodata r-- (immutable), everything else rw- NX, the privileged
 * section NR and judged.  VTL0 does not run while VTL1 serves this call. */
static uint64_t kexec_persist(void)
{
	uint64_t v1 = bi->vtl1_base, v1e = v1 + bi->vtl1_size, mem = bi->mem_size, st;
	st = policy_set(0, v1 >> 12, VTL_MEM_NX, 0);
	if (st == VTL_OK && mem > v1e)
		st = policy_set(v1e, (mem - v1e) >> 12, VTL_MEM_NX, 0);
	if (st != VTL_OK)
		return st;
	policy_persist_reset(kreq.priv_gpa, kreq.priv_pages);
	modules_forget();
	for (uint32_t i = 0; i < kreq.nr_segments && st == VTL_OK; i++) {
		const struct vtl_kexec_segment *s = &kreq.seg[i];
		if (s->flags & VTL_SEG_X)
			st = policy_set(s->paddr, seg_pages(s), VTL_MEM_NW, F_IMMUTABLE);
		else if (!(s->flags & VTL_SEG_W))
			st = policy_set(s->paddr, seg_pages(s), VTL_MEM_NW | VTL_MEM_NX, F_IMMUTABLE);
	}
	if (st != VTL_OK)
		return st;
	st = policy_persist_pin();
	report_value("persist_intercept_control", st);
	if (st == VTL_OK)
		st = policy_set(kreq.priv_gpa, kreq.priv_pages, VTL_MEM_NR | VTL_MEM_NW | VTL_MEM_NX, F_IMMUTABLE);
	else if (st == VTL_E_INVALID_CODE)      /* no decoder: the section stays r-x, unpinned */
		st = VTL_OK;
	return st;
}

uint64_t kexec_jump(void)
{
	/* The next kernel starts on the boot VP (the VMM restarts VTL0 there, the APs go
	 * offline), as Linux moves kexec to its reboot CPU: asked for on an AP, the jump would
	 * restart the boot VP wherever it was, in the middle of a VTL1 call perhaps. */
	if (this_vp() != 0)
		return kexec_refuse("kexec_jump", VTL_CALL_KEXEC_JUMP, VTL_E_POLICY,
				    "asked for on an AP: the next kernel starts on the boot VP");
	if (!kx.valid || kexec_policy == VTL_KEXEC_POLICY_DENY)
		return kexec_refuse("kexec_jump", VTL_CALL_KEXEC_JUMP, VTL_E_POLICY,
				    kx.valid ? "the kexec policy is deny" : "no validated image");
	uint64_t st;
	if (kexec_policy == VTL_KEXEC_POLICY_TEARDOWN) {
		st = request_restart(VTL_RESTART_F_TEARDOWN);
		printf("kexec (teardown) to %#lx: %s\n", kreq.entry, vtl_status_name(st));
		if (st == VTL_OK) {
			kx.valid = 0;
			vtl1_lock_kept = 1;     /* nothing else is served before VTL1's end */
		} else {
			kexec_refuse("kexec_jump", VTL_CALL_KEXEC_JUMP, st, "the VMM refused VTL_HC_VTL0_RESTART");
		}
		return st;
	}
	st = kexec_persist();
	const char *why = st != VTL_OK ? "protecting the new kernel failed" : NULL;
	if (st == VTL_OK) {
		st = request_restart(0);
		why = st != VTL_OK ? "the VMM refused VTL_HC_VTL0_RESTART" : NULL;
	}
	printf("kexec (persist) to %#lx: %s\n", kreq.entry, vtl_status_name(st));
	if (why)
		kexec_refuse("kexec_jump", VTL_CALL_KEXEC_JUMP, st, why);
	else
		vtl1_lock_kept = 1;     /* until the next kernel's first call (main.c) */
	kx.valid = 0;
	return st;
}

/* ---- modules ----------------------------------------------------------------------------
 * Two kinds of module pages:
 *   - a module area: pages VTL0's locked tables map executable, which VTL1 therefore keeps
 *     NW (and NX) from the lock on.  VTL0 cannot write them, so VTL1 fills them: RDX =
 *     the module's bytes elsewhere in VTL0 memory, copied once.  This is the kind that
 *     runs on every host: where the host has no NX memory attribute (`vtl caps`) the
 *     tables alone decide what VTL0 can execute, so W^X needs the pages unwritable.
 *   - rw- NX pages VTL0 filled itself (RDX = 0): runnable only where the host enforces
 *     VTL1's NX and the tables map them executable... which the lock refuses for a
 *     writable page; kept for the contract's sake and for hosts with NX attributes.
 * The copy, the hash and the scan happen while VTL0 does not run (one VP, inside the VTL
 * call); a refused or unloaded area is zeroed before VTL0 runs again. */
static struct module {
	uint64_t gpa, pages;
	int loaded;                     /* 0: validated (sealed NW|NX), 1: r-x */
	int area;                       /* a module area VTL1 filled */
} mods[MAX_MODULES];
static int nmods;

static void modules_forget(void) { nmods = 0; }

static struct module *module_find(uint64_t gpa, uint64_t pages)
{
	for (int i = 0; i < nmods; i++)
		if (mods[i].gpa == gpa && mods[i].pages == pages)
			return &mods[i];
	return NULL;
}

static int exec_for_vtl0(uint64_t gpa)
{
	return in_vtl0(gpa, 4096) && (!(policy_page(gpa) & VTL_MEM_NX) || policy_xmapped(gpa) ||
				      (policy_page(gpa) & F_EXEC));
}

/* Sealed module bytes: on the allowlist, and no privileged write anywhere in them, nor
 * across either end into a page VTL0 can execute. */
static const char *module_check(uint64_t gpa, uint64_t pages)
{
	uint8_t digest[32];
	uint64_t len = pages << 12, first = 0;
	sha256((const void *)gpa, len, digest);
	report_bytes("module_digest", digest, 32);
	if (!trusted(digest))
		return "not on the allowlist";
	uint64_t lo = gpa - (exec_for_vtl0(gpa - 4096) ? 2 : 0);
	uint64_t hi = gpa + len + (exec_for_vtl0(gpa + len) ? 2 : 0);
	uint64_t n = policy_scan_range(lo, hi - lo, 0, 0, &first);
	if (n) {
		report_value("module_priv_violations", n);
		report_value("module_priv_violation_gpa", first);
		return "privileged instructions";
	}
	return NULL;
}

/* Each page in the state its kind needs: a module area NW|NX, else rw- NX; nothing more. */
static int module_pages_ok(uint64_t gpa, uint64_t pages, int area)
{
	for (uint64_t i = 0; i < pages; i++) {
		uint64_t p = gpa + (i << 12);
		if (policy_in_priv(p) || policy_xmapped(p) != area)
			return 0;
		if (policy_page(p) != (area ? VTL_MEM_NW | VTL_MEM_NX : VTL_MEM_NX))
			return 0;
	}
	return 1;
}

static void zero_pages(uint64_t gpa, uint64_t pages)
{
	uint64_t d = gpa, n = pages << 12;
	asm volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(0) : "memory");
}

/* Back to what the pages were before the validation: an area NW|NX and zeroed. */
static void module_release(uint64_t gpa, uint64_t pages, int area)
{
	if (area)
		zero_pages(gpa, pages);
	if (policy_set(gpa, pages, area ? VTL_MEM_NW | VTL_MEM_NX : VTL_MEM_NX, 0) != VTL_OK)
		printf("module %#lx: could not release\n", gpa);
}

uint64_t module_validate(uint64_t gpa, uint64_t pages, uint64_t src)
{
	uint64_t len = pages << 12;
	int area = src != 0;
	if (!policy_locked())
		return VTL_E_POLICY;
	if (gpa & 0xFFF)
		return VTL_E_MISALIGNED;
	if (!pages || pages > VTL_MODULE_MAX_PAGES || gpa < 4096 || !in_vtl0(gpa, len))
		return VTL_E_INVALID_ARG;
	if (area && (!in_vtl0(src, len) || (src < gpa + len && gpa < src + len)))
		return VTL_E_INVALID_ARG;
	for (int i = 0; i < nmods; i++)
		if (gpa < mods[i].gpa + (mods[i].pages << 12) && mods[i].gpa < gpa + len)
			return VTL_E_POLICY;
	if (nmods >= MAX_MODULES)
		return VTL_E_NO_RESOURCES;
	if (!module_pages_ok(gpa, pages, area))
		return VTL_E_POLICY;
	uint64_t st = policy_set(gpa, pages, VTL_MEM_NW | VTL_MEM_NX, F_IMMUTABLE);   /* sealed */
	if (st != VTL_OK)
		return st;
	if (area && (st = vtl0_read((void *)gpa, src, len)) != VTL_OK) {   /* copied once */
		module_release(gpa, pages, area);
		return st;
	}
	const char *why = module_check(gpa, pages);
	if (why) {
		printf("module %#lx (+%lu pages) refused: %s\n", gpa, pages, why);
		module_release(gpa, pages, area);
		return VTL_E_POLICY;
	}
	mods[nmods++] = (struct module){ gpa, pages, 0, area };
	printf("module %#lx (+%lu pages) validated\n", gpa, pages);
	return VTL_OK;
}

uint64_t module_load(uint64_t gpa, uint64_t pages, uint64_t src)
{
	struct module *m = module_find(gpa, pages);
	if (!m) {
		uint64_t st = module_validate(gpa, pages, src);
		if (st != VTL_OK)
			return st;
		m = module_find(gpa, pages);
	}
	if (m->loaded)
		return VTL_E_POLICY;
	uint64_t st = policy_set(gpa, pages, VTL_MEM_NW, F_IMMUTABLE);     /* r-x, immutable */
	if (st == VTL_OK) {
		m->loaded = 1;
		printf("module %#lx (+%lu pages) loaded: r-x\n", gpa, pages);
	}
	return st;
}

uint64_t module_unload(uint64_t gpa, uint64_t pages)
{
	struct module *m = module_find(gpa, pages);
	if (!m)
		return VTL_E_POLICY;
	/* X goes first, W (if it comes back at all) after: never writable and executable. */
	uint64_t st = m->loaded ? policy_set(gpa, pages, VTL_MEM_NW | VTL_MEM_NX, F_IMMUTABLE) : VTL_OK;
	if (st != VTL_OK)
		return st;
	module_release(gpa, pages, m->area);
	printf("module %#lx (+%lu pages) unloaded: %s\n", gpa, pages, m->area ? "area NW|NX, zeroed" : "rw- NX");
	*m = mods[--nmods];
	return VTL_OK;
}
