/* Cross-VP attacks (docs/smp.md, "Cross-VP attacks"): what only a second VP can do while
 * the boot VP is inside VTL1, or in the middle of a step VTL1 or the VMM takes for it.
 * VP0 hardens and asks; VP1 (an AP, guest_vtl0/smp.c) attacks at the same time.  As
 * everywhere, the verdict is the VMM's: every scenario names what it attacks (TARGET,
 * EXEC, REGISTER: the VMM reads memory, markers and the attacking VP's registers back
 * after the run), and vtl/tools/invariants.py checks what no single target shows (a kexec
 * image VTL1 validated against the trusted file, END_OF_BOOT only with every VP pinned,
 * nothing of VTL1 after a RESET).
 *
 * Each needs two VPs (vtl attack reads "(--vps 2+)" from the description; docs/smp.md)
 * and starts with require_vtl1, so that a partition without VTL1 (Heki mode) refuses
 * its first request.  boot_info->param = 1 is the control run where one is cheap (2, 3,
 * 5, 7, 8): the scenario leaves out the protection under test, and the VMM must then see
 * the attack succeed (tests/test_xvp_attacks.py). */
#include "vtl0.h"

extern char _scenarios_page_end[], _ro_after_init_start[], _ro_after_init_end[], _data_start[];

#define PTE_NX (1ULL << 63)
#define CONTROL (boot_info->param == 1)     /* the control run: the protection left out */

/* What VP0 and the attacking AP share (one attack at a time). */
static struct {
	volatile uint64_t go;           /* VP0: TSC when the attack may start (0: not yet) */
	volatile uint64_t delay;        /* ticks after go before the AP acts */
	volatile uint64_t stop;         /* VP0: enough */
	volatile uint64_t tries, landed, faults, last;
	struct fault_info fi;           /* the AP's first fault */
} xs;

static inline void relax(void) { asm volatile("pause" ::: "memory"); }

static void wait_tsc(uint64_t t)
{
	while (rdtsc() < t)
		relax();
}

static void wait_go(void)
{
	while (!xs.go)
		relax();
	wait_tsc(xs.go + xs.delay);
}

/* VTL1 first (Heki mode: refused, nothing changes), then the VPs this needs. */
static void xvp_begin(const char *name)
{
	require_vtl1(name);
	if (boot_info->nr_vps < 2)
		fail(name, "needs at least 2 VPs (vtl attack --vps 2)");
	memset((void *)&xs, 0, sizeof(xs));
	report_value("control_run", CONTROL);
}

struct xpoke {
	volatile uint64_t *at;
	uint64_t value;
};
static void xpoke_fn(void *p)
{
	struct xpoke *k = p;
	*k->at = k->value;
}

/* One write from the AP under try_run: 1 if it faulted (the first fault in xs.fi). */
static int ap_poke(volatile uint64_t *at, uint64_t value)
{
	struct xpoke k = { at, value };
	struct fault_info fi;
	xs.tries++;
	if (try_run(xpoke_fn, &k, &fi)) {
		if (!xs.faults++)
			xs.fi = fi;
		return 1;
	}
	xs.landed++;
	xs.last = value;
	return 0;
}

static void report_ap(const char *fault_key)
{
	report_value("ap_tries", xs.tries);
	report_value("ap_landed", xs.landed);
	report_value("ap_faults", xs.faults);
	if (xs.faults)
		report_fault(fault_key, &xs.fi);
}

/* TSC ticks of VTL1 hashing 4 KiB: a yardstick for "well inside a long VTL1 call" that
 * scales with the host (VTL1's work and the AP's wait are both guest instructions). */
static uint8_t yard_digest[32];
static uint64_t hash_4k_ticks(void)
{
	uint64_t t = rdtsc();
	vtl_call4(VTL_CALL_SHA256, (uint64_t)data_page, 4096, (uint64_t)yard_digest, 0, NULL);
	return rdtsc() - t;
}

/* ---- 1. a kexec image rewritten while VTL1 validates it ------------------------------
 * VTL1 seals the segments (NW|NX) before it hashes them.  VP1 rewrites a word of the
 * first segment while VTL1 hashes (well after the seal, long before the hash ends): the
 * write must fault, and what VTL1 validated must be the trusted file, byte for byte
 * (invariants.py compares the sealed segments with the staged ELF).  A write that came
 * before the seal is hashed, and the image refused: blocked too. */
static void kexec_rewriter(uint64_t vp, uint64_t target)
{
	(void)vp;
	wait_go();
	uint64_t v = *(volatile uint64_t *)target ^ 0x5A5A5A5A5A5A5A5AULL;
	while (!xs.stop && xs.tries < 64)
		if (ap_poke((volatile uint64_t *)target, v))
			break;
}

SCENARIO(sc_xvp_kexec, "xvp-kexec-rewrite",
	 "attack: VP1 rewrites a kexec image while VTL1 validates it on VP0 (--vps 2+, staged)")
{
	const char *name = "xvp-kexec-rewrite";
	xvp_begin(name);
	harden_protect(name);
	harden_lock(name, 1);
	struct vtl_kexec_request *r = kexec_stage(name, "kexec-after-teardown", 0);
	uint64_t target = r->seg[0].paddr + 64;
	xs.delay = 2 * hash_4k_ticks();
	report_value("rewrite_gpa", target);
	report_value("rewrite_delay_ticks", xs.delay);
	printf("ATTACK: VP1 rewrites %#lx %lu ticks into KEXEC_VALIDATE\n", target, xs.delay);
	smp_post(1, kexec_rewriter, target);
	xs.go = rdtsc();
	uint64_t rcx = 0, st = vtl_call(VTL_CALL_KEXEC_VALIDATE, (uint64_t)r, 0, &rcx);
	xs.stop = 1;
	smp_wait(1);
	report_status("kexec_validate", VTL_CALL_KEXEC_VALIDATE, st);
	report_ap("kexec_rewrite");
	printf("KEXEC_VALIDATE -> %s; VP1's rewrites: %lu landed, %lu refused\n", vtl_status_name(st), xs.landed,
	       xs.faults);
	if (st != VTL_OK && st != VTL_E_POLICY)
		fail(name, "unexpected status");
	/* Validated: the image stays sealed; the VMM compares it with the trusted file. */
	pass(name);
}

/* ---- 2. a page-table entry edited while VTL1 locks the tables -------------------------
 * VTL1 walks VTL0's page tables at the lock and makes them read-only.  VP1 clears NX in
 * the PTE of a writable data page three quarters into the lock (timed by a first lock
 * VTL1 refuses after its whole walk; the walk reads that PTE's table in its first half),
 * then runs code it planted there.  Blocked: the walk saw
 * a consistent tree (each table page sealed before it was read), the edit is a #PF, the
 * entry reads back unchanged and the planted code never runs. */
static uint8_t spare_page[4096] __attribute__((aligned(4096)));

static void pte_editor(uint64_t vp, uint64_t pte)
{
	(void)vp;
	wait_go();
	uint64_t old = *(volatile uint64_t *)pte;
	ap_poke((volatile uint64_t *)pte, old & ~PTE_NX);
	invlpg((uint64_t)data_page);
	plant_marker_code(data_page, EXEC_MARK);      /* data: VTL0 may write it */
	struct fault_info fi;
	if (try_run(call_fn, data_page, &fi))
		report_fault("exec_data_page", &fi);
}

static uint64_t lock_call(void)
{
	uint64_t ps = (uint64_t)_priv_start, pinning = 0;
	return vtl_call(VTL_CALL_LOCK_PAGE_TABLES, ps, PAGES(ps, _priv_end), &pinning);
}

SCENARIO(sc_xvp_pte, "xvp-pte-during-lock",
	 "attack: VP1 edits a page-table entry while VTL1 locks the tables on VP0 (--vps 2+)")
{
	const char *name = "xvp-pte-during-lock";
	xvp_begin(name);
	harden_protect(name);
	smp_boot(name);
	/* The yardstick: a lock VTL1 refuses once its walk is done (a writable page mapped
	 * executable); nothing is locked after it. */
	uint64_t *spte = pte_for((uint64_t)spare_page);
	*spte &= ~PTE_NX;
	invlpg((uint64_t)spare_page);
	uint64_t t = rdtsc();
	uint64_t st = lock_call();
	t = rdtsc() - t;
	report_value("lock_yardstick_status", st);      /* a VALUE: not the attack's mechanism */
	if (st != VTL_E_POLICY)
		fail(name, "the yardstick lock was not refused");
	*spte |= PTE_NX;
	invlpg((uint64_t)spare_page);
	uint64_t *pte = pte_for((uint64_t)data_page), old = *pte;
	report_target("page_table_entry", (uint64_t)pte, 8, old);
	report_exec("data_page", (uint64_t)data_page, (uint64_t)data_page, (uint64_t)&exec_marker, EXEC_MARK);
	xs.delay = 3 * t / 4;           /* well past the walk's read of this PTE, before the lock ends */
	report_value("edit_delay_ticks", xs.delay);
	printf("ATTACK: VP1 clears NX in the PTE at %#lx %lu ticks into the lock\n", (uint64_t)pte, xs.delay);
	smp_post(1, pte_editor, (uint64_t)pte);
	xs.go = rdtsc();
	if (CONTROL) {                          /* no lock: the edit lands, the code runs */
		smp_wait(1);
		st = VTL_E_POLICY;
	} else {
		st = lock_call();
		smp_wait(1);
	}
	report_status("lock_page_tables", VTL_CALL_LOCK_PAGE_TABLES, st);
	report_ap("pte_edit");
	if (*(volatile uint64_t *)pte != old || exec_marker == EXEC_MARK)
		attack_succeeded(name, "the page-table edit landed", *pte);
	if (st != VTL_OK)
		fail(name, "the lock was refused");
	if (!xs.faults)
		fail(name, "VP1's edit neither landed nor faulted");
	smp_lock_aps(name, 0);
	must(name, "end_of_boot", VTL_CALL_END_OF_BOOT, "end of boot", vtl_call(VTL_CALL_END_OF_BOOT, 0, 0, NULL));
	printf("the PTE still reads %#lx; VP1's edit was refused\n", *pte);
	pass(name);
}

/* ---- 3. a write in the window of a protect call ---------------------------------------
 * VP1 writes a counter into a data page as fast as it can; VP0 asks VTL1 to make the page
 * read-only.  Once the call has returned no write of VP1 may land: the VMM reads back the
 * value the page had when VP0's call returned, and VP1's next write is an intercept VTL1
 * answers with #PF. */
static uint64_t window_page[512] __attribute__((aligned(4096)));

static void window_writer(uint64_t vp, uint64_t arg)
{
	(void)vp, (void)arg;
	for (uint64_t i = 1; !xs.stop && i < 1000000; i++)
		if (ap_poke(&window_page[0], i))
			break;
}

SCENARIO(sc_xvp_window, "xvp-protect-window",
	 "attack: VP1 writes a page while VP0 asks VTL1 to protect it (--vps 2+)")
{
	const char *name = "xvp-protect-window";
	xvp_begin(name);
	harden_protect(name);
	harden_lock(name, 0);           /* VTL_CALL_PROTECT is a boot-time call */
	smp_post(1, window_writer, 0);
	while (xs.landed < 4)
		relax();
	uint64_t st = CONTROL ? VTL_OK : prot((uint64_t)window_page, 1, VTL_MEM_NW | VTL_MEM_NX, 0);
	uint64_t v = window_page[0];
	report_target("window_page", (uint64_t)window_page, 8, v);
	printf("ATTACK: VP1 writing; the protection returned with %#lx in the page\n", v);
	if (CONTROL)
		while (xs.landed < v + 4)
			relax();
	xs.stop = 1;
	smp_wait(1);
	report_status("protect", VTL_CALL_PROTECT, st);
	report_value("value_at_protect", v);
	report_value("ap_last_landed", xs.last);
	report_ap("late_write");
	if (window_page[0] != v)
		attack_succeeded(name, "a write landed after the protection took effect", window_page[0]);
	if (st != VTL_OK)
		fail(name, "VTL_CALL_PROTECT refused");
	if (xs.faults != 1 || xs.fi.vector != 14)
		fail(name, "VP1's next write did not #PF");
	printf("page still %#lx; VP1's write %#lx was a #PF\n", window_page[0], xs.last + 1);
	pass(name);
}

/* ---- 4. a VTL call's input changed after VTL1 read it ----------------------------------
 * VTL_CALL_PROTECT_PAGES takes a page list in VTL0 memory.  VP0 asks, 16 times, for the
 * pages of a one-entry list to become rw- (NX); VP1 flips the entry between a data page
 * and a page of immutable kernel text all the while.  VTL1 copies the list once: each
 * call is about the page it copied (the data page: done; the text page: VTL_E_IMMUTABLE),
 * never a check of one and a change of the other.  Then the text is written: #PF, and the
 * VMM reads it back unchanged. */
static uint8_t list_page[4096] __attribute__((aligned(4096)));
static volatile uint64_t flip_list[1] __attribute__((aligned(8)));

static void list_flipper(uint64_t vp, uint64_t text)
{
	(void)vp;
	while (!xs.stop) {
		flip_list[0] = (uint64_t)list_page;
		flip_list[0] = text;
		xs.tries++;
	}
}

SCENARIO(sc_xvp_input, "xvp-input-change",
	 "attack: VP1 flips a page list while VTL1 serves VTL_CALL_PROTECT_PAGES on VP0 (--vps 2+)")
{
	const char *name = "xvp-input-change";
	xvp_begin(name);
	uint64_t target = (uint64_t)&write_u64_fn & ~7ULL, text = target & ~0xFFFULL;
	harden_protect(name);
	harden_lock(name, 0);           /* VTL_CALL_PROTECT_PAGES is a boot-time call */
	report_value("list_data_page", (uint64_t)list_page);
	report_value("list_text_page", text);
	smp_post(1, list_flipper, text);
	while (xs.tries < 4)
		relax();
	uint64_t ok = 0, immutable = 0, other = 0;
	for (int i = 0; i < 16; i++) {
		uint64_t st = vtl_call4(VTL_CALL_PROTECT_PAGES, (uint64_t)flip_list, 1, VTL_MEM_NX, 0, NULL);
		ok += st == VTL_OK;
		immutable += st == VTL_E_IMMUTABLE;
		other += st != VTL_OK && st != VTL_E_IMMUTABLE;
	}
	xs.stop = 1;
	smp_wait(1);
	report_value("protect_pages_ok", ok);
	report_value("protect_pages_immutable", immutable);
	report_value("protect_pages_other", other);
	report_value("text_attrs", protection_of(text));        /* VTL1's word: still r-x */
	printf("16 calls with a flipping list: %lu done (the data page), %lu immutable (the text page)\n", ok,
	       immutable);
	if (other)
		fail(name, "unexpected status");
	attack_write(name, "kernel_text", "kernel text after the flipped list", target);
	echo_still_works(name);
	pass(name);
}

/* ---- 5. the privileged section while another VP is single-stepped ---------------------
 * An allowed MOV to CR3 on VP0 is judged, then its RET is single-stepped on a temporary
 * mapping of the section.  VP1 clears CR0.WP through the section all the while: had it
 * run while the section was mapped for VP0's step, the MOV would execute unjudged.  The
 * VMM pauses every other VP for a step: each of VP1's writes is a register intercept
 * VTL1 refuses, and the VMM reads VP1's CR0 back unchanged. */
static void wp_clearer(uint64_t vp, uint64_t arg)
{
	(void)vp, (void)arg;
	uint64_t old = read_cr0();
	report_register("cr0", VTL_REG_CR0, old, 0);    /* from VP1: the VMM reads VP1's CR0 */
	while (!xs.stop && xs.tries < 400) {
		struct fault_info fi;
		int f = try_reg_write(priv_write_cr0, old & ~CR0_WP, &fi);
		xs.tries++;
		if (f) {
			if (!xs.faults++)
				xs.fi = fi;
		}
		if (read_cr0() != old) {
			xs.landed++;
			break;
		}
	}
}

SCENARIO(sc_xvp_step, "xvp-step-section",
	 "attack: VP1 clears CR0.WP while VP0 is single-stepped in the privileged section (--vps 2+)")
{
	const char *name = "xvp-step-section";
	xvp_begin(name);
	harden_protect(name);
	if (CONTROL)
		smp_boot(name);         /* nothing locked: nothing judges VP1's CR0 */
	else
		harden_lock(name, 1);
	smp_post(1, wp_clearer, 0);
	while (!xs.tries)
		relax();
	uint64_t cr3 = read_cr3(), n = 40;
	for (uint64_t i = 0; i < n && !xs.landed; i++)
		priv_write_cr3(cr3);    /* judged (allowed), then its RET single-stepped */
	xs.stop = 1;
	smp_wait(1);
	report_value("vp0_cr3_writes", n);
	report_ap("clear_wp");
	printf("VP0: %lu CR3 writes stepped; VP1: %lu CR0.WP clears, %lu refused\n", n, xs.tries, xs.faults);
	if (xs.landed)
		attack_succeeded(name, "VP1 cleared CR0.WP", read_cr0());
	if (!xs.faults || xs.fi.vector != 13)
		fail(name, "VP1's writes were not refused with #GP");
	pass(name);
}

/* ---- 6. lifecycle calls from two VPs at once ------------------------------------------
 * VP0 validates the staged kernel (VTL1 persisting).  First VP1 asks for the jump itself:
 * refused, the next kernel starts on the boot VP (as Linux moves kexec to its reboot CPU),
 * never on a VP chosen by whoever asks while the boot VP is anywhere, in VTL1 perhaps.
 * Then VP0 jumps, and VP1 calls END_OF_BOOT and KEXEC_JUMP in a loop from well inside
 * VP0's jump on: VTL1's lock serialises them, and a kexec is one step, so none of VP1's
 * calls is served on the state VTL1 made for the next kernel (an END_OF_BOOT there would
 * end a boot that has not begun).  That kernel (xvp-after-persist) hardens itself, its
 * boot its own, and attacks its own page-table entry: the VMM reads it back unchanged. */
static void ap_kexec_jump(uint64_t vp, uint64_t arg)
{
	(void)arg;
	ap[vp].result = vtl_call(VTL_CALL_KEXEC_JUMP, 0, 0, NULL);
	report_status("ap_kexec_jump", VTL_CALL_KEXEC_JUMP, ap[vp].result);
}

static void lifecycle_hammer(uint64_t vp, uint64_t arg)
{
	(void)vp, (void)arg;
	wait_go();
	while (!xs.stop) {      /* until the kexec takes this VP offline */
		uint64_t code = xs.tries & 1 ? VTL_CALL_KEXEC_JUMP : VTL_CALL_END_OF_BOOT;
		xs.last = vtl_call(code, 0, 0, NULL);
		xs.tries++;
	}
}

SCENARIO(sc_xvp_lifecycle, "xvp-lifecycle-race",
	 "attack: VP1 calls KEXEC_JUMP, END_OF_BOOT while VP0 kexecs (--vps 2+, staged, persist)")
{
	const char *name = "xvp-lifecycle-race";
	xvp_begin(name);
	harden_protect(name);
	harden_lock(name, 1);
	struct vtl_kexec_request *r = kexec_stage(name, "xvp-after-persist", 0);
	must(name, "kexec_validate", VTL_CALL_KEXEC_VALIDATE, "KEXEC_VALIDATE",
	     vtl_call(VTL_CALL_KEXEC_VALIDATE, (uint64_t)r, 0, NULL));
	smp_run_on(1, ap_kexec_jump, 0);        /* returns only if refused */
	expect_status(name, "ap_kexec_jump", VTL_CALL_KEXEC_JUMP, "KEXEC_JUMP from VP1", ap[1].result,
		      VTL_E_POLICY);
	xs.delay = hash_4k_ticks() / 8;         /* VP0 well inside its jump */
	report_value("hammer_delay_ticks", xs.delay);
	smp_post(1, lifecycle_hammer, 0);
	printf("ATTACK: VP1 calls END_OF_BOOT and KEXEC_JUMP from %lu ticks into VP0's jump on\n", xs.delay);
	report_value("kexec_jump", 1);
	xs.go = rdtsc();
	uint64_t st = vtl_call(VTL_CALL_KEXEC_JUMP, 0, 0, NULL);
	xs.stop = 1;
	report_status("kexec_jump", VTL_CALL_KEXEC_JUMP, st);
	fail(name, "KEXEC_JUMP returned");
}

/* The next kernel of xvp-lifecycle-race (VTL1 persisted): each step of its hardening
 * reported rather than required, so that a boot the old kernel's VP1 ended for it shows
 * as what it is: protections refused, tables never locked, and its own PTE write landing. */
static uint64_t first_refusal;
static void step(const char *key, uint64_t code, uint64_t st)
{
	report_status(key, code, st);
	if (st != VTL_OK && !first_refusal)
		first_refusal = st;
}

SCENARIO(sc_xvp_after, "xvp-after-persist", "the kernel xvp-lifecycle-race starts: its boot is its own")
{
	const char *name = "xvp-after-persist";
	uint64_t ts = (uint64_t)_text_start, te = (uint64_t)_text_end, ps = (uint64_t)_priv_start;
	uint64_t v1 = boot_info->vtl1_base, v1e = v1 + boot_info->vtl1_size, mem = boot_info->mem_size;
	report_value("boot_count", boot_info->boot_count);
	paging_set_nx_except(ts, te);
	step("protect_text", VTL_CALL_PROTECT, prot(ts, PAGES(ts, ps), VTL_MEM_NW, VTL_PROTECT_IMMUTABLE));
	step("protect_rodata", VTL_CALL_PROTECT,
	     prot(te, PAGES(te, _scenarios_page_end), VTL_MEM_NW | VTL_MEM_NX, VTL_PROTECT_IMMUTABLE));
	step("protect_ro_after_init", VTL_CALL_PROTECT,
	     prot((uint64_t)_ro_after_init_start, PAGES(_ro_after_init_start, _ro_after_init_end), VTL_MEM_NX,
		  VTL_PROTECT_AFTER_BOOT));
	step("protect_data", VTL_CALL_PROTECT, prot((uint64_t)_data_start, PAGES(_data_start, v1), VTL_MEM_NX, 0));
	step("protect_low", VTL_CALL_PROTECT, prot(0, ts >> 12, VTL_MEM_NX, 0));
	if (mem > v1e)
		step("protect_high", VTL_CALL_PROTECT, prot(v1e, (mem - v1e) >> 12, VTL_MEM_NX, 0));
	if (!first_refusal)
		harden_lock(name, 1);   /* the APs again, the lock, each AP's, END_OF_BOOT */
	else
		printf("the boot is not this kernel's: %s\n", vtl_status_name(first_refusal));
	attack_write(name, "page_table_entry", "own page-table entry", (uint64_t)pte_for((uint64_t)data_page));
	if (first_refusal)
		fail(name, "a step of this kernel's hardening was refused");
	echo_still_works(name);
	pass(name);
}

/* ---- 7. an AP that never locks its registers ------------------------------------------
 * While an online AP has not pinned its registers VTL1 refuses END_OF_BOOT, so the boot
 * (when VTL0 is trusted, design section 9) goes on: the AP may still clear CR0.WP, and
 * VTL1 then refuses its lock (CR0.WP clear is nothing to pin), and END_OF_BOOT again.
 * Only once the AP has set WP and locked does the boot end; then its write to CR0.WP is a
 * register intercept VTL1 refuses, and the VMM reads the AP's CR0 back unchanged. */
static void ap_cr0_write(uint64_t vp, uint64_t clear)
{
	uint64_t old = read_cr0();
	struct fault_info fi;
	int f = try_reg_write(priv_write_cr0, clear ? old & ~CR0_WP : old | CR0_WP, &fi);
	ap[vp].result = f ? (uint64_t)fi.vector : 0;
	report_value(clear ? "ap_cr0_after_clear" : "ap_cr0_after_set", read_cr0());
}

static void ap_lock_status(uint64_t vp, uint64_t arg)
{
	(void)arg;
	ap[vp].result = lock_call();
	report_status("ap_lock_page_tables", VTL_CALL_LOCK_PAGE_TABLES, ap[vp].result);
}

static void ap_attack_wp(uint64_t vp, uint64_t arg)
{
	(void)arg;
	uint64_t old = read_cr0();
	report_register("cr0", VTL_REG_CR0, old, 0);    /* from the AP: the VMM reads its CR0 */
	struct fault_info fi;
	int f = try_reg_write(priv_write_cr0, old & ~CR0_WP, &fi);
	if (f)
		report_fault("ap_write_cr0", &fi);
	ap[vp].result = f ? (uint64_t)fi.vector : 0;
}

SCENARIO(sc_xvp_unlocked, "xvp-unlocked-ap-cr0",
	 "attack: an AP left unlocked clears CR0.WP, before and after END_OF_BOOT (--vps 2+)")
{
	const char *name = "xvp-unlocked-ap-cr0";
	xvp_begin(name);
	harden_protect(name);
	smp_boot(name);
	must(name, "lock_page_tables", VTL_CALL_LOCK_PAGE_TABLES, "lock page tables (VP0)", lock_call());
	uint64_t eob = VTL_CALL_END_OF_BOOT;
	expect_status(name, "eob_ap_unlocked", eob, "END_OF_BOOT, AP 1 unlocked", vtl_call(eob, 0, 0, NULL),
		      VTL_E_POLICY);
	smp_run_on(1, ap_cr0_write, 1);         /* still the boot: VTL0 is trusted */
	report_value("ap_clear_wp_fault", ap[1].result);
	if (ap[1].result)
		fail(name, "the unlocked AP's CR0 write during the boot was refused");
	smp_run_on(1, ap_lock_status, 0);
	expect_status(name, "ap_lock_wp_clear", VTL_CALL_LOCK_PAGE_TABLES, "AP 1's lock with CR0.WP clear",
		      ap[1].result, VTL_E_POLICY);
	expect_status(name, "eob_ap_wp_clear", eob, "END_OF_BOOT, AP 1 still unlocked", vtl_call(eob, 0, 0, NULL),
		      VTL_E_POLICY);
	smp_run_on(1, ap_cr0_write, 0);
	if (!CONTROL) {                 /* the control run: the AP attacks without its lock */
		smp_run_on(1, ap_lock_status, 0);
		expect_status(name, "ap_lock", VTL_CALL_LOCK_PAGE_TABLES, "AP 1's lock with CR0.WP set",
			      ap[1].result, VTL_OK);
		must(name, "end_of_boot", eob, "END_OF_BOOT, every VP locked", vtl_call(eob, 0, 0, NULL));
	}
	smp_run_on(1, ap_attack_wp, 0);
	if (ap[1].result != 13)
		attack_succeeded(name, "the AP's CR0.WP clear after END_OF_BOOT was not refused", ap[1].result);
	pass(name);
}

/* ---- 8. a RESET while another VP is in VTL1 --------------------------------------------
 * VP0 asks VTL1 to hash 64 KiB (a long call, its output in free memory that a RESET leaves
 * as it is); VP1 asks for a RESET well inside it.  VTL1 ends with the partition: its
 * memory is zeroed, no protection or pin is left (invariants.py checks the reset's own
 * record), VP0's call never returns into the old VTL1 (no VTL return from it after the
 * reset), and the output reads back as it was.  The next boot (boot_count 1) reports
 * words of VTL1's former region, which the VMM reads back as zero. */
#define RESET_OUT_GPA (VTL1_BASE + VTL1_SIZE + 0x100000)
#define RESET_PATTERN 0x5245534554215F5FULL

static void resetter(uint64_t vp, uint64_t arg)
{
	(void)arg;
	wait_go();
	if (CONTROL)            /* the control run: no RESET, VTL1's call ends and writes */
		return;
	report_value("reset_from_vp", vp);
	hypercall(VTL_HC_RESET, 0, 0, 0, NULL);
	xs.landed = 1;          /* the RESET returned: it did not happen */
}

SCENARIO(sc_xvp_reset, "xvp-reset-in-vtl1", "attack: VP1 asks for a RESET while VP0 is in VTL1 (--vps 2+)")
{
	const char *name = "xvp-reset-in-vtl1";
	volatile uint64_t *out = (volatile uint64_t *)RESET_OUT_GPA;
	if (boot_info->boot_count) {
		/* After the reset: VTL1's region is plain memory until a VTL1 is enabled again. */
		static const uint64_t offs[] = { VTL1_BOOT_INFO_OFF, VTL1_CONTROL_OFF, VTL1_CONTROL_OFF + 4096,
						 VTL1_IMAGE_MIN_OFF, VTL1_IMAGE_MIN_OFF + 0x1000 };
		report_value("boot_count", boot_info->boot_count);
		for (uint64_t i = 0; i < sizeof(offs) / sizeof(offs[0]); i++)
			report_target("vtl1_region", boot_info->vtl1_base + offs[i], 8, 0);
		report_value("sha256_output", *out);
		if (*out != RESET_PATTERN)
			attack_succeeded(name, "the old VTL1's call wrote its output after the reset", *out);
		pass(name);
	}
	xvp_begin(name);
	harden_protect(name);
	harden_lock(name, 1);
	for (int i = 0; i < 4; i++)
		out[i] = RESET_PATTERN;
	report_target("sha256_output", RESET_OUT_GPA, 8, RESET_PATTERN);
	xs.delay = 2 * hash_4k_ticks();
	report_value("reset_delay_ticks", xs.delay);
	printf("ATTACK: VP1 resets %lu ticks into VP0's VTL_CALL_SHA256 of 64 KiB\n", xs.delay);
	smp_post(1, resetter, 0);
	xs.go = rdtsc();
	uint64_t st = vtl_call4(VTL_CALL_SHA256, (uint64_t)_data_start, VTL_SHA256_MAX_LEN, RESET_OUT_GPA, 0, NULL);
	report_status("sha256_before_reset", VTL_CALL_SHA256, st);
	fail(name, "VTL_CALL_SHA256 returned: the RESET did not come while VTL1 served it");
}
