/* Lifecycle scenarios (issue 10, docs/design.md section 7): VTL1's SHA-256, kexec of
 * VTL1-authenticated images (teardown, persist, deny), modules after END_OF_BOOT, and
 * emulated RESET.  As everywhere, every observation is reported before it is judged and
 * attack targets are named (TARGET, EXEC, REGISTER) so that the VMM checks them itself;
 * tests/test_kexec_guest.py, test_modules.py and test_sha256.py hold the verdicts. */
#include "vtl0.h"
#include "module.h"

static uint64_t vtl_call_rdx(uint64_t code, uint64_t rcx, uint64_t rdi, uint64_t rdx, uint64_t *rcx_out)
{
	return vtl_call4(code, rcx, rdi, rdx, 0, rcx_out);
}

/* ---- VTL_CALL_SHA256 ------------------------------------------------------------------
 * Seeded data (xorshift, seed from param) at fixed places, hashed by VTL1 into
 * sha_digests[]: the test reads both back from memory and recomputes with hashlib. */
static const uint64_t sha_lengths[] = { 0, 1, 55, 56, 63, 64, 65, 1000, 4096 * 3 + 7 };
#define SHA_CASES (sizeof(sha_lengths) / sizeof(sha_lengths[0]))
uint8_t sha_data[16384] __attribute__((aligned(4096)));
uint8_t sha_digests[SHA_CASES][32] __attribute__((aligned(32)));

SCENARIO(sc_sha256, "sha256-selftest", "VTL1 hashes seeded random buffers (param = seed) with VTL_CALL_SHA256")
{
	const char *name = "sha256-selftest";
	require_vtl1(name);
	rng_state = 0x9E3779B97F4A7C15ULL ^ boot_info->param;
	for (uint64_t i = 0; i < sizeof(sha_data); i += 8) {
		uint64_t v = rnd();
		memcpy(&sha_data[i], &v, 8);
	}
	report_value("sha256_data", (uint64_t)sha_data);        /* the test reads the buffers */
	report_value("sha256_digests", (uint64_t)sha_digests);
	report_value("sha256_cases", SHA_CASES);
	uint64_t off = 0, bad = 0;
	for (uint64_t i = 0; i < SHA_CASES; i++) {
		char key[32] = "sha256_len_";
		key[11] = (char)('0' + i);
		report_value(key, sha_lengths[i]);
		uint64_t st = vtl_call_rdx(VTL_CALL_SHA256, (uint64_t)sha_data + off, sha_lengths[i],
					   (uint64_t)sha_digests[i], NULL);
		key[6] = 's', key[7] = 't', key[8] = 'a', key[9] = 't', key[10] = '_';   /* "sha256stat_i" */
		report_status(key, VTL_CALL_SHA256, st);
		report_bytes(key, sha_digests[i], 32);
		bad += st != VTL_OK;
		off += sha_lengths[i];
	}
	/* Refusals: too long, output where VTL0 may not write (its own rodata is writable here,
	 * so VTL1's region stands in), data in VTL1's region. */
	uint64_t st = vtl_call_rdx(VTL_CALL_SHA256, (uint64_t)sha_data, VTL_SHA256_MAX_LEN + 1,
				   (uint64_t)sha_digests[0], NULL);
	report_status("sha256_too_long", VTL_CALL_SHA256, st);
	bad += st != VTL_E_INVALID_ARG;
	st = vtl_call_rdx(VTL_CALL_SHA256, (uint64_t)sha_data, 64, boot_info->vtl1_base, NULL);
	report_status("sha256_out_in_vtl1", VTL_CALL_SHA256, st);
	bad += st != VTL_E_INVALID_ARG;
	st = vtl_call_rdx(VTL_CALL_SHA256, boot_info->vtl1_base, 64, (uint64_t)sha_digests[0], NULL);
	report_status("sha256_data_in_vtl1", VTL_CALL_SHA256, st);
	bad += st != VTL_E_INVALID_ARG;
	if (bad)
		fail(name, "unexpected status");
	pass(name);
}

/* ---- kexec ------------------------------------------------------------------------------
 * The old kernel hardens itself, places the staged image (elfload.c), asks VTL1 to
 * validate it and jumps; the new kernel (the same sources at 0x800000, vtl0-kexec.elf)
 * runs the scenario named in the request and checks what it inherited. */
static struct vtl_kexec_request kreq;

static void load_staged(const char *name, const char *next, uint64_t param)
{
	report_value("boot_count", boot_info->boot_count);
	report_value("staged_gpa", boot_info->staged_gpa);
	report_value("staged_size", boot_info->staged_size);
	const char *why = kexec_load_staged(&kreq);
	if (why) {
		printf("staged image: %s\n", why);
		fail(name, why);
	}
	uint64_t n = strlen(next);
	memcpy(kreq.scenario, next, n < sizeof(kreq.scenario) ? n + 1 : sizeof(kreq.scenario) - 1);
	kreq.param = param;
	report_value("kexec_entry", kreq.entry);
	report_value("kexec_segments", kreq.nr_segments);
	report_value("kexec_priv_gpa", kreq.priv_gpa);
	printf("staged image placed: entry %#lx, %u segments, privileged section %#lx (+%lu pages)\n", kreq.entry,
	       kreq.nr_segments, kreq.priv_gpa, kreq.priv_pages);
}

/* For other scenario files (xvp.c): the staged image placed, the request filled. */
struct vtl_kexec_request *kexec_stage(const char *name, const char *next, uint64_t param)
{
	load_staged(name, next, param);
	return &kreq;
}

static uint64_t kexec_validate(void)
{
	uint64_t rcx = 0;
	return vtl_call(VTL_CALL_KEXEC_VALIDATE, (uint64_t)&kreq, 0, &rcx);
}

/* The old kernel: harden, END_OF_BOOT, load, validate, jump (returns only if refused).
 * Heki mode: harden through Heki, load, jump in the guest (heki_kexec.c); the next kernel
 * gets the old text's address in either flow (Heki has no teardown/persist choice). */
static void kexec_to(const char *name, const char *next, uint64_t param)
{
	harden(name, 1);
	if (heki_mode()) {
		load_staged(name, next, (uint64_t)_text_start);
		heki_kexec_jump(name, &kreq);
	}
	load_staged(name, next, param);
	must(name, "kexec_validate", VTL_CALL_KEXEC_VALIDATE, "KEXEC_VALIDATE", kexec_validate());
	report_value("kexec_jump", 1);          /* the last word of the old kernel */
	uint64_t st = vtl_call(VTL_CALL_KEXEC_JUMP, 0, 0, NULL);
	report_status("kexec_jump", VTL_CALL_KEXEC_JUMP, st);
	fail(name, "KEXEC_JUMP returned");
}

/* After a teardown or reset: no VTL1 yet, its region reads as plain (zeroed) memory.
 * BYTES "vtl1_region_image": the first bytes of where VTL1's image was; VALUE
 * "vtl1_region_nonzero": nonzero bytes in its boot info and control pages and there. */
static uint8_t vtl1_seen[2048];

static void check_vtl1_region_gone(const char *name)
{
	static const uint64_t offs[] = { VTL1_BOOT_INFO_OFF, VTL1_CONTROL_OFF, VTL1_TRUST_OFF, VTL1_IMAGE_MIN_OFF };
	uint64_t nonzero = 0;
	for (uint64_t k = 0; k < sizeof(offs) / sizeof(offs[0]); k++) {
		const volatile uint64_t *p = (const volatile uint64_t *)(boot_info->vtl1_base + offs[k]);
		for (uint64_t i = 0; i < sizeof(vtl1_seen) / 8; i++) {
			uint64_t v = p[i];      /* 8-byte reads: each one the VMM emulates */
			memcpy(&vtl1_seen[i * 8], &v, 8);
			for (int b = 0; b < 8; b++)
				nonzero += ((v >> (8 * b)) & 0xFF) != 0;
		}
	}
	report_bytes("vtl1_region_image", vtl1_seen, sizeof(vtl1_seen));
	report_value("vtl1_region_nonzero", nonzero);
	printf("VTL1's region (4 x %lu bytes read): %lu nonzero bytes\n", sizeof(vtl1_seen), nonzero);
	if (nonzero)
		fail(name, "VTL1's memory was not zeroed");
}

/* A new VTL1 can be enabled and measures as a fresh launch's (the VMM's VtlEnabled event
 * carries the SHA-256; BYTES "vtl1_measurement" from VTL0 is what VTL1 answered). */
static void enable_again(const char *name)
{
	require_vtl1(name);
	static uint8_t m[32];
	must(name, "get_measurement", VTL_CALL_GET_MEASUREMENT, "VTL_CALL_GET_MEASUREMENT",
	     vtl_call(VTL_CALL_GET_MEASUREMENT, 0, (uint64_t)m, NULL));
	report_bytes("vtl1_measurement", m, sizeof(m));
	echo_still_works(name);
}

/* A write that must land now that the old protections are gone: TARGET `key`, the
 * write, VALUE "<key>_landed" (1 if the new value is there). */
static void write_lands(const char *name, const char *key, uint64_t target)
{
	uint64_t old = *(volatile uint64_t *)target, want = old ^ 0x5A5A5A5A5A5A5A5AULL;
	report_target(key, target, 8, old);
	struct fault_info fi;
	int faulted = try_run(write_u64_fn, (void *)target, &fi);
	if (!faulted)
		*(volatile uint64_t *)target = want;
	uint64_t now = *(volatile uint64_t *)target;
	char vkey[32];
	uint64_t n = strlen(key);
	memcpy(vkey, key, n);
	memcpy(vkey + n, "_landed", 8);
	report_value(vkey, now != old);
	if (faulted) {
		report_fault(key, &fi);
		fail(name, "a protection of the old kernel survived");
	}
	printf("write to %#lx landed (%#lx -> %#lx): the old protection is gone\n", target, old, now);
}

SCENARIO(sc_kexec_teardown, "kexec-teardown",
	 "kexec the staged image, validated by VTL1 (policy teardown): VTL1 and every protection end")
{
	/* param of the new kernel: where the old kernel's (immutable) text was */
	kexec_to("kexec-teardown", "kexec-after-teardown", (uint64_t)_text_start);
}

SCENARIO(sc_after_teardown, "kexec-after-teardown", "the kernel started by kexec-teardown (param = old text)")
{
	const char *name = "kexec-after-teardown";
	if (heki_mode())
		heki_after_kexec(name);
	report_value("boot_count", boot_info->boot_count);
	if (boot_info->boot_count != 1)
		fail(name, "boot_count is not 1");
	check_vtl1_region_gone(name);
	write_lands(name, "old_kernel_text", boot_info->param);
	enable_again(name);
	pass(name);
}

SCENARIO(sc_kexec_persist, "kexec-persist",
	 "kexec the staged image, VTL1 persisting: the new kernel protected from its first instruction")
{
	kexec_to("kexec-persist", "kexec-after-persist", 0);
}

/* harden_protect() for a kernel VTL1 protected at a persist kexec: its text is r-x and
 * its privileged section already NR (both immutable), the rest as harden_protect asks. */
extern char _scenarios_page_end[], _ro_after_init_start[], _ro_after_init_end[], _data_start[];

static void harden_persisted(const char *name)
{
	uint64_t ts = (uint64_t)_text_start, te = (uint64_t)_text_end, ps = (uint64_t)_priv_start;
	uint64_t v1 = boot_info->vtl1_base, v1e = v1 + boot_info->vtl1_size, mem = boot_info->mem_size;
	paging_set_nx_except(ts, te);
	report_value("text_attrs", protection_of(ts));          /* NW: r-x since the kexec */
	report_value("priv_attrs", protection_of(ps));          /* NR|NW|NX since the kexec */
	must(name, "protect_text", VTL_CALL_PROTECT, "text r-x, immutable (again)",
	     prot(ts, PAGES(ts, ps), VTL_MEM_NW, VTL_PROTECT_IMMUTABLE));
	must(name, "protect_rodata", VTL_CALL_PROTECT, "rodata r--, immutable (again)",
	     prot(te, PAGES(te, _scenarios_page_end), VTL_MEM_NW | VTL_MEM_NX, VTL_PROTECT_IMMUTABLE));
	must(name, "protect_ro_after_init", VTL_CALL_PROTECT, "ro_after_init rw- until end of boot",
	     prot((uint64_t)_ro_after_init_start, PAGES(_ro_after_init_start, _ro_after_init_end), VTL_MEM_NX,
		  VTL_PROTECT_AFTER_BOOT));
	must(name, "protect_data", VTL_CALL_PROTECT, "data, bss and free memory rw-",
	     prot((uint64_t)_data_start, PAGES(_data_start, v1), VTL_MEM_NX, 0));
	must(name, "protect_low", VTL_CALL_PROTECT, "low memory rw-", prot(0, ts >> 12, VTL_MEM_NX, 0));
	if (mem > v1e)
		must(name, "protect_high", VTL_CALL_PROTECT, "memory above VTL1 rw-",
		     prot(v1e, (mem - v1e) >> 12, VTL_MEM_NX, 0));
}

SCENARIO(sc_after_persist, "kexec-after-persist", "the kernel started by kexec-persist attacks itself")
{
	const char *name = "kexec-after-persist";
	if (heki_mode())
		heki_after_kexec(name);
	/* First: its own text, r-x and immutable before it ran an instruction. */
	attack_write(name, "kernel_text", "own text", (uint64_t)&write_u64_fn & ~7ULL);
	report_value("boot_count", boot_info->boot_count);
	if (boot_info->boot_count != 1)
		fail(name, "boot_count is not 1");
	/* CR0.WP stays pinned across the kexec (carried), before this kernel locked anything. */
	uint64_t old = read_cr0();
	report_register("cr0", VTL_REG_CR0, old, 0);
	struct fault_info fi;
	int faulted = try_reg_write(priv_write_cr0, old & ~CR0_WP, &fi);
	expect_register_kept(name, "write_cr0", "mov to CR0 clearing WP", faulted, &fi, old, read_cr0());
	/* VTL1 is the same one: the boot info says so, already enabled, still serving. */
	report_value("vtl1_persists_flag", (boot_info->flags & VTL_BOOT_F_VTL1_PERSISTS) != 0);
	report_value("vtl1_available_flag", (boot_info->flags & VTL_BOOT_F_VTL1_AVAILABLE) != 0);
	if (!(boot_info->flags & VTL_BOOT_F_VTL1_PERSISTS) || (boot_info->flags & VTL_BOOT_F_VTL1_AVAILABLE))
		fail(name, "the boot info does not say that VTL1 persisted");
	expect_status(name, "enable_vtl1_again", VTL_HC_ENABLE_VTL1, "VTL_HC_ENABLE_VTL1",
		      hypercall(VTL_HC_ENABLE_VTL1, 0, 0, 0, NULL), VTL_E_ALREADY_ENABLED);
	/* VTL1 keeps every page but the text NX.  Where the host has no NX memory attribute
	 * (`vtl caps`), NX is the page tables' and holds once they are locked: this kernel
	 * hardens itself as any kernel does (VTL1 started over for it), then data must not
	 * run.  The protections VTL1 set at the kexec are what harden asks again. */
	harden_persisted(name);
	harden_lock(name, 1);
	attack_exec(name, "data_page", "exec_data_page", "execute a data page", data_page, &fi);
	echo_still_works(name);
	pass(name);
}

/* (a) a tampered image, (b) the trusted one: sealed, (c) the jump under policy deny,
 * (d) the jump after KEXEC_UNLOAD, (e) a direct jump into the unvalidated image. */
SCENARIO(sc_kexec_deny, "kexec-deny",
	 "kexec a tampered image, write a validated one, jump denied or unvalidated: all refused")
{
	const char *name = "kexec-deny";
	harden(name, 1);
	if (heki_mode()) {      /* nothing to ask: no validation, no policy; the changed image runs */
		load_staged(name, "kexec-after-teardown", (uint64_t)_text_start);
		heki_kexec_tamper(name, &kreq);
		heki_kexec_jump(name, &kreq);
	}
	load_staged(name, "kexec-after-teardown", 0);
	uint64_t refused = 0;
	/* (a) one byte of the copied text flipped */
	volatile uint8_t *byte = (volatile uint8_t *)(kreq.seg[0].paddr + 16);
	*byte ^= 0xFF;
	uint64_t st = kexec_validate();
	report_status("validate_tampered", VTL_CALL_KEXEC_VALIDATE, st);
	refused += st == VTL_E_POLICY;
	report_value("tampered_page_attrs", protection_of(kreq.seg[0].paddr));   /* back to rw- NX */
	*byte ^= 0xFF;                          /* writable again: the refusal gave it back */
	/* (b) the trusted image: sealed until unloaded */
	st = kexec_validate();
	report_status("validate_trusted", VTL_CALL_KEXEC_VALIDATE, st);
	if (st != VTL_OK)
		fail(name, "the trusted image was refused");
	report_value("sealed_page_attrs", protection_of(kreq.seg[0].paddr));
	attack_write(name, "validated_segment", "a validated segment", kreq.seg[0].paddr + 64);
	/* (c) policy deny */
	st = vtl_call(VTL_CALL_KEXEC_JUMP, 0, 0, NULL);
	report_status("jump_denied", VTL_CALL_KEXEC_JUMP, st);
	refused += st == VTL_E_POLICY;
	/* (d) unload, then jump */
	must(name, "kexec_unload", VTL_CALL_KEXEC_UNLOAD, "KEXEC_UNLOAD", vtl_call(VTL_CALL_KEXEC_UNLOAD, 0, 0, NULL));
	report_value("unloaded_page_attrs", protection_of(kreq.seg[0].paddr));
	st = vtl_call(VTL_CALL_KEXEC_JUMP, 0, 0, NULL);
	report_status("jump_unvalidated", VTL_CALL_KEXEC_JUMP, st);
	refused += st == VTL_E_POLICY;
	/* (e) straight into the image's entry, with code planted there */
	struct fault_info fi;
	attack_exec(name, "kexec_entry", "exec_kexec_entry", "jump into the unvalidated image",
		    (uint8_t *)kreq.entry, &fi);
	refused++;
	report_value("refused", refused);       /* 4: (a), (c), (d), (e); (b) sealed */
	if (refused != 4)
		fail(name, "a kexec step was not refused");
	echo_still_works(name);
	pass(name);
}

/* Malformed and unsealable requests: each refused with nothing sealed (the valid request
 * afterwards would meet an immutable page otherwise), then the valid one. */
static struct vtl_kexec_request bad;

static void bad_request(const char *name, const char *key, uint64_t want, uint64_t *wrong)
{
	uint64_t rcx = 0, st = vtl_call(VTL_CALL_KEXEC_VALIDATE, (uint64_t)&bad, 0, &rcx);
	report_status(key, VTL_CALL_KEXEC_VALIDATE, st);
	printf("%s -> %s\n", key, vtl_status_name(st));
	if (st != want || rcx == 1)
		(*wrong)++;
	memcpy(&bad, &kreq, sizeof(bad));
	(void)name;
}

SCENARIO(sc_kexec_bad, "kexec-bad-requests", "KEXEC_VALIDATE with malformed and unsealable requests: each refused")
{
	const char *name = "kexec-bad-requests";
	uint64_t wrong = 0, text = (uint64_t)_text_start;
	harden(name, 1);
	load_staged(name, "kexec-after-teardown", 0);
	memcpy(&bad, &kreq, sizeof(bad));
	bad.nr_segments = 0;
	bad_request(name, "bad_no_segments", VTL_E_INVALID_ARG, &wrong);
	bad.nr_segments = VTL_KEXEC_MAX_SEGMENTS + 1;
	bad_request(name, "bad_too_many_segments", VTL_E_INVALID_ARG, &wrong);
	bad.seg[0].paddr += 8;
	bad_request(name, "bad_misaligned", VTL_E_INVALID_ARG, &wrong);
	bad.seg[1].paddr = bad.seg[0].paddr;
	bad_request(name, "bad_overlapping", VTL_E_INVALID_ARG, &wrong);
	bad.seg[0].filesz = bad.seg[0].memsz + 1;
	bad_request(name, "bad_filesz", VTL_E_INVALID_ARG, &wrong);
	bad.entry = bad.seg[1].paddr;
	bad_request(name, "bad_entry_not_x", VTL_E_INVALID_ARG, &wrong);
	bad.seg[bad.nr_segments - 1].paddr = boot_info->vtl1_base;
	bad_request(name, "bad_in_vtl1", VTL_E_INVALID_ARG, &wrong);
	bad.seg[bad.nr_segments - 1].memsz = 1ULL << 63;
	bad_request(name, "bad_huge", VTL_E_INVALID_ARG, &wrong);
	bad.seg[0].reserved = 1;
	bad_request(name, "bad_reserved", VTL_E_INVALID_ARG, &wrong);
	memset(bad.scenario, 'x', sizeof(bad.scenario));
	bad_request(name, "bad_scenario", VTL_E_INVALID_ARG, &wrong);
	uint64_t rcx = 0, st = vtl_call(VTL_CALL_KEXEC_VALIDATE, boot_info->vtl1_base, 0, &rcx);
	report_status("bad_request_in_vtl1", VTL_CALL_KEXEC_VALIDATE, st);
	wrong += st != VTL_E_INVALID_ARG;
	/* Well formed, but pages VTL1 will not seal: immutable text, a locked page table. */
	bad.nr_segments = 1;
	bad.priv_pages = 0;
	bad.entry = text;
	bad.seg[0] = (struct vtl_kexec_segment){ text, 0, 4096, VTL_SEG_R | VTL_SEG_X, 0 };
	bad_request(name, "bad_kernel_text", VTL_E_POLICY, &wrong);
	uint64_t pt = (uint64_t)pte_for((uint64_t)data_page) & ~0xFFFULL;
	bad.nr_segments = 1;
	bad.priv_pages = 0;
	bad.entry = pt;
	bad.seg[0] = (struct vtl_kexec_segment){ pt, 0, 4096, VTL_SEG_R | VTL_SEG_X, 0 };
	bad_request(name, "bad_page_table", VTL_E_POLICY, &wrong);
	report_value("text_attrs", protection_of(text));        /* still NW (r-x, immutable) */
	report_value("table_attrs", protection_of(pt));         /* still NW|NX */
	/* A byte past a segment's file size: unmeasured, refused; the page is given back. */
	volatile uint8_t *tail = (volatile uint8_t *)(kreq.seg[0].paddr + kreq.seg[0].filesz);
	*tail = 0xCC;
	bad_request(name, "bad_tail_not_zero", VTL_E_POLICY, &wrong);
	*tail = 0;                      /* writable again: the refusal gave the page back */
	/* The valid request, once. */
	st = kexec_validate();
	report_status("valid", VTL_CALL_KEXEC_VALIDATE, st);
	wrong += st != VTL_OK;
	st = kexec_validate();
	report_status("validate_twice", VTL_CALL_KEXEC_VALIDATE, st);
	wrong += st != VTL_E_POLICY;
	st = vtl_call(VTL_CALL_KEXEC_UNLOAD, 0, 0, NULL);
	report_status("unload", VTL_CALL_KEXEC_UNLOAD, st);
	wrong += st != VTL_OK;
	st = vtl_call(VTL_CALL_KEXEC_UNLOAD, 0, 0, NULL);
	report_status("unload_twice", VTL_CALL_KEXEC_UNLOAD, st);
	wrong += st != VTL_E_POLICY;
	report_value("unexpected_statuses", wrong);
	if (wrong)
		fail(name, "unexpected status");
	echo_still_works(name);
	pass(name);
}

/* ---- modules ------------------------------------------------------------------------------
 * The module area: pages the kernel maps executable in its own tables before the lock and
 * asks VTL1 to keep NW|NX, so that W^X holds on every host (where the host has no NX
 * memory attribute, the tables decide what runs).  VTL0 cannot write it: VTL1 fills it
 * with a module's bytes (MODULE_VALIDATE with RDX = where they are) once it has sealed,
 * hashed and scanned them, and zeroes it again when it refuses or unloads one. */
#define MODULE_AREA_PAGES 2
extern const uint8_t module_image[MODULE_SIZE], module_priv_image[MODULE_SIZE];
uint8_t module_area[MODULE_AREA_PAGES][4096] __attribute__((aligned(4096)));
uint8_t module_copy[MODULE_SIZE] __attribute__((aligned(4096)));     /* a changed copy */
volatile uint64_t module_marker __attribute__((aligned(8)));

static void harden_with_module_area(const char *name)
{
	uint64_t m = (uint64_t)module_area[0];
	require_vtl1(name);
	harden_protect(name);
	must(name, "protect_module_area", VTL_CALL_PROTECT, "module area r-- NX (VTL1 fills it)",
	     prot(m, MODULE_AREA_PAGES, VTL_MEM_NW | VTL_MEM_NX, 0));
	for (int i = 0; i < MODULE_AREA_PAGES; i++) {
		*pte_for(m + i * 4096ULL) &= ~(1ULL << 63);
		invlpg(m + i * 4096ULL);
	}
	harden_lock(name, 1);
}

static uint64_t module_call(uint64_t code, uint64_t gpa, const void *src)
{
	return vtl_call4(code, gpa, 1, (uint64_t)src, 0, NULL);
}

struct module_run {
	volatile uint64_t *marker;
	uint64_t result;
};
static void run_module(void *p)
{
	struct module_run *r = p;
	r->result = ((uint64_t (*)(volatile uint64_t *))(uint64_t)module_area[0])(r->marker);
}

SCENARIO(sc_module_load, "module-load",
	 "after END_OF_BOOT: load an allowlisted module (sealed, hashed, scanned), run, unload it")
{
	const char *name = "module-load";
	uint64_t m = (uint64_t)module_area[0];
	harden_with_module_area(name);
	report_value("module_area", m);
	report_value("module_area_attrs", protection_of(m));           /* NW|NX */
	must(name, "module_validate", VTL_CALL_MODULE_VALIDATE, "MODULE_VALIDATE",
	     module_call(VTL_CALL_MODULE_VALIDATE, m, module_image));
	report_value("validated_attrs", protection_of(m));             /* NW|NX */
	attack_write(name, "module_validated", "a validated module page", m + 8);
	must(name, "module_load", VTL_CALL_MODULE_LOAD, "MODULE_LOAD", module_call(VTL_CALL_MODULE_LOAD, m, NULL));
	report_value("loaded_attrs", protection_of(m));                /* NW: r-x */
	report_exec("module", m, m, (uint64_t)&module_marker, MODULE_MARK);
	struct module_run r = { &module_marker, 0 };
	struct fault_info fi;
	if (try_run(run_module, &r, &fi)) {
		report_fault("module_run", &fi);
		fail(name, "the loaded module did not run");
	}
	report_value("module_result", r.result);
	if (r.result != MODULE_RET || module_marker != MODULE_MARK)
		fail(name, "the module did not do its work");
	attack_write(name, "module_loaded", "a loaded module page", m + 8);
	must(name, "module_unload", VTL_CALL_MODULE_UNLOAD, "MODULE_UNLOAD",
	     module_call(VTL_CALL_MODULE_UNLOAD, m, NULL));
	uint64_t a = protection_of(m);
	report_value("unloaded_attrs", a);                             /* NW|NX, zeroed by VTL1 */
	if (a != (VTL_MEM_NW | VTL_MEM_NX) || *(volatile uint64_t *)m)
		fail(name, "the module area is not sealed and empty after unload");
	/* A module not on the allowlist: one byte changed. */
	memcpy(module_copy, module_image, MODULE_SIZE);
	module_copy[MODULE_SIZE - 1] ^= 1;
	expect_status(name, "module_untrusted", VTL_CALL_MODULE_VALIDATE, "MODULE_VALIDATE (changed byte)",
		      module_call(VTL_CALL_MODULE_VALIDATE, m, module_copy), VTL_E_POLICY);
	report_value("untrusted_attrs", protection_of(m));
	/* An allowlisted module with a privileged instruction: the scan refuses it. */
	expect_status(name, "module_privileged", VTL_CALL_MODULE_LOAD, "MODULE_LOAD (MOV to CR4 inside)",
		      module_call(VTL_CALL_MODULE_LOAD, m, module_priv_image), VTL_E_POLICY);
	a = protection_of(m);
	report_value("privileged_attrs", a);
	if (a != (VTL_MEM_NW | VTL_MEM_NX) || *(volatile uint64_t *)m)
		fail(name, "a refused module left the area changed");
	/* The other kind: rw- NX pages VTL0 fills itself (not mapped executable here). */
	memcpy(module_copy, module_image, MODULE_SIZE);
	must(name, "module_rw_validate", VTL_CALL_MODULE_VALIDATE, "MODULE_VALIDATE (rw- NX pages)",
	     module_call(VTL_CALL_MODULE_VALIDATE, (uint64_t)module_copy, NULL));
	report_value("rw_validated_attrs", protection_of((uint64_t)module_copy));    /* NW|NX */
	must(name, "module_rw_unload", VTL_CALL_MODULE_UNLOAD, "MODULE_UNLOAD (rw- NX pages)",
	     module_call(VTL_CALL_MODULE_UNLOAD, (uint64_t)module_copy, NULL));
	report_value("rw_unloaded_attrs", protection_of((uint64_t)module_copy));     /* NX */
	echo_still_works(name);
	pass(name);
}

/* The lock's W^X holds for a module area too: mapped executable while VTL0 may still
 * write it (rw- NX for VTL1, which only the tables can enforce on some hosts), the lock is
 * refused (VTL1: VALUE lock_wx_violations); made NW|NX, it is accepted. */
SCENARIO(sc_module_area_rw, "module-area-writable",
	 "a module area mapped executable while still writable: VTL1 refuses the lock until it is NW|NX")
{
	const char *name = "module-area-writable";
	uint64_t m = (uint64_t)module_area[0], pinning = 0, ps = (uint64_t)_priv_start;
	require_vtl1(name);
	harden_protect(name);
	for (int i = 0; i < MODULE_AREA_PAGES; i++) {
		*pte_for(m + i * 4096ULL) &= ~(1ULL << 63);
		invlpg(m + i * 4096ULL);
	}
	report_value("module_area", m);
	expect_status(name, "lock_with_writable_area", VTL_CALL_LOCK_PAGE_TABLES, "lock, module area rw- but mapped X",
		      vtl_call(VTL_CALL_LOCK_PAGE_TABLES, ps, PAGES(ps, _priv_end), &pinning), VTL_E_POLICY);
	must(name, "protect_module_area", VTL_CALL_PROTECT, "module area r-- NX (VTL1 fills it)",
	     prot(m, MODULE_AREA_PAGES, VTL_MEM_NW | VTL_MEM_NX, 0));
	harden_lock(name, 1);
	/* And after the lock nothing makes it writable again. */
	expect_status(name, "protect_area_rw_after_lock", VTL_CALL_PROTECT, "module area rw- after the lock",
		      prot(m, MODULE_AREA_PAGES, VTL_MEM_NX, 0), VTL_E_POLICY);
	echo_still_works(name);
	pass(name);
}

/* ---- emulated RESET ------------------------------------------------------------------------ */
static void after_reset(const char *name)
{
	report_value("boot_count", boot_info->boot_count);
	check_vtl1_region_gone(name);
	write_lands(name, "rodata", (uint64_t)&rodata_target);     /* immutable before the reset */
	enable_again(name);
	pass(name);
}

SCENARIO(sc_reset, "reset-request", "harden, END_OF_BOOT, VTL_HC_RESET; the next boot finds nothing of it")
{
	const char *name = "reset-request";
	if (boot_info->boot_count)
		after_reset(name);
	report_value("boot_count", 0);
	harden(name, 1);
	uint64_t st = hypercall(VTL_HC_RESET, 0, 0, 0, NULL);
	report_status("reset", VTL_HC_RESET, st);
	fail(name, "VTL_HC_RESET returned");
}

SCENARIO(sc_reset_tf, "reset-triple-fault",
	 "protect, END_OF_BOOT, then triple-fault; with reset_on_triple_fault the next boot is clean")
{
	const char *name = "reset-triple-fault";
	if (boot_info->boot_count)
		after_reset(name);
	report_value("boot_count", 0);
	/* Protections and END_OF_BOOT, but no lock: the lock pins IDTR, and an empty IDT is
	 * how this kernel triple-faults (as the "triple-fault" scenario). */
	require_vtl1(name);
	harden_protect(name);
	must(name, "end_of_boot", VTL_CALL_END_OF_BOOT, "end of boot", vtl_call(VTL_CALL_END_OF_BOOT, 0, 0, NULL));
	static const struct desc_ptr empty = { 0, 0 };
	printf("loading an empty IDT and executing ud2\n");
	priv_lidt(&empty);
	asm volatile("ud2");
	fail(name, "survived a triple fault");
}
