/* SMP (docs/smp.md): the boot VP starts the APs and hands them work.
 *
 * VP0 starts each AP with VTL_HC_START_VP (entry ap_entry, a stack of its own, VP0's page
 * tables, RDI = the AP's index), in the spirit of the TLFS's HvCallStartVirtualProcessor.
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

/* Start AP `vp`; returns the hypercall's status (VTL_OK: it will come online). */
uint64_t smp_start(uint64_t vp)
{
	static struct vtl_start_vp req;     /* VP0 only, one request at a time */
	req = (struct vtl_start_vp){ .vp_index = (uint32_t)vp, .flags = 0, .rip = (uint64_t)ap_entry,
		.rsp = (uint64_t)(ap_stacks[vp] + AP_STACK_SIZE), .cr3 = read_cr3(), .arg = vp };
	return hypercall(VTL_HC_START_VP, (uint64_t)&req, 0, 0, NULL);
}

/* Start every AP and wait until each is online; returns how many came online. */
uint64_t smp_boot(const char *name)
{
	uint64_t n = boot_info->nr_vps, online = 0;
	for (uint64_t vp = 1; vp < n; vp++) {
		uint64_t st = smp_start(vp);
		report_status("start_vp", VTL_HC_START_VP, st);
		if (st != VTL_OK)
			fail(name, "VTL_HC_START_VP refused");
	}
	for (uint64_t vp = 1; vp < n; vp++) {
		while (!ap[vp].online)
			halt();
		online++;
	}
	printf("%lu of %lu APs online\n", online, n - 1);
	return online;
}

/* Run fn(vp, arg) on AP `vp` and wait for it to finish. */
void smp_run_on(uint64_t vp, void (*fn)(uint64_t, uint64_t), uint64_t arg)
{
	ap[vp].done = 0;
	ap[vp].arg = arg;
	ap[vp].fn = (uint64_t)fn;
	ipi(vp);
	while (!ap[vp].done)
		halt();
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
	require_vtl1(name);
	smp_boot(name);
	smp_run_all(smp_null_calls, boot_info->param ? boot_info->param : 10000);
	pass(name);
}
