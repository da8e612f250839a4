/* SMP (docs/smp.md): the boot VP starts the APs and hands them work.
 *
 * VP0 starts each AP (entry ap_entry, a stack of its own, VP0's page tables, RDI = the AP's
 * index), in the spirit of the TLFS's HvCallStartVirtualProcessor: with VTL_HC_START_VP
 * while VTL1 is not enabled, and by asking VTL1 (VTL_CALL_START_AP) once it is, since then
 * only VTL1 may start a VP.
 * An AP loads the boot VP's GDT and IDT, sets the CR4/XCR0 bits boot set on VP0, says it
 * is online (ap[].online, then a VALUE report "ap_online" from the AP itself: the VMM
 * records which VP sent it), wakes VP0 (VTL_HC_SEND_IPI) and idles in HLT.  Work is a
 * function pointer in ap[vp].fn and a wake; the AP runs it, sets done and wakes VP0.
 * With more than one VP a VTL0 HLT idles until a wake (vtl_abi.h, VTL_HC_SEND_IPI), so
 * nobody spins: this host emulates every instruction of a spin loop. */
#include "vtl0.h"

#define AP_STACK_SIZE 16384

static uint8_t ap_stacks[VTL1_MAX_VPS][AP_STACK_SIZE] __attribute__((aligned(16)));
struct ap_slot ap[VTL1_MAX_VPS];

extern void ap_entry(void);     /* entry.S: RSP from the start request, RDI = VP index */

static inline void halt(void) { asm volatile("hlt" ::: "memory"); }

/* The running VP (for try_run's per-VP fault catcher): an AP runs on its own stack from
 * ap_stacks[], the boot VP on the kernel stack (or, from CPL3, the TSS's), so RSP says. */
uint32_t cpu_index(void)
{
	uint64_t sp, base = (uint64_t)ap_stacks;
	asm volatile("mov %%rsp, %0" : "=r"(sp));
	if (sp > base && sp <= base + sizeof(ap_stacks))
		return (uint32_t)((sp - 1 - base) / AP_STACK_SIZE);
	return 0;
}

void ipi(uint64_t vp)
{
	hypercall(VTL_HC_SEND_IPI, vp, 0, 0, NULL);
}

void ap_main(uint64_t vp)
{
	arch_init_ap();
	if (cr4_boot_set)
		priv_write_cr4(read_cr4() | cr4_boot_set);
	if (xcr0_boot)
		priv_xsetbv(0, xcr0_boot);
	ap[vp].online = 1;
	report_value("ap_online", vp);
	ipi(0);
	for (;;) {
		uint64_t fn = ap[vp].fn;
		if (!fn) {
			halt();         /* a wake that came meanwhile ends it at once */
			continue;
		}
		ap[vp].fn = 0;
		((void (*)(uint64_t, uint64_t))fn)(vp, ap[vp].arg);
		ap[vp].done = 1;
		ipi(0);
	}
}

/* The start request for AP `vp`: its entry, its own stack, this VP's page tables. */
struct vtl_start_vp smp_request(uint64_t vp)
{
	return (struct vtl_start_vp){ .vp_index = (uint32_t)vp, .flags = 0, .rip = (uint64_t)ap_entry,
		.rsp = (uint64_t)(ap_stacks[vp] + AP_STACK_SIZE), .cr3 = read_cr3(), .arg = vp };
}

/* Ask for `req`: VTL1 starts it once this kernel has enabled VTL1 (VTL0's own
 * VTL_HC_START_VP is refused then), the VMM before.  Returns the status. */
uint64_t smp_start_request(const struct vtl_start_vp *req)
{
	if (vtl1_on)
		return vtl_call(VTL_CALL_START_AP, (uint64_t)req, 0, NULL);
	return hypercall(VTL_HC_START_VP, (uint64_t)req, 0, 0, NULL);
}

/* Start AP `vp`; returns the status (VTL_OK: it will come online). */
uint64_t smp_start(uint64_t vp)
{
	static struct vtl_start_vp req;     /* VP0 only, one request at a time */
	req = smp_request(vp);
	return smp_start_request(&req);
}

/* Start every AP and wait until each is online; returns how many came online.  STATUS
 * "start_vp" (VTL_HC_START_VP) or "start_ap" (VTL_CALL_START_AP) per AP. */
uint64_t smp_boot(const char *name)
{
	uint64_t n = boot_info->nr_vps, online = 0;
	for (uint64_t vp = 1; vp < n; vp++) {
		uint64_t st = smp_start(vp);
		if (vtl1_on)
			report_status("start_ap", VTL_CALL_START_AP, st);
		else
			report_status("start_vp", VTL_HC_START_VP, st);
		if (st != VTL_OK)
			fail(name, vtl1_on ? "VTL_CALL_START_AP refused" : "VTL_HC_START_VP refused");
	}
	for (uint64_t vp = 1; vp < n; vp++) {
		while (!ap[vp].online)
			halt();
		online++;
	}
	printf("%lu of %lu APs online\n", online, n - 1);
	return online;
}

/* Hand fn(vp, arg) to AP `vp` and return at once (smp_wait waits for it). */
void smp_post(uint64_t vp, void (*fn)(uint64_t, uint64_t), uint64_t arg)
{
	ap[vp].done = 0;
	ap[vp].arg = arg;
	ap[vp].fn = (uint64_t)fn;
	ipi(vp);
}

void smp_wait(uint64_t vp)
{
	while (!ap[vp].done)
		halt();
}

/* Run fn(vp, arg) on AP `vp` and wait for it to finish. */
void smp_run_on(uint64_t vp, void (*fn)(uint64_t, uint64_t), uint64_t arg)
{
	smp_post(vp, fn, arg);
	smp_wait(vp);
}

/* Give fn to every AP at once; VP0 runs it too; then wait for all. */
void smp_run_all(void (*fn)(uint64_t, uint64_t), uint64_t arg)
{
	uint64_t n = boot_info->nr_vps;
	for (uint64_t vp = 1; vp < n; vp++) {
		ap[vp].done = 0;
		ap[vp].arg = arg;
		ap[vp].fn = (uint64_t)fn;
		ipi(vp);
	}
	fn(0, arg);
	for (uint64_t vp = 1; vp < n; vp++)
		while (!ap[vp].done)
			halt();
}

/* An AP locks its own registers (VTL1 pins them per VP); the result in ap[vp].result and
 * a STATUS "ap_lock_page_tables" from the AP itself (the VMM records which VP sent it). */
static void ap_lock(uint64_t vp, uint64_t arg)
{
	(void)arg;
	uint64_t ps = (uint64_t)_priv_start, pinning = 0;
	uint64_t st = vtl_call(VTL_CALL_LOCK_PAGE_TABLES, ps, PAGES(ps, _priv_end), &pinning);
	report_status("ap_lock_page_tables", VTL_CALL_LOCK_PAGE_TABLES, st);
	ap[vp].result = st;
}

/* Hardening with APs (harden_lock): smp_boot before the boot VP's lock (VTL1 starts each
 * AP into text it protected; an AP's setup in ap_main, GDT, IDT, CR4 and XCR0 through the
 * privileged section, runs while nothing is locked yet, as the boot VP's did), then after
 * it each online AP locks its own registers.  `skip` (an AP index, 0 = none) is left
 * unlocked. */
void smp_lock_aps(const char *name, uint64_t skip)
{
	uint64_t n = boot_info->nr_vps, locked = 0;
	for (uint64_t vp = 1; vp < n; vp++) {
		if (vp == skip || !ap[vp].online)
			continue;
		ap[vp].result = ~0ULL;
		smp_run_on(vp, ap_lock, 0);
		if (ap[vp].result != VTL_OK)
			fail(name, "an AP's VTL_CALL_LOCK_PAGE_TABLES was refused");
		locked++;
	}
	printf("%lu APs locked their registers\n", locked);
}

/* Every AP makes a VTL call to its own VTL1: STATUS "ap_echo" from each AP. */
static void ap_echo(uint64_t vp, uint64_t arg)
{
	uint64_t rcx = 0;
	uint64_t st = vtl_call(VTL_CALL_ECHO, arg, 0, &rcx);
	report_status("ap_echo", VTL_CALL_ECHO, st);
	ap[vp].result = st == VTL_OK && rcx == arg + 1 ? VTL_OK : (st ? st : ~0ULL);
}

void smp_echo_all(const char *name)
{
	uint64_t n = boot_info->nr_vps;
	for (uint64_t vp = 1; vp < n; vp++) {
		ap[vp].result = ~0ULL;
		smp_run_on(vp, ap_echo, 0x1234);
		if (ap[vp].result != VTL_OK)
			fail(name, "an AP's VTL_CALL_ECHO failed");
	}
}

SCENARIO(sc_smp_boot, "smp-boot", "start every AP (VTL_HC_START_VP) and run one piece of work on each")
{
	const char *name = "smp-boot";
	uint64_t online = smp_boot(name);
	report_value("aps_online", online);
	if (online != boot_info->nr_vps - 1)
		fail(name, "an AP did not come online");
	pass(name);
}

/* `param` rounds on every VP at once of a refused hypercall (unknown code: a status) and
 * a VTL return from VTL0 (refused with #UD at the OUT, after the VMM completes the OUT's
 * I/O: VCpu.complete_pending_io), so that stop and reset requests race I/O completion on
 * every VP (tests/test_runner.py). */
static void spin_exits(uint64_t vp, uint64_t n)
{
	(void)vp;
	for (uint64_t i = 0; i < n; i++) {
		hypercall(0x7777, 0, 0, 0, NULL);
		asm volatile("outb %%al, %0" :: "i"(VTL_PORT_RETURN), "a"(0) : "memory");
	}
}

SCENARIO(sc_smp_spin, "smp-spin", "every VP: param rounds of a refused hypercall and a refused VTL return "
	 "(param 0 = for ever)")
{
	const char *name = "smp-spin";
	skip_vtl_return_ud = 1;
	smp_boot(name);
	uint64_t n = boot_info->param ? boot_info->param : ~0ULL;
	smp_run_all(spin_exits, n);
	pass(name);
}

SCENARIO(sc_smp_halt, "smp-halt", "start the APs, then every VP halts without a verdict: the run ends as halted")
{
	smp_boot("smp-halt");
	for (;;)
		halt();
}

/* ---- the null-call round trip with every VP calling at once (vtl bench --vps) ---- */
#define SMP_BATCH 100
#define SMP_MAX_STAMPS 513
void null_call_batch(uint64_t n);       /* entry.S */
static uint64_t smp_stamps[VTL1_MAX_VPS][SMP_MAX_STAMPS];

/* On VP `vp`: n null VTL calls, an RDTSC stamp per SMP_BATCH; STAMPS "null_call" from
 * this VP (the VMM records which VP sent it). */
static void smp_null_calls(uint64_t vp, uint64_t n)
{
	uint64_t batches = n / SMP_BATCH;
	if (batches < 1)
		batches = 1;
	if (batches > SMP_MAX_STAMPS - 1)
		batches = SMP_MAX_STAMPS - 1;
	uint64_t *st = smp_stamps[vp];
	for (uint64_t b = 0; b < batches; b++) {
		st[b] = rdtsc();
		null_call_batch(SMP_BATCH);
	}
	st[batches] = rdtsc();
	report_stamps("null_call", st, batches + 1, SMP_BATCH);
}

SCENARIO(sc_smp_bench, "bench-smp-null-call", "every VP makes N null VTL calls at once (param, default 10000), "
	 "timed by RDTSC per 100")
{
	const char *name = "bench-smp-null-call";
	harden(name, 1);                /* VTL1 on every VP, every AP started and locked */
	smp_run_all(smp_null_calls, boot_info->param ? boot_info->param : 10000);
	pass(name);
}

/* ---- VTL1 starts the APs (docs/smp.md, "Starting APs with VTL1 enabled") ------------- */
static uint64_t ask(const char *name, const char *key, const char *what, const struct vtl_start_vp *r,
		    uint64_t want)
{
	uint64_t st = vtl_call(VTL_CALL_START_AP, (uint64_t)r, 0, NULL);
	expect_status(name, key, VTL_CALL_START_AP, what, st, want);
	return st;
}

SCENARIO(sc_smp_start_hostile, "smp-start-hostile",
	 "VTL1 enabled: hostile VTL_CALL_START_AP requests refused, VTL_HC_START_VP denied (--vps 3+)")
{
	const char *name = "smp-start-hostile";
	uint64_t n = boot_info->nr_vps, ps = (uint64_t)_priv_start, pinning = 0;
	if (n < 3)
		fail(name, "needs at least 3 VPs (vtl run --vps 3)");
	require_vtl1(name);
	harden_protect(name);
	struct vtl_start_vp r = smp_request(1);
	expect_status(name, "start_vp_direct", VTL_HC_START_VP, "VTL_HC_START_VP from VTL0 with VTL1 enabled",
		      hypercall(VTL_HC_START_VP, (uint64_t)&r, 0, 0, NULL), VTL_E_ACCESS_DENIED);
	r.vp_index = (uint32_t)n;
	ask(name, "start_ap_bad_index", "VTL_CALL_START_AP of a VP that does not exist", &r, VTL_E_INVALID_ARG);
	r = smp_request(1);
	r.vp_index = 0;
	ask(name, "start_ap_boot_vp", "VTL_CALL_START_AP of the boot VP", &r, VTL_E_INVALID_ARG);
	r = smp_request(1);
	r.flags = 1;
	ask(name, "start_ap_flags", "VTL_CALL_START_AP with unknown flags", &r, VTL_E_INVALID_ARG);
	r = smp_request(1);
	r.rip = (uint64_t)data_page;
	ask(name, "start_ap_rip_data", "VTL_CALL_START_AP at a data page", &r, VTL_E_POLICY);
	r = smp_request(1);
	r.rip = VTL1_BASE + VTL1_IMAGE_MIN_OFF;
	ask(name, "start_ap_rip_vtl1", "VTL_CALL_START_AP at VTL1's image", &r, VTL_E_INVALID_ARG);
	r = smp_request(1);
	r.rsp = VTL1_BASE + 0x2000;
	ask(name, "start_ap_rsp_vtl1", "VTL_CALL_START_AP with a stack in VTL1's memory", &r, VTL_E_INVALID_ARG);
	r = smp_request(1);
	r.rsp = (uint64_t)&rodata_target + 8;
	ask(name, "start_ap_rsp_rodata", "VTL_CALL_START_AP with a stack on rodata", &r, VTL_E_POLICY);
	r = smp_request(1);
	r.cr3 = VTL1_BASE;
	ask(name, "start_ap_cr3_vtl1", "VTL_CALL_START_AP with CR3 in VTL1's memory", &r, VTL_E_INVALID_ARG);
	expect_status(name, "start_ap_unreadable", VTL_CALL_START_AP, "VTL_CALL_START_AP of a request in VTL1's memory",
		      vtl_call(VTL_CALL_START_AP, VTL1_BASE, 0, NULL), VTL_E_INVALID_ARG);
	/* A good one, then the same AP again. */
	r = smp_request(1);
	ask(name, "start_ap", "VTL_CALL_START_AP of AP 1", &r, VTL_OK);
	while (!ap[1].online)
		halt();
	ask(name, "start_ap_again", "VTL_CALL_START_AP of AP 1 again", &r, VTL_E_BUSY);
	/* Once the tables are locked: only onto the locked root, and never into the section. */
	must(name, "lock_page_tables", VTL_CALL_LOCK_PAGE_TABLES, "lock page tables (VP0)",
	     vtl_call(VTL_CALL_LOCK_PAGE_TABLES, ps, PAGES(ps, _priv_end), &pinning));
	r = smp_request(2);
	r.cr3 = (uint64_t)data_page;
	ask(name, "start_ap_cr3_not_root", "VTL_CALL_START_AP on tables VTL1 did not lock", &r, VTL_E_POLICY);
	r = smp_request(2);
	r.rip = ps + 16;
	ask(name, "start_ap_rip_priv", "VTL_CALL_START_AP in the privileged section", &r, VTL_E_POLICY);
	smp_lock_aps(name, 0);          /* AP 1, the only one online */
	must(name, "end_of_boot", VTL_CALL_END_OF_BOOT, "end of boot", vtl_call(VTL_CALL_END_OF_BOOT, 0, 0, NULL));
	r = smp_request(2);
	ask(name, "start_ap_after_eob", "VTL_CALL_START_AP after END_OF_BOOT", &r, VTL_E_POLICY);
	pass(name);
}

SCENARIO(sc_smp_eob_unlocked, "smp-eob-unlocked",
	 "attack: VTL1 starts every AP, the last never locks: END_OF_BOOT refused (--vps 2+)")
{
	const char *name = "smp-eob-unlocked";
	uint64_t n = boot_info->nr_vps, ps = (uint64_t)_priv_start, pinning = 0;
	if (n < 2)
		fail(name, "needs at least 2 VPs (vtl run --vps 2)");
	require_vtl1(name);
	harden_protect(name);
	smp_boot(name);
	must(name, "lock_page_tables", VTL_CALL_LOCK_PAGE_TABLES, "lock page tables (VP0)",
	     vtl_call(VTL_CALL_LOCK_PAGE_TABLES, ps, PAGES(ps, _priv_end), &pinning));
	smp_lock_aps(name, n - 1);      /* every AP but the last locks */
	expect_status(name, "end_of_boot", VTL_CALL_END_OF_BOOT, "END_OF_BOOT with an AP unlocked",
		      vtl_call(VTL_CALL_END_OF_BOOT, 0, 0, NULL), VTL_E_POLICY);
	echo_still_works(name);
	pass(name);
}
