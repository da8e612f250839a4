/* Scenarios built into VTL0.  Each checks its own outcome and ends with pass() or fail().
 *
 * Everything a tool or test needs goes through the report channel (guest_lib/report.c):
 * the verdict (RESULT), every status a scenario checks (STATUS), every fault it observed
 * (FAULT), attack targets (TARGET, EXEC, MSR) and measured numbers (VALUE, BYTES,
 * STAMPS).  Observations are reported before the scenario judges them, so a failing run
 * still shows what was seen.  The console lines are for people. */
#include "vtl0.h"

#define VTL1_TARGET (VTL1_BASE + VTL1_IMAGE_MIN_OFF)
#define ECHO_ARG 0x1234

int vtl1_on;

/* STATUS "enable_vtl1": value[0] = VTL_HC_ENABLE_VTL1, value[1] = the status. */
uint64_t enable_vtl1(void)
{
	uint64_t st = hypercall(VTL_HC_ENABLE_VTL1, 0, 0, 0, NULL);
	if (st == VTL_OK)
		vtl1_on = 1;
	report_status("enable_vtl1", VTL_HC_ENABLE_VTL1, st);
	printf("enable VTL1: %s\n", vtl_status_name(st));
	return st;
}

void require_vtl1(const char *name)
{
	if (enable_vtl1() != VTL_OK)
		fail(name, "VTL1 could not be enabled");
}

/* After a refusal: VTL1 and the VMM still serve VTL calls.
 * STATUS "echo" (VTL_CALL_ECHO) and VALUE "echo_rcx" = RCX after the call (ECHO_ARG + 1). */
void echo_still_works(const char *name)
{
	if (heki_mode()) {              /* no VTL1: the Heki version query instead */
		heki_still_served(name);
		return;
	}
	uint64_t rcx = 0;
	uint64_t st = vtl_call(VTL_CALL_ECHO, ECHO_ARG, 0, &rcx);
	report_status("echo", VTL_CALL_ECHO, st);
	report_value("echo_rcx", rcx);
	if (st != VTL_OK || rcx != ECHO_ARG + 1)
		fail(name, "VTL_CALL_ECHO failed after the refusal");
	printf("VTL_CALL_ECHO still served (RCX %#x -> %#lx)\n", ECHO_ARG, rcx);
}

/* STATUS `key`: value[0] = the call or hypercall code, value[1] = the status received. */
void expect_status(const char *name, const char *key, uint64_t code, const char *what, uint64_t got,
			  uint64_t want)
{
	report_status(key, code, got);
	printf("%s -> %s\n", what, vtl_status_name(got));
	if (got != want)
		fail(name, "unexpected status");
}

/* FAULT `key` (vector, error code, RIP, CR2) when the attempt faulted. */
void expect_fault(const char *name, const char *key, const char *what, int ok, struct fault_info *fi,
			 int vector)
{
	if (!ok) {
		printf("%s: no fault\n", what);
		fail(name, "the access was not refused");
	}
	report_fault(key, fi);
	printf("%s: %s (%d) err=%#lx rip=%#lx cs=%#lx\n", what, vector_name(fi->vector), fi->vector,
	       fi->error_code, fi->rip, fi->cs);
	if (fi->vector != vector)
		fail(name, "unexpected fault vector");
}

SCENARIO(sc_boot, "boot", "enable VTL1, make NOP/ECHO calls, report VTL1's measurement")
{
	if (heki_mode())
		heki_boot();     /* Heki mode: harden through the Heki hypercalls */
	uint64_t st = enable_vtl1();
	if (st == VTL_E_DISABLED) {
		printf("running without VTL1\n");
		pass("boot");
	}
	if (st != VTL_OK)
		fail("boot", "enable failed");
	if (boot_info->nr_vps > 1) {
		/* SMP: a kernel's boot with APs is its hardening (VTL1 starts the APs only into
		 * text it protected, on tables it locked); then every AP calls its own VTL1. */
		harden_protect("boot");
		harden_lock("boot", 1);
		smp_echo_all("boot");
	}
	expect_status("boot", "nop", VTL_CALL_NOP, "VTL_CALL_NOP", vtl_call(VTL_CALL_NOP, 0, 0, NULL), VTL_OK);
	echo_still_works("boot");
	static uint8_t m[32];
	expect_status("boot", "get_measurement", VTL_CALL_GET_MEASUREMENT, "VTL_CALL_GET_MEASUREMENT",
		      vtl_call(VTL_CALL_GET_MEASUREMENT, 0, (uint64_t)m, NULL), VTL_OK);
	report_bytes("vtl1_measurement", m, sizeof(m));   /* what VTL1 told VTL0 */
	printf("VTL1 measurement: ");
	print_hex_bytes(m, 32);
	printf("\n");
	pass("boot");
}

/* --- register isolation --------------------------------------------------------- */
void reg_probe_call(struct reg_probe_result *res);
struct reg_probe_result probe_result;
uint64_t probe_after[16], probe_rsp_before, probe_rflags_after, probe_cr3_before, probe_cr3_after;

SCENARIO(sc_state, "vtl-call-state", "GPRs shared across a VTL call; RIP/RSP/RFLAGS/CR3 private per VTL")
{
	static const char *const rn[16] = { "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
		"r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15" };
	require_vtl1("vtl-call-state");
	memset(&probe_result, 0, sizeof(probe_result));
	reg_probe_call(&probe_result);
	struct reg_probe_result *r = &probe_result;
	int bad = 0;

	report_value("vtl1_entry_reason", r->entry_reason);
	report_value("vtl1_ctl_rax", r->ctl_rax);
	report_value("vtl1_ctl_rcx", r->ctl_rcx);
	report_value("shared_reg_mismatches", r->mismatches);
	report_value("vtl0_rsp", probe_rsp_before);
	report_value("vtl1_rsp", r->vtl1_rsp);
	report_value("vtl0_cr3", probe_cr3_before);
	report_value("vtl1_cr3", r->vtl1_cr3);
	report_value("vtl1_rip", r->vtl1_rip);
	printf("VTL1 entered with reason %lu, vtl_control rax=%#lx rcx=%#lx\n", r->entry_reason,
	       r->ctl_rax, r->ctl_rcx);
	if (r->entry_reason != VTL_ENTRY_CALL || r->ctl_rax != VTL_CALL_REG_PROBE ||
	    r->ctl_rcx != (uint64_t)&probe_result)
		bad++, printf("  vtl_control does not hold VTL0's RAX/RCX\n");
	printf("VTL1 saw VTL0's values in %lu mismatching shared registers\n", r->mismatches);
	if (r->mismatches)
		bad++;
	for (int i = 0; i < 16; i++) {
		if (i == 6)
			continue;
		if (probe_after[i] != PROBE_PAT1(i))
			bad++, printf("  %s after return = %#lx, VTL1 set %#llx\n", rn[i], probe_after[i],
				      PROBE_PAT1(i));
	}
	printf("%-8s %-20s %-20s\n", "", "VTL0", "VTL1");
	printf("%-8s %#-20lx %#-20lx\n", "RSP", probe_rsp_before, r->vtl1_rsp);
	printf("%-8s %#-20lx %#-20lx\n", "RFLAGS", probe_rflags_after, r->vtl1_rflags);
	printf("%-8s %#-20lx %#-20lx\n", "CR3", probe_cr3_before, r->vtl1_cr3);
	printf("%-8s %#-20lx %#-20lx\n", "RIP", r->vtl0_rip, r->vtl1_rip);
	if (probe_after[6] != probe_rsp_before)
		bad++, printf("  VTL0 RSP changed across the call\n");
	if (!(probe_rflags_after & RFLAGS_AC) || (r->vtl1_rflags & RFLAGS_AC))
		bad++, printf("  RFLAGS.AC leaked between VTLs\n");
	if (probe_cr3_after != probe_cr3_before || r->vtl1_cr3 == probe_cr3_before)
		bad++, printf("  CR3 is not private\n");
	if (r->vtl1_rsp == probe_rsp_before)
		bad++, printf("  RSP is not private\n");
	if (r->vtl1_rip < VTL1_BASE || r->vtl1_rip >= VTL1_BASE + VTL1_SIZE)
		bad++, printf("  VTL1 RIP is not in VTL1's region\n");
	if (r->vtl0_rsp != probe_rsp_before || r->vtl0_cr3 != probe_cr3_before ||
	    !(r->vtl0_rflags & RFLAGS_AC))
		bad++, printf("  VTL1's view of VTL0's private registers is wrong\n");
	report_value("isolation_violations", (uint64_t)bad);
	if (bad)
		fail("vtl-call-state", "register isolation violated");
	pass("vtl-call-state");
}

/* --- VTL1 memory from VTL0 ----------------------------------------------------- */
static volatile uint64_t sink;
static void read_target(void *a) { (void)a; sink = *(volatile uint64_t *)VTL1_TARGET; }
static void write_target(void *a) { (void)a; *(volatile uint64_t *)VTL1_TARGET = 0x4141414141414141ULL; }
static void exec_target(void *a) { (void)a; ((void (*)(void))VTL1_TARGET)(); }

static void vtl1_memory(const char *name, void (*fn)(void *), const char *key, const char *what)
{
	struct fault_info fi;
	require_vtl1(name);
	sink = 0;
	int f = try_run(fn, NULL, &fi);
	expect_fault(name, key, what, f, &fi, 13);
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_read1, "read-vtl1-memory", "VTL0 reads VTL1's memory: refused with #GP")
{ vtl1_memory("read-vtl1-memory", read_target, "read_vtl1", "read of VTL1 memory"); }

SCENARIO(sc_write1, "write-vtl1-memory", "VTL0 writes VTL1's memory: refused with #GP, memory unchanged")
{ vtl1_memory("write-vtl1-memory", write_target, "write_vtl1", "write to VTL1 memory"); }

SCENARIO(sc_exec1, "exec-vtl1-memory", "VTL0 jumps into VTL1's code: refused with #GP")
{ vtl1_memory("exec-vtl1-memory", exec_target, "exec_vtl1", "jump into VTL1 code"); }

/* --- bad requests ------------------------------------------------------------------- */
static void forged_return(void *a) { (void)a; OUTB_IMM(VTL_PORT_RETURN, 0); }

SCENARIO(sc_forge, "vtl-return-from-vtl0", "VTL0 forges a VTL return: #UD")
{
	struct fault_info fi;
	require_vtl1("vtl-return-from-vtl0");
	int f = try_run(forged_return, NULL, &fi);
	expect_fault("vtl-return-from-vtl0", "vtl_return", "VTL return from VTL0", f, &fi, 6);
	echo_still_works("vtl-return-from-vtl0");
	pass("vtl-return-from-vtl0");
}

static uint8_t user_code[4096] __attribute__((aligned(4096)));
static uint8_t user_stack[4096] __attribute__((aligned(4096)));

static void enter_user(void *a)
{
	(void)a;
	asm volatile("pushq %[ss]\n\t"
		     "pushq %[sp]\n\t"
		     "pushq $0x2\n\t"
		     "pushq %[cs]\n\t"
		     "pushq %[ip]\n\t"
		     "iretq"
		     :: [ss] "i"(USER_DS), [sp] "r"((uint64_t)user_stack + sizeof(user_stack)),
		        [cs] "i"(USER_CS), [ip] "r"((uint64_t)user_code) : "memory");
}

SCENARIO(sc_user, "vtl-call-from-user", "a VTL call from CPL3: #GP")
{
	struct fault_info fi;
	require_vtl1("vtl-call-from-user");
	static const uint8_t code[] = { 0xE6, VTL_PORT_CALL, 0xEB, 0xFE };   /* out %al,$port; jmp . */
	memcpy(user_code, code, sizeof(code));
	*pte_for((uint64_t)user_code) |= 4;     /* user-accessible */
	*pte_for((uint64_t)user_stack) |= 4;
	invlpg((uint64_t)user_code);
	invlpg((uint64_t)user_stack);
	int f = try_run(enter_user, NULL, &fi);
	if (f) {
		report_value("user_code", (uint64_t)user_code);
		report_value("fault_cs", fi.cs);
	}
	expect_fault("vtl-call-from-user", "vtl_call_from_user", "VTL call from CPL3", f, &fi, 13);
	if ((fi.cs & 3) != 3 || fi.rip != (uint64_t)user_code)
		fail("vtl-call-from-user", "the fault was not taken at the user-mode OUT");
	echo_still_works("vtl-call-from-user");
	pass("vtl-call-from-user");
}

SCENARIO(sc_unknown_call, "unknown-call-code", "a VTL call with an unknown code: VTL_E_INVALID_CODE")
{
	require_vtl1("unknown-call-code");
	expect_status("unknown-call-code", "call_0x7777", 0x7777, "VTL call 0x7777", vtl_call(0x7777, 0, 0, NULL),
		      VTL_E_INVALID_CODE);
	echo_still_works("unknown-call-code");
	pass("unknown-call-code");
}

SCENARIO(sc_vtl1_hc, "vtl1-hypercall-from-vtl0", "VTL0 issues a VTL1-only hypercall: VTL_E_ACCESS_DENIED")
{
	require_vtl1("vtl1-hypercall-from-vtl0");
	expect_status("vtl1-hypercall-from-vtl0", "get_vp_register", VTL_HC_GET_VP_REGISTER,
		      "VTL_HC_GET_VP_REGISTER from VTL0", hypercall(VTL_HC_GET_VP_REGISTER, 0, VTL_REG_CR3, 0, NULL),
		      VTL_E_ACCESS_DENIED);
	echo_still_works("vtl1-hypercall-from-vtl0");
	pass("vtl1-hypercall-from-vtl0");
}

SCENARIO(sc_unknown_hc, "unknown-hypercall", "an unknown hypercall code: VTL_E_INVALID_CODE")
{
	require_vtl1("unknown-hypercall");
	expect_status("unknown-hypercall", "hypercall_0x7777", 0x7777, "hypercall 0x7777",
		      hypercall(0x7777, 0, 0, 0, NULL), VTL_E_INVALID_CODE);
	echo_still_works("unknown-hypercall");
	pass("unknown-hypercall");
}

SCENARIO(sc_twice, "enable-twice", "enable VTL1 twice: VTL_E_ALREADY_ENABLED")
{
	require_vtl1("enable-twice");
	expect_status("enable-twice", "enable_vtl1_again", VTL_HC_ENABLE_VTL1, "second VTL_HC_ENABLE_VTL1",
		      hypercall(VTL_HC_ENABLE_VTL1, 0, 0, 0, NULL), VTL_E_ALREADY_ENABLED);
	echo_still_works("enable-twice");
	pass("enable-twice");
}

SCENARIO(sc_early, "call-without-vtl1", "a VTL call before VTL1 is enabled: VTL_E_NOT_ENABLED")
{
	expect_status("call-without-vtl1", "call_before_enable", VTL_CALL_ECHO, "VTL call before enabling VTL1",
		      vtl_call(VTL_CALL_ECHO, ECHO_ARG, 0, NULL), VTL_E_NOT_ENABLED);
	require_vtl1("call-without-vtl1");
	echo_still_works("call-without-vtl1");
	pass("call-without-vtl1");
}

SCENARIO(sc_triple, "triple-fault", "load an empty IDT and fault: the VMM reports the triple fault")
{
	static const struct desc_ptr empty = { 0, 0 };
	printf("loading an empty IDT and executing ud2\n");
	priv_lidt(&empty);
	asm volatile("ud2");
	fail("triple-fault", "survived a triple fault");
}

/* --- benchmark ------------------------------------------------------------------ */
#define BENCH_BATCH 100
#define BENCH_MAX_STAMPS 20001
void null_call_batch(uint64_t n);
static uint64_t stamps[BENCH_MAX_STAMPS];

SCENARIO(sc_bench, "bench-null-call", "N null VTL calls (param, default 100000), timed by RDTSC per 100")
{
	require_vtl1("bench-null-call");
	uint64_t n = boot_info->param ? boot_info->param : 100000;
	uint64_t batches = n / BENCH_BATCH;
	if (batches < 1)
		batches = 1;
	if (batches > BENCH_MAX_STAMPS - 1)
		batches = BENCH_MAX_STAMPS - 1;
	for (uint64_t b = 0; b < batches; b++) {
		stamps[b] = rdtsc();
		null_call_batch(BENCH_BATCH);
	}
	stamps[batches] = rdtsc();
	/* STAMPS "null_call": batches + 1 TSC stamps, value[0] = null calls between two */
	uint64_t st = report_stamps("null_call", stamps, batches + 1, BENCH_BATCH);
	printf("%lu null VTL calls in %lu TSC ticks (report: %s)\n", batches * BENCH_BATCH,
	       stamps[batches] - stamps[0], vtl_status_name(st));
	if (st != VTL_OK)
		fail("bench-null-call", "the VMM refused the report");
	pass("bench-null-call");
}

SCENARIO(sc_storm, "hypercall-storm", "N (param, default 100000) unknown hypercalls: each VTL_E_INVALID_CODE")
{
	uint64_t n = boot_info->param ? boot_info->param : 100000, wrong = 0;
	for (uint64_t i = 0; i < n; i++)
		if (hypercall(0x7777, i, 0, 0, NULL) != VTL_E_INVALID_CODE)
			wrong++;
	report_value("hypercalls", n);
	report_value("unexpected_statuses", wrong);
	printf("%lu unknown hypercalls, %lu answered other than VTL_E_INVALID_CODE\n", n, wrong);
	if (wrong)
		fail("hypercall-storm", "an unknown hypercall was not refused");
	pass("hypercall-storm");
}

/* ---- memory policy (issue 3): VTL0 hardens itself with VTL1, then attacks itself with
 * the arbitrary-write primitive of Heki's threat model.  TARGET / EXEC / MSR reports name
 * what is attacked, so that the VMM checks the target itself after the run: the verdict
 * is what the VMM observes, never this guest's word. ---- */
extern char _text_start[], _text_end[], _scenarios_page_end[], _ro_after_init_start[],
	_ro_after_init_end[], _data_start[];

const uint64_t rodata_target __attribute__((aligned(8), used)) = 0x0123456789ABCDEFULL;
static uint64_t ro_after_init_var __attribute__((section(".data..ro_after_init"), aligned(8))) = 0x1111;
uint8_t data_page[4096] __attribute__((aligned(4096)));
static uint64_t audit_page[512] __attribute__((aligned(4096)));


uint64_t prot(uint64_t gpa, uint64_t pages, uint64_t attrs, uint64_t flags)
{
	return vtl_call4(VTL_CALL_PROTECT, gpa, pages, attrs, flags, NULL);
}

uint64_t protection_of(uint64_t gpa)
{
	uint64_t rcx = 0;
	vtl_call4(VTL_CALL_GET_PROTECTION, gpa, 0, 0, 0, &rcx);
	return rcx;
}

/* STATUS `key` (value[0] = code), then the scenario fails unless it is VTL_OK. */
void must(const char *name, const char *key, uint64_t code, const char *what, uint64_t st)
{
	report_status(key, code, st);
	printf("%s -> %s\n", what, vtl_status_name(st));
	if (st != VTL_OK)
		fail(name, what);
}

extern char _priv_start[], _priv_end[];
/* RCX of VTL_CALL_LOCK_PAGE_TABLES: 1 when VTL1 judges register writes from now on. */
static uint64_t register_pinning;

/* Boot-time hardening, part 1: NX everywhere but text, attributes from VTL1. */
void harden_protect(const char *name)
{
	uint64_t ts = (uint64_t)_text_start, te = (uint64_t)_text_end;
	uint64_t v1 = boot_info->vtl1_base, v1e = v1 + boot_info->vtl1_size, mem = boot_info->mem_size;
	paging_set_nx_except(ts, te);
	must(name, "protect_text", VTL_CALL_PROTECT, "text r-x, immutable",
	     prot(ts, PAGES(ts, te), VTL_MEM_NW, VTL_PROTECT_IMMUTABLE));
	must(name, "protect_rodata", VTL_CALL_PROTECT, "rodata r--, immutable",
	     prot(te, PAGES(te, _scenarios_page_end), VTL_MEM_NW | VTL_MEM_NX, VTL_PROTECT_IMMUTABLE));
	if ((uint64_t)_ro_after_init_end > (uint64_t)_ro_after_init_start)
		must(name, "protect_ro_after_init", VTL_CALL_PROTECT, "ro_after_init rw- until end of boot",
		     prot((uint64_t)_ro_after_init_start, PAGES(_ro_after_init_start, _ro_after_init_end),
			  VTL_MEM_NX, VTL_PROTECT_AFTER_BOOT));
	must(name, "protect_data", VTL_CALL_PROTECT, "data, bss and free memory rw-",
	     prot((uint64_t)_data_start, PAGES(_data_start, v1), VTL_MEM_NX, 0));
	must(name, "protect_low", VTL_CALL_PROTECT, "low memory rw-", prot(0, ts >> 12, VTL_MEM_NX, 0));
	if (mem > v1e)
		must(name, "protect_high", VTL_CALL_PROTECT, "memory above VTL1 rw-",
		     prot(v1e, (mem - v1e) >> 12, VTL_MEM_NX, 0));
}

/* Part 2: VTL1 scans what VTL0 can execute, locks the tables and (where the VMM can)
 * pins the registers; RCX = the privileged section, RDI = its pages.  With APs (docs/smp.md):
 * VTL1 starts them first, then each locks its own registers after the boot VP's lock, and
 * only then does the boot end. */
void harden_lock(const char *name, int end_of_boot)
{
	uint64_t ps = (uint64_t)_priv_start;
	if (boot_info->nr_vps > 1)
		smp_boot(name);         /* VTL1 starts the APs, into the text it protected */
	must(name, "lock_page_tables", VTL_CALL_LOCK_PAGE_TABLES, "lock page tables, pin registers",
	     vtl_call(VTL_CALL_LOCK_PAGE_TABLES, ps, PAGES(ps, _priv_end), &register_pinning));
	printf("register pinning %s\n", register_pinning ? "on: the privileged section is VTL1's" :
	       "unavailable on this VMM");
	if (boot_info->nr_vps > 1)
		smp_lock_aps(name, 0);  /* each AP locks its own registers */
	if (end_of_boot)
		must(name, "end_of_boot", VTL_CALL_END_OF_BOOT, "end of boot",
		     vtl_call(VTL_CALL_END_OF_BOOT, 0, 0, NULL));
}

void harden(const char *name, int end_of_boot)
{
	if (heki_mode()) {              /* Heki mode: the same hardening, through the Heki hypercalls */
		heki_harden(name, end_of_boot);
		return;
	}
	require_vtl1(name);
	harden_protect(name);
	harden_lock(name, end_of_boot);
}

void write_u64_fn(void *p) { *(volatile uint64_t *)p = 0xBADBADBADBADBAD0ULL; }

/* The guest saw its attack work: VALUE "attack_succeeded" (value[0] = what it saw). */
void __attribute__((noreturn)) attack_succeeded(const char *name, const char *why, uint64_t seen)
{
	report_value("attack_succeeded", seen);
	printf("ATTACK-RESULT succeeded: %s (%#lx)\n", why, seen);
	fail(name, why);
}

/* TARGET `key` (GPA, 8 bytes, old value), then the write must fault with #PF(W) (FAULT
 * `key`) and leave memory as it was. */
void attack_write(const char *name, const char *key, const char *what, uint64_t target)
{
	uint64_t old = *(volatile uint64_t *)target;
	report_target(key, target, 8, old);
	printf("ATTACK target=%#lx old=%#lx (%s)\n", target, old, what);
	struct fault_info fi;
	int faulted = try_run(write_u64_fn, (void *)target, &fi);
	uint64_t now = *(volatile uint64_t *)target;
	if (now != old)
		attack_succeeded(name, "the write landed", now);
	expect_fault(name, key, what, faulted, &fi, 14);
	if (!(fi.error_code & 2))
		fail(name, "#PF without the write bit");
	printf("memory unchanged (%#lx)\n", now);
}

SCENARIO(sc_harden, "harden", "boot hardening: NX page tables, VTL1 attributes per section, tables locked")
{
	harden("harden", 1);
	printf("text %#lx-%#lx r-x, rodata -%#lx r--, data %#lx- rw-\n", (uint64_t)_text_start,
	       (uint64_t)_text_end, (uint64_t)_scenarios_page_end, (uint64_t)_data_start);
	pass("harden");
}

SCENARIO(sc_w_text, "write-kernel-text", "attack: write kernel text after boot (VTL1: r-x, immutable)")
{
	harden("write-kernel-text", 1);
	attack_write("write-kernel-text", "kernel_text", "kernel text", (uint64_t)&write_u64_fn & ~7ULL);
	echo_still_works("write-kernel-text");
	pass("write-kernel-text");
}

SCENARIO(sc_w_rodata, "write-rodata", "attack: write rodata (VTL1: r--, immutable)")
{
	harden("write-rodata", 1);
	attack_write("write-rodata", "rodata", "rodata", (uint64_t)&rodata_target);
	pass("write-rodata");
}

SCENARIO(sc_w_roai, "write-ro-after-init", "attack: write ro_after_init data after END_OF_BOOT (Heki: late init)")
{
	harden("write-ro-after-init", 0);
	ro_after_init_var = 0x2222;     /* still boot: allowed */
	uint64_t landed = *(volatile uint64_t *)&ro_after_init_var;
	report_value("ro_after_init_boot_write", landed);
	if (landed != 0x2222)
		fail("write-ro-after-init", "boot-time write to ro_after_init did not land");
	printf("boot-time write to ro_after_init landed (%#lx)\n", landed);
	if (heki_mode())        /* Heki: ro_after_init R-- at late init, a page list of its own */
		heki_end_of_boot("write-ro-after-init");
	else
		must("write-ro-after-init", "end_of_boot", VTL_CALL_END_OF_BOOT, "end of boot",
		     vtl_call(VTL_CALL_END_OF_BOOT, 0, 0, NULL));
	attack_write("write-ro-after-init", "ro_after_init", "ro_after_init", (uint64_t)&ro_after_init_var);
	pass("write-ro-after-init");
}

void call_fn(void *p) { ((void (*)(void))p)(); }

/* Plant code that stores EXEC_MARK at `code` (EXEC `target_key`, so the VMM reads the
 * marker back itself), run it: it must #PF without running (FAULT `fault_key`). */
void attack_exec(const char *name, const char *target_key, const char *fault_key, const char *what,
		 uint8_t *code, struct fault_info *fi)
{
	plant_marker_code(code, EXEC_MARK);
	report_exec(target_key, (uint64_t)code, (uint64_t)code, (uint64_t)&exec_marker, EXEC_MARK);
	printf("ATTACK exec=%#lx\n", (uint64_t)code);
	int faulted = try_run(call_fn, code, fi);
	if (!faulted || exec_marker == EXEC_MARK)
		attack_succeeded(name, "planted code ran", (uint64_t)code);
	expect_fault(name, fault_key, what, faulted, fi, 14);
}

/* Planted code announces itself: it stores a value into exec_marker (which the VMM reads
 * back after the run, through the EXEC report) and returns. */
volatile uint64_t exec_marker __attribute__((aligned(8)));

/* movabs $value, %rax; movabs %rax, exec_marker; ret.  Returns the length (21). */
uint64_t plant_marker_code(uint8_t *p, uint64_t value)
{
	uint64_t marker = (uint64_t)&exec_marker;
	p[0] = 0x48;
	p[1] = 0xB8;
	memcpy(p + 2, &value, 8);
	p[10] = 0x48;
	p[11] = 0xA3;
	memcpy(p + 12, &marker, 8);
	p[20] = 0xC3;
	return 21;
}

SCENARIO(sc_x_data, "exec-data-page", "attack: execute code written into a data page (NX in locked tables)")
{
	harden("exec-data-page", 1);
	struct fault_info fi;
	attack_exec("exec-data-page", "data_page", "exec_data_page", "execute data page", data_page, &fi);
	if (!(fi.error_code & 0x10))
		fail("exec-data-page", "#PF without the instruction-fetch bit");
	pass("exec-data-page");
}

SCENARIO(sc_pte, "modify-page-table", "attack: clear NX in the PTE of a data page (tables locked r--)")
{
	harden("modify-page-table", 1);
	uint64_t *pte = pte_for((uint64_t)data_page);
	attack_write("modify-page-table", "page_table_entry", "page-table entry", (uint64_t)pte);
	if (!(*pte & (1ULL << 63)))
		fail("modify-page-table", "NX bit gone");
	pass("modify-page-table");
}

SCENARIO(sc_ask_text_w, "ask-text-writable", "attack: ask VTL1 to make immutable kernel text writable")
{
	harden("ask-text-writable", 0);
	uint64_t text = (uint64_t)_text_start;
	expect_status("ask-text-writable", "protect_text_rw", VTL_CALL_PROTECT, "VTL_CALL_PROTECT(text, rw-)",
		      prot(text, 1, VTL_MEM_NX, 0), VTL_E_IMMUTABLE);
	attack_write("ask-text-writable", "kernel_text", "kernel text", text);
	pass("ask-text-writable");
}

SCENARIO(sc_ask_wx, "ask-writable-executable", "attack: ask VTL1 to make a writable data page executable")
{
	harden("ask-writable-executable", 0);
	uint64_t pg = (uint64_t)data_page;
	expect_status("ask-writable-executable", "protect_data_rwx", VTL_CALL_PROTECT,
		      "VTL_CALL_PROTECT(data page, rwx)", prot(pg, 1, 0, 0), VTL_E_POLICY);
	uint64_t a = protection_of(pg);
	report_value("data_page_attrs", a);     /* VTL_MEM_* per VTL1 (VTL_CALL_GET_PROTECTION) */
	printf("data page attributes still %#lx\n", a);
	if (a != VTL_MEM_NX)
		fail("ask-writable-executable", "attributes changed");
	pass("ask-writable-executable");
}

static uint64_t bad_list[4];

SCENARIO(sc_list_end, "protect-list-past-end", "attack: a page list running past the end of guest memory")
{
	harden("protect-list-past-end", 0);
	uint64_t mem = boot_info->mem_size;
	bad_list[0] = (uint64_t)data_page;
	bad_list[1] = mem - 4096;
	bad_list[2] = mem;
	bad_list[3] = mem + 4096;
	expect_status("protect-list-past-end", "protect_pages_past_end", VTL_CALL_PROTECT_PAGES,
		      "VTL_CALL_PROTECT_PAGES(4 pages, the last two past the end)",
		      vtl_call4(VTL_CALL_PROTECT_PAGES, (uint64_t)bad_list, 4, VTL_MEM_NW | VTL_MEM_NX, 0, NULL),
		      VTL_E_OUT_OF_RANGE);
	uint64_t first = protection_of((uint64_t)data_page), last = protection_of(mem - 4096);
	report_value("data_page_attrs", first);
	report_value("last_page_attrs", last);
	if (first != VTL_MEM_NX || last != VTL_MEM_NX)
		fail("protect-list-past-end", "part of the list was applied");
	printf("nothing applied: all or nothing\n");
	echo_still_works("protect-list-past-end");
	pass("protect-list-past-end");
}

static void clear_nxe(void *arg) { (void)arg; wrmsr(MSR_EFER, rdmsr(MSR_EFER) & ~EFER_NXE); }

SCENARIO(sc_efer, "clear-efer-nxe", "attack: clear EFER.NXE to make data executable (MSR filter)")
{
	harden("clear-efer-nxe", 1);
	uint64_t old = rdmsr(MSR_EFER);
	report_msr("efer", MSR_EFER, old);
	printf("ATTACK msr=%#x old=%#lx\n", MSR_EFER, old);
	struct fault_info fi;
	int faulted = try_run(clear_nxe, NULL, &fi);
	uint64_t now = rdmsr(MSR_EFER);
	if (!(now & EFER_NXE))
		attack_succeeded("clear-efer-nxe", "EFER.NXE cleared", now);
	expect_fault("clear-efer-nxe", "wrmsr_efer", "wrmsr EFER", faulted, &fi, 13);
	pass("clear-efer-nxe");
}

SCENARIO(sc_bench_icpt, "bench-intercept-allow", "N writes to an audited page, each an intercept VTL1 allows")
{
	harden("bench-intercept-allow", 0);
	must("bench-intercept-allow", "protect_audit_page", VTL_CALL_PROTECT, "audit page r-- (audit: allowed)",
	     prot((uint64_t)audit_page, 1, VTL_MEM_NW | VTL_MEM_NX, VTL_PROTECT_AUDIT));
	must("bench-intercept-allow", "end_of_boot", VTL_CALL_END_OF_BOOT, "end of boot",
	     vtl_call(VTL_CALL_END_OF_BOOT, 0, 0, NULL));
	uint64_t n = boot_info->param ? boot_info->param : 2000;
	uint64_t batches = n / BENCH_BATCH ? n / BENCH_BATCH : 1;
	if (batches > BENCH_MAX_STAMPS - 1)
		batches = BENCH_MAX_STAMPS - 1;
	volatile uint64_t *w = audit_page;
	for (uint64_t b = 0; b < batches; b++) {
		stamps[b] = rdtsc();
		for (int i = 0; i < BENCH_BATCH; i++)
			*w = b * BENCH_BATCH + i + 1;
	}
	stamps[batches] = rdtsc();
	uint64_t last = *w;
	report_value("last_value", last);       /* batches * BENCH_BATCH when every write landed */
	if (last != batches * BENCH_BATCH)
		fail("bench-intercept-allow", "allowed writes did not land");
	/* STAMPS "intercept_allow": value[0] = allowed intercepted writes between two stamps */
	uint64_t st = report_stamps("intercept_allow", stamps, batches + 1, BENCH_BATCH);
	printf("%lu allowed intercepted writes, last value %#lx (report: %s)\n", batches * BENCH_BATCH, last,
	       vtl_status_name(st));
	pass("bench-intercept-allow");      /* the verdict is about the allowed writes, not the timing */
}

/* ---- a malicious VTL0: seeded random protection requests, VTL calls and hypercalls ---- */
uint64_t rng_state;
uint64_t rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

#define SCRATCH_LO (64ULL << 20)       /* valid targets stay here: VTL0 never touches it */
#define SCRATCH_PAGES 4096
static uint64_t fuzz_list[64];

static uint64_t fuzz_gpa(void)
{
	uint64_t mem = boot_info->mem_size;
	switch (rnd() % 8) {
	case 0: return rnd();                                         /* anything */
	case 1: return SCRATCH_LO + (rnd() % SCRATCH_PAGES) * 4096 + 1 + rnd() % 4095; /* misaligned */
	case 2: return boot_info->vtl1_base + (rnd() % 4096) * 4096;   /* VTL1 */
	case 3: return mem - (rnd() % 8) * 4096;                      /* the end */
	case 4: return boot_info->vtl1_base - (rnd() % 8) * 4096;      /* runs into VTL1 */
	default: return SCRATCH_LO + (rnd() % SCRATCH_PAGES) * 4096;  /* valid */
	}
}

static uint64_t fuzz_pages(void)
{
	switch (rnd() % 6) {
	case 0: return 0;
	case 1: return rnd();
	case 2: return 1ULL << (rnd() % 40);
	default: return 1 + rnd() % 16;
	}
}

SCENARIO(sc_fuzz, "fuzz-protection", "malicious VTL0: N (param, default 10000) seeded random requests")
{
	harden("fuzz-protection", 0);
	uint64_t n = boot_info->param ? boot_info->param : 10000;
	rng_state = 0x9E3779B97F4A7C15ULL ^ n;
	uint64_t ok = 0, refused = 0, bad = 0;
	for (uint64_t i = 0; i < n; i++) {
		if (i == n / 2)
			must("fuzz-protection", "end_of_boot", VTL_CALL_END_OF_BOOT, "end of boot",
			     vtl_call(VTL_CALL_END_OF_BOOT, 0, 0, NULL));
		uint64_t st, attrs = rnd() % 16, flags = rnd() % 16, op = rnd() % 10;
		if (op < 4) {
			st = prot(fuzz_gpa(), fuzz_pages(), attrs, flags);
			if (st == VTL_OK && (!(attrs & 6) || i >= n / 2))
				bad++;          /* W+X, or a change after the end of boot */
		} else if (op < 6) {
			uint64_t count = rnd() % 4 ? 1 + rnd() % 64 : rnd();
			for (int k = 0; k < 64; k++)
				fuzz_list[k] = fuzz_gpa();
			uint64_t list = rnd() % 4 ? (uint64_t)fuzz_list : fuzz_gpa();
			st = vtl_call4(VTL_CALL_PROTECT_PAGES, list, count, attrs, flags, NULL);
			if (st == VTL_OK && (!(attrs & 6) || i >= n / 2))
				bad++;
		} else if (op < 7) {
			uint64_t code = rnd() % 16;
			if (code == VTL_CALL_REG_PROBE || code == VTL_CALL_GET_MEASUREMENT ||
			    code == VTL_CALL_END_OF_BOOT)
				code = VTL_CALL_NOP;        /* these write into VTL0 by design */
			st = vtl_call4(code, rnd(), rnd(), rnd(), rnd(), NULL);
		} else if (op < 8) {
			static struct vtl_protect_request r;
			r.target_vtl = (uint32_t)(rnd() % 3);
			r.attributes = (uint32_t)attrs;
			r.count = (uint32_t)rnd();
			r.list_gpa = fuzz_gpa();
			st = hypercall(VTL_HC_MODIFY_VTL_PROTECTION, rnd() % 2 ? (uint64_t)&r : fuzz_gpa(), 0, 0, NULL);
			if (st != VTL_E_ACCESS_DENIED)
				bad++;
		} else if (op < 9) {
			st = hypercall(VTL_HC_GET_VP_REGISTER, rnd() % 3, rnd() % 10, 0, NULL);
			if (st != VTL_E_ACCESS_DENIED)
				bad++;
		} else {
			uint64_t code = rnd() % 0x200;
			if (code == VTL_HC_RESET)
				code = 0x7777;      /* resets by design: the run would start over */
			st = hypercall(code, rnd(), rnd(), rnd(), NULL);
		}
		if (st == VTL_OK)
			ok++;
		else
			refused++;
	}
	report_value("requests", n);
	report_value("accepted", ok);
	report_value("refused", refused);
	report_value("policy_violations", bad);  /* accepted W+X or after-boot changes: must be 0 */
	printf("fuzz: %lu requests, %lu accepted, %lu refused, %lu policy violations\n", n, ok, refused, bad);
	if (bad)
		fail("fuzz-protection", "a request broke the policy");
	echo_still_works("fuzz-protection");
	pass("fuzz-protection");
}

/* ---- the report channel itself: what the helpers cut, what the VMM refuses ---- */
static uint8_t report_buf[VTL_REPORT_MAX_BYTES + 8];
static uint8_t no_read_page[4096] __attribute__((aligned(4096)));
static struct vtl_report raw;

static void raw_report(uint32_t kind, uint64_t data_gpa, uint64_t count)
{
	memset(&raw, 0, sizeof(raw));
	raw.kind = kind;
	memcpy(raw.name, "must-not-be-recorded", 21);
	raw.data_gpa = data_gpa;
	raw.data_count = count;
}

/* STATUS `key` (code VTL_HC_REPORT) for a report sent from `gpa`; fails unless `want`. */
static void expect_report_status(const char *key, uint64_t gpa, uint64_t want)
{
	uint64_t st = hypercall(VTL_HC_REPORT, gpa, 0, 0, NULL);
	expect_status("report-limits", key, VTL_HC_REPORT, key, st, want);
}

SCENARIO(sc_reports, "report-limits", "the report channel: long names and texts cut, bad records refused")
{
	const char *name = "report-limits";
	require_vtl1(name);     /* for a no-read page */
	/* The helpers cut a 46-byte name to 31 bytes and an 82-byte text to 63, NUL-terminated. */
	uint64_t st = report(VTL_REPORT_VALUE, "long-name-0123456789abcdefghijklmnopqrstuvwxyz", 7, 1, 2, 3,
			     "long-text-0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz");
	expect_status(name, "long_report", VTL_HC_REPORT, "report with a long name and text", st, VTL_OK);
	/* The VMM copies the data during the call: changing it afterwards changes nothing. */
	memset(report_buf, 0xA5, VTL_REPORT_MAX_BYTES);
	st = report_bytes("bytes_max", report_buf, VTL_REPORT_MAX_BYTES);
	memset(report_buf, 0x5A, VTL_REPORT_MAX_BYTES);
	expect_status(name, "bytes_max", VTL_HC_REPORT, "BYTES of VTL_REPORT_MAX_BYTES", st, VTL_OK);
	/* Records the helpers never send. */
	raw_report(0, 0, 0);
	expect_report_status("kind_0", (uint64_t)&raw, VTL_E_INVALID_ARG);
	raw_report(VTL_REPORT_BYTES + 100, 0, 0);
	expect_report_status("kind_unknown", (uint64_t)&raw, VTL_E_INVALID_ARG);
	raw_report(VTL_REPORT_VALUE, 0, 0);
	memset(raw.name, 'n', sizeof(raw.name));
	expect_report_status("name_unterminated", (uint64_t)&raw, VTL_E_INVALID_ARG);
	raw_report(VTL_REPORT_VALUE, 0, 0);
	memset(raw.text, 't', sizeof(raw.text));
	expect_report_status("text_unterminated", (uint64_t)&raw, VTL_E_INVALID_ARG);
	raw_report(VTL_REPORT_BYTES, (uint64_t)report_buf, VTL_REPORT_MAX_BYTES + 1);
	expect_report_status("bytes_too_many", (uint64_t)&raw, VTL_E_INVALID_ARG);
	raw_report(VTL_REPORT_STAMPS, (uint64_t)report_buf, VTL_REPORT_MAX_STAMPS + 1);
	expect_report_status("stamps_too_many", (uint64_t)&raw, VTL_E_INVALID_ARG);
	/* Memory VTL0 may not read: VTL1's region, beyond guest memory, a no-read page. */
	raw_report(VTL_REPORT_BYTES, VTL1_BASE + VTL1_IMAGE_MIN_OFF, 16);
	expect_report_status("data_in_vtl1", (uint64_t)&raw, VTL_E_OUT_OF_RANGE);
	expect_report_status("record_in_vtl1", VTL1_BASE + VTL1_IMAGE_MIN_OFF, VTL_E_OUT_OF_RANGE);
	expect_report_status("record_past_memory", boot_info->mem_size - 64, VTL_E_OUT_OF_RANGE);
	must(name, "protect_no_read", VTL_CALL_PROTECT, "a page no-read for VTL0",
	     prot((uint64_t)no_read_page, 1, VTL_MEM_NR | VTL_MEM_NW | VTL_MEM_NX, 0));
	raw_report(VTL_REPORT_BYTES, (uint64_t)no_read_page, 16);
	expect_report_status("data_no_read", (uint64_t)&raw, VTL_E_OUT_OF_RANGE);
	expect_report_status("record_no_read", (uint64_t)no_read_page, VTL_E_OUT_OF_RANGE);
	pass(name);
}

/* ==== issue 9: registers VTL1 pins through the privileged section, and the soundness of
 * its policy (confused deputy, stale grants, W^X between the lock and END_OF_BOOT).
 * Each scenario hardens first (harden(): attributes, then the lock, which pins registers
 * where the VMM decodes the privileged section), names its target through the report
 * channel (REGISTER with the value before the attack, TARGET, MSR, EXEC with a marker the
 * planted code would write), then attacks with the arbitrary-write primitive of the
 * threat model and the privileged section's own functions. ==== */
#define PTE_NX (1ULL << 63)
#define PTE_RW (1ULL << 1)
#define PTE_PS (1ULL << 7)
#define PTE_ADDR 0x000FFFFFFFFFF000ULL
#define CR0_PINNED (CR0_PE | CR0_WP | CR0_PG)
#define CR4_PINNED (~(CR4_MCE | CR4_PGE | CR4_PCE | CR4_VMXE))

/* A register write through one of the privileged section's functions, under try_run. */
struct reg_write {
	void (*fn)(uint64_t);
	uint64_t value;
};
static void reg_write_fn(void *p)
{
	const struct reg_write *w = p;
	w->fn(w->value);
}
int try_reg_write(void (*fn)(uint64_t), uint64_t value, struct fault_info *fi)
{
	struct reg_write w = { fn, value };
	return try_run(reg_write_fn, &w, fi);
}
static void lldt_fn(uint64_t v) { priv_lldt((uint16_t)v); }
static void ltr_fn(uint64_t v) { priv_ltr((uint16_t)v); }
static void lmsw_fn(uint64_t v) { priv_lmsw((uint16_t)v); }
static void clts_fn(uint64_t v) { (void)v; priv_clts(); }
static void lgdt_fn(uint64_t v) { priv_lgdt((const struct desc_ptr *)v); }
static void lidt_fn(uint64_t v) { priv_lidt((const struct desc_ptr *)v); }
static void xsetbv_fn(uint64_t v) { priv_xsetbv(0, v); }
static uint32_t wrmsr_index;
static void wrmsr_fn(uint64_t v) { wrmsr(wrmsr_index, v); }

/* The write must have faulted with #GP (FAULT `key`) and left the register as it was
 * before (`now`, read back here; the VMM reads it from KVM through the REGISTER report). */
void expect_register_kept(const char *name, const char *key, const char *what, int faulted,
				 struct fault_info *fi, uint64_t old, uint64_t now)
{
	if (now != old)
		attack_succeeded(name, what, now);
	expect_fault(name, key, what, faulted, fi, 13);
	printf("%s refused, register still %#lx\n", what, now);
}

SCENARIO(sc_cr0_wp, "clear-cr0-wp", "attack: clear CR0.WP (VTL1 pins CR0.PE/WP/PG)")
{
	const char *name = "clear-cr0-wp";
	harden(name, 1);
	uint64_t old = read_cr0();
	report_register("cr0", VTL_REG_CR0, old, 0);
	printf("ATTACK cr0 %#lx -> %#lx\n", old, old & ~CR0_WP);
	struct fault_info fi;
	int faulted = try_reg_write(priv_write_cr0, old & ~CR0_WP, &fi);
	expect_register_kept(name, "write_cr0", "mov to CR0 clearing WP", faulted, &fi, old, read_cr0());
	echo_still_works(name);
	pass(name);
}

/* VALUE "cr4_boot_set" (the bits boot enabled because the vCPU has them), REGISTER cr4,
 * then CR4 without `bit`: #GP (FAULT "write_cr4"), CR4 unchanged. */
static void clear_cr4_bit(const char *name, uint64_t bit, const char *bit_name)
{
	harden(name, 1);
	report_value("cr4_boot_set", cr4_boot_set);
	uint64_t old = read_cr4();
	if (!(old & bit)) {
		printf("the vCPU has no %s: nothing to clear\n", bit_name);
		fail(name, "the vCPU does not support the CR4 bit");
	}
	report_register("cr4", VTL_REG_CR4, old, 0);
	printf("ATTACK cr4 %#lx -> %#lx (clear %s)\n", old, old & ~bit, bit_name);
	struct fault_info fi;
	int faulted = try_reg_write(priv_write_cr4, old & ~bit, &fi);
	expect_register_kept(name, "write_cr4", "mov to CR4 clearing a pinned bit", faulted, &fi, old, read_cr4());
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_cr4_smep, "clear-cr4-smep", "attack: clear CR4.SMEP (set at boot where the vCPU has it; pinned)")
{ clear_cr4_bit("clear-cr4-smep", CR4_SMEP, "SMEP"); }

SCENARIO(sc_cr4_smap, "clear-cr4-smap", "attack: clear CR4.SMAP (set at boot where the vCPU has it; pinned)")
{ clear_cr4_bit("clear-cr4-smap", CR4_SMAP, "SMAP"); }

SCENARIO(sc_cr4_umip, "clear-cr4-umip", "attack: clear CR4.UMIP (set at boot where the vCPU has it; pinned)")
{ clear_cr4_bit("clear-cr4-umip", CR4_UMIP, "UMIP"); }

/* ---- the attacker's own page tables: a copy of the current ones, NX cleared at every
 * level, optionally with kernel text mapped to a writable copy ---- */
#define OWN_MAX_TABLES 24
#define TEXT_COPY_PAGES 16
static uint64_t own_tables[OWN_MAX_TABLES][512] __attribute__((aligned(4096)));
static uint8_t text_copy[TEXT_COPY_PAGES][4096] __attribute__((aligned(4096)));
static int own_used, own_remap_text;

static uint64_t *copy_tables(const uint64_t *src, int level, uint64_t va)
{
	if (own_used >= OWN_MAX_TABLES)
		return NULL;
	uint64_t *dst = own_tables[own_used++];
	uint64_t ts = (uint64_t)_text_start, ps = (uint64_t)_priv_start;
	for (uint64_t i = 0; i < 512; i++) {
		uint64_t e = src[i], eva = va | (i << (12 + 9 * (level - 1)));
		if (!(e & 1)) {
			dst[i] = e;
			continue;
		}
		e &= ~PTE_NX;
		if (level > 2 || (level == 2 && !(e & PTE_PS))) {
			uint64_t *child = copy_tables((const uint64_t *)(e & PTE_ADDR), level - 1, eva);
			if (!child)
				return NULL;
			e = (e & ~PTE_ADDR) | (uint64_t)child;
		} else if (level == 1 && own_remap_text && eva >= ts && eva < ps) {
			e = (e & ~PTE_ADDR) | (uint64_t)text_copy[(eva - ts) >> 12] | PTE_RW;
		}
		dst[i] = e;
	}
	return dst;
}

static uint64_t own_root(const char *name, int remap_text)
{
	own_used = 0;
	own_remap_text = remap_text;
	uint64_t *root = copy_tables((const uint64_t *)(read_cr3() & PTE_ADDR), 4, 0);
	if (!root)
		fail(name, "page tables too big to copy");
	report_value("own_table_pages", (uint64_t)own_used);
	return (uint64_t)root;
}

/* Text code the writable-text attack patches (through a volatile pointer: never inlined). */
static uint64_t __attribute__((noinline, noclone, used)) victim_fn(void) { return 0x11; }
static uint64_t (*volatile victim)(void) = victim_fn;

SCENARIO(sc_own_cr3, "load-own-cr3", "attack: load CR3 with a copy of the page tables without NX, run a data page")
{
	const char *name = "load-own-cr3";
	harden(name, 1);
	uint64_t old = read_cr3(), root = own_root(name, 0);
	plant_marker_code(data_page, EXEC_MARK);
	report_exec("data_page", (uint64_t)data_page, (uint64_t)data_page, (uint64_t)&exec_marker, EXEC_MARK);
	report_register("cr3", VTL_REG_CR3, old, 0);
	printf("ATTACK cr3 %#lx -> %#lx (tables without NX)\n", old, root);
	struct fault_info fi;
	int faulted = try_reg_write(priv_write_cr3, root, &fi);
	if (read_cr3() != old) {
		struct fault_info ran;
		try_run(call_fn, data_page, &ran);
		attack_succeeded(name, "CR3 loaded with tables without NX", read_cr3());
	}
	expect_fault(name, "write_cr3", "mov to CR3 of tables VTL1 never locked", faulted, &fi, 13);
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_own_cr3_text, "load-own-cr3-writable-text",
	 "attack: load CR3 with tables mapping kernel text to a writable copy, patch and run it")
{
	const char *name = "load-own-cr3-writable-text";
	harden(name, 1);
	uint64_t ts = (uint64_t)_text_start, ps = (uint64_t)_priv_start;
	if (PAGES(ts, ps) > TEXT_COPY_PAGES)
		fail(name, "text too big to copy");
	memcpy(text_copy, (const void *)ts, ps - ts);
	uint64_t old = read_cr3(), root = own_root(name, 1);
	/* The patch as the writable copy would hold it once written through the text address. */
	uint64_t target = (uint64_t)victim_fn, copy = (uint64_t)text_copy + (target - ts);
	plant_marker_code((uint8_t *)copy, EXEC_MARK);
	report_exec("kernel_text_copy", target, copy, (uint64_t)&exec_marker, EXEC_MARK);
	report_register("cr3", VTL_REG_CR3, old, 0);
	printf("ATTACK cr3 %#lx -> %#lx (text %#lx-%#lx mapped to a writable copy at %#lx)\n", old, root, ts, ps,
	       (uint64_t)text_copy);
	struct fault_info fi;
	int faulted = try_reg_write(priv_write_cr3, root, &fi);
	if (read_cr3() != old) {
		victim();
		attack_succeeded(name, "CR3 loaded with writable kernel text", read_cr3());
	}
	expect_fault(name, "write_cr3", "mov to CR3 of tables VTL1 never locked", faulted, &fi, 13);
	uint64_t r = victim();
	report_value("victim_result", r);        /* 0x11: the text that runs is the original */
	if (r != 0x11 || exec_marker == EXEC_MARK)
		attack_succeeded(name, "patched text ran", r);
	pass(name);
}

/* ---- descriptor tables: LGDT/LIDT of the attacker's own copy, LLDT, LTR ---- */
static uint8_t table_copy[4096] __attribute__((aligned(16)));
static struct desc_ptr own_dp;

static void own_descriptor_table(const char *name, int idt)
{
	harden(name, 1);
	struct desc_ptr old, now;
	if (idt)
		sidt(&old);
	else
		sgdt(&old);
	if ((uint64_t)old.limit + 1 > sizeof(table_copy))
		fail(name, "table too big to copy");
	memcpy(table_copy, (const void *)old.base, (uint64_t)old.limit + 1);
	own_dp.limit = old.limit;
	own_dp.base = (uint64_t)table_copy;
	report_register(idt ? "idtr" : "gdtr", idt ? VTL_REG_IDTR : VTL_REG_GDTR, old.base, old.limit);
	printf("ATTACK %s base %#lx -> %#lx (a writable copy)\n", idt ? "IDTR" : "GDTR", old.base, own_dp.base);
	struct fault_info fi;
	int faulted = try_reg_write(idt ? lidt_fn : lgdt_fn, (uint64_t)&own_dp, &fi);
	if (idt)
		sidt(&now);
	else
		sgdt(&now);
	if (now.base != old.base || now.limit != old.limit)
		attack_succeeded(name, idt ? "IDTR loaded" : "GDTR loaded", now.base);
	expect_fault(name, idt ? "lidt" : "lgdt", idt ? "LIDT of an own table" : "LGDT of an own table", faulted,
		     &fi, 13);
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_lidt, "lidt-own", "attack: LIDT of the attacker's own, writable IDT (IDTR fixed at the lock)")
{ own_descriptor_table("lidt-own", 1); }

SCENARIO(sc_lgdt, "lgdt-own", "attack: LGDT of the attacker's own, writable GDT (GDTR fixed at the lock)")
{ own_descriptor_table("lgdt-own", 0); }

SCENARIO(sc_lldt, "lldt", "attack: LLDT of an LDT descriptor (LDTR fixed at the lock)")
{
	const char *name = "lldt";
	harden(name, 1);
	uint64_t old = read_ldtr();
	report_register("ldtr", VTL_REG_LDTR, old, 0);
	printf("ATTACK ldtr %#lx -> %#x\n", old, LDT_SEL);
	struct fault_info fi;
	int faulted = try_reg_write(lldt_fn, LDT_SEL, &fi);
	expect_register_kept(name, "lldt", "LLDT", faulted, &fi, old, read_ldtr());
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_ltr, "ltr", "attack: LTR of a second TSS (attacker stacks; TR fixed at the lock)")
{
	const char *name = "ltr";
	/* Before END_OF_BOOT: the GDT (ro_after_init) is still writable, so that without
	 * register pinning the LTR really happens (it sets the busy bit in the GDT) rather than
	 * failing in KVM's emulator on a read-only GDT. */
	harden(name, 0);
	uint64_t old = read_tr();
	report_register("tr", VTL_REG_TR, old, 0);
	printf("ATTACK tr %#lx -> %#x\n", old, TSS2_SEL);
	struct fault_info fi;
	int faulted = try_reg_write(ltr_fn, TSS2_SEL, &fi);
	expect_register_kept(name, "ltr", "LTR", faulted, &fi, old, read_tr());
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_xsetbv, "xsetbv", "attack: XSETBV changing XCR0 (pinned from the lock)")
{
	const char *name = "xsetbv";
	harden(name, 1);
	if (!(cr4_boot_set & CR4_OSXSAVE))
		fail(name, "the vCPU has no XSAVE");
	uint32_t a, b, c, d;
	cpuid(0xD, 0, &a, &b, &c, &d);
	uint64_t old = xcr0_boot, want;
	if ((a & XCR0_AVX) && (old & XCR0_SSE))
		want = old | XCR0_AVX;          /* a legal XCR0, but not the pinned one */
	else if (old & XCR0_SSE)
		want = old & ~XCR0_SSE;
	else
		fail(name, "XCR0 has nothing to change");
	report_register("xcr0", VTL_REG_XCR0, old, 0);
	printf("ATTACK xcr0 %#lx -> %#lx\n", old, want);
	struct fault_info fi;
	int faulted = try_reg_write(xsetbv_fn, want, &fi);
	/* No read-back here: this host's KVM emulates every instruction and cannot emulate
	 * XGETBV.  A write that did not fault took effect; the VMM reads XCR0 from KVM. */
	expect_register_kept(name, "xsetbv", "XSETBV", faulted, &fi, old, faulted ? old : want);
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_mov_cr_outside, "mov-cr-outside-section",
	 "attack: a MOV to CR0 planted in a data page, outside the privileged section (NX)")
{
	const char *name = "mov-cr-outside-section";
	harden(name, 1);
	uint64_t old = read_cr0(), want = old & ~CR0_WP;
	uint8_t *p = data_page;
	p[0] = 0x48;                    /* movabs $want, %rax */
	p[1] = 0xB8;
	memcpy(p + 2, &want, 8);
	p[10] = 0x0F;                   /* mov %rax, %cr0 */
	p[11] = 0x22;
	p[12] = 0xC0;
	plant_marker_code(p + 13, EXEC_MARK);
	report_register("cr0", VTL_REG_CR0, old, 0);
	report_exec("data_page", (uint64_t)p, (uint64_t)p, (uint64_t)&exec_marker, EXEC_MARK);
	printf("ATTACK exec=%#lx: mov %%rax,%%cr0 with rax=%#lx\n", (uint64_t)p, want);
	struct fault_info fi;
	int faulted = try_run(call_fn, p, &fi);
	uint64_t now = read_cr0();
	if (now != old || exec_marker == EXEC_MARK)
		attack_succeeded(name, "the planted MOV to CR0 ran", now);
	expect_fault(name, "exec_data_page", "execute a planted MOV to CR0", faulted, &fi, 14);
	if (!(fi.error_code & 0x10))
		fail(name, "#PF without the instruction-fetch bit");
	pass(name);
}

SCENARIO(sc_lmsw, "lmsw-clear-pe",
	 "attack: clear CR0.PE with LMSW, CLTS and MOV to CR0 (PE pinned; LMSW cannot clear it anyway)")
{
	const char *name = "lmsw-clear-pe";
	harden(name, 1);
	uint64_t old = read_cr0();
	report_register("cr0", VTL_REG_CR0, old, 0);
	printf("ATTACK lmsw %#lx (PE clear), clts, mov to CR0 %#lx\n", old & 0xE, old & ~CR0_PE);
	/* LMSW and CLTS write CR0[3:0]; PE is the only pinned bit there, and LMSW never clears
	 * it: either may be applied as a no-op or refused. */
	struct fault_info fi;
	int lmsw_faulted = try_reg_write(lmsw_fn, old & 0xE, &fi);
	if (lmsw_faulted)
		report_fault("lmsw", &fi);
	report_value("lmsw_faulted", (uint64_t)lmsw_faulted);
	int clts_faulted = try_reg_write(clts_fn, 0, &fi);
	if (clts_faulted)
		report_fault("clts", &fi);
	report_value("clts_faulted", (uint64_t)clts_faulted);
	uint64_t now = read_cr0();
	if (now != old)
		attack_succeeded(name, "CR0 changed by LMSW/CLTS", now);
	/* MOV to CR0 can clear PE: #GP (PG without PE is no CR0 the CPU takes either). */
	int faulted = try_reg_write(priv_write_cr0, old & ~CR0_PE, &fi);
	expect_register_kept(name, "write_cr0", "mov to CR0 clearing PE", faulted, &fi, old, read_cr0());
	printf("CR0 %#lx after LMSW (%s), CLTS (%s) and MOV to CR0 (#GP)\n", read_cr0(),
	       lmsw_faulted ? "#GP" : "no fault", clts_faulted ? "#GP" : "no fault");
	pass(name);
}

/* ---- confused deputy: VTL calls whose output buffer is memory VTL0 may not write ---- */
static const uint64_t deputy_rodata[4] __attribute__((aligned(32), used)) = {
	0x1111111111111111ULL, 0x2222222222222222ULL, 0x3333333333333333ULL, 0x4444444444444444ULL };

/* TARGET `key` (8 bytes at target), the call, then: memory unchanged and STATUS `status_key`
 * = VTL_E_ACCESS_DENIED. */
static void deputy(const char *name, const char *key, const char *status_key, uint64_t code, uint64_t target,
		   int via_probe)
{
	uint8_t before[256];
	memcpy(before, (const void *)target, sizeof(before));
	report_target(key, target, 8, *(volatile uint64_t *)target);
	printf("ATTACK: VTL call %#lx with its output buffer at %#lx (%s)\n", code, target, key);
	uint64_t st;
	if (via_probe) {
		reg_probe_call((struct reg_probe_result *)target);   /* RCX = target */
		st = probe_after[0];
	} else {
		st = vtl_call(code, 0, target, NULL);                 /* RDI = target */
	}
	if (memcmp(before, (const void *)target, sizeof(before)) != 0)
		attack_succeeded(name, "VTL1 wrote where VTL0 may not", *(volatile uint64_t *)target);
	expect_status(name, status_key, code, "VTL call into memory VTL0 may not write", st, VTL_E_ACCESS_DENIED);
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_deputy_rodata, "confused-deputy-rodata",
	 "attack: VTL_CALL_GET_MEASUREMENT with its output in immutable rodata (VTL1 as deputy)")
{
	harden("confused-deputy-rodata", 1);
	deputy("confused-deputy-rodata", "rodata", "get_measurement_into_rodata", VTL_CALL_GET_MEASUREMENT,
	       (uint64_t)deputy_rodata, 0);
}

SCENARIO(sc_deputy_text, "confused-deputy-text",
	 "attack: VTL_CALL_REG_PROBE with its register dump in immutable kernel text (VTL1 as deputy)")
{
	harden("confused-deputy-text", 1);
	deputy("confused-deputy-text", "kernel_text", "reg_probe_into_text", VTL_CALL_REG_PROBE,
	       (uint64_t)victim_fn & ~7ULL, 1);
}

SCENARIO(sc_deputy_pt, "confused-deputy-page-table",
	 "attack: VTL_CALL_GET_MEASUREMENT with its output in a locked page-table page (VTL1 as deputy)")
{
	harden("confused-deputy-page-table", 1);
	deputy("confused-deputy-page-table", "page_table_entry", "get_measurement_into_pte",
	       VTL_CALL_GET_MEASUREMENT, (uint64_t)pte_for((uint64_t)data_page) & ~31ULL, 0);
}

/* ---- a grant that outlives the protection it came with ---- */
SCENARIO(sc_stale_audit, "stale-audit-text",
	 "attack: a text page audited (writes allowed) at boot, then made immutable text: write it")
{
	const char *name = "stale-audit-text";
	require_vtl1(name);
	uint64_t page = (uint64_t)victim_fn & ~0xFFFULL;
	must(name, "protect_audit_text_page", VTL_CALL_PROTECT, "text page r--, audited: writes allowed",
	     prot(page, 1, VTL_MEM_NW | VTL_MEM_NX, VTL_PROTECT_AUDIT));
	harden_protect(name);           /* text r-x, immutable: the audit grant ends here */
	harden_lock(name, 0);
	attack_write(name, "kernel_text", "text once audited", (uint64_t)victim_fn & ~7ULL);
	/* And no new grant on immutable text either (STATUS before the second write). */
	uint64_t st = prot(page, 1, VTL_MEM_NW, VTL_PROTECT_AUDIT);
	report_status("audit_immutable_text", VTL_CALL_PROTECT, st);
	printf("audit on immutable text -> %s\n", vtl_status_name(st));
	attack_write(name, "kernel_text", "text audited again", (uint64_t)victim_fn & ~7ULL);
	if (st != VTL_E_IMMUTABLE)
		fail(name, "unexpected status");
	echo_still_works(name);
	pass(name);
}

/* ---- W^X between the lock and END_OF_BOOT ---- */
static uint8_t module_page[4096] __attribute__((aligned(4096)));
static uint8_t new_code[32];
static void write_new_code(void *p) { memcpy(p, new_code, sizeof(new_code)); }

SCENARIO(sc_exec_rw, "exec-page-writable-before-eob",
	 "attack: after the lock, before END_OF_BOOT, make an executable page writable and run new code")
{
	const char *name = "exec-page-writable-before-eob";
	require_vtl1(name);
	harden_protect(name);
	/* Boot (trusted) loads a module: code in its own page, r-x for VTL1, executable in
	 * the tables; not immutable, so only W^X keeps it unwritable. */
	uint64_t m = (uint64_t)module_page;
	static const uint8_t code[] = { 0xB8, 0x11, 0x11, 0x00, 0x00, 0xC3 };   /* mov $0x1111, %eax; ret */
	memcpy(module_page, code, sizeof(code));
	must(name, "protect_module_rx", VTL_CALL_PROTECT, "module page r-x", prot(m, 1, VTL_MEM_NW, 0));
	*pte_for(m) &= ~PTE_NX;
	invlpg(m);
	harden_lock(name, 0);
	uint64_t (*volatile module)(void) = (uint64_t (*)(void))m;
	uint64_t r = module();
	report_value("module_result", r);
	if (r != 0x1111)
		fail(name, "the module did not run");
	uint64_t st = prot(m, 1, VTL_MEM_NX, 0);
	report_value("module_page_attrs", protection_of(m));
	/* The new code, written with the arbitrary-write primitive. */
	uint64_t old = *(volatile uint64_t *)m;
	plant_marker_code(new_code, EXEC_MARK);
	report_target("module_page", m, 8, old);
	report_exec("module_page", m, m, (uint64_t)&exec_marker, EXEC_MARK);
	printf("ATTACK: module page rw- (%s), then new code at %#lx\n", vtl_status_name(st), m);
	struct fault_info fi;
	int faulted = try_run(write_new_code, module_page, &fi);
	if (*(volatile uint64_t *)m != old) {
		struct fault_info ran;
		try_run(call_fn, module_page, &ran);
		attack_succeeded(name, "new code written into an executable page", *(volatile uint64_t *)m);
	}
	expect_status(name, "protect_module_rw", VTL_CALL_PROTECT, "module page rw- after the lock", st,
		      VTL_E_POLICY);
	expect_fault(name, "module_page", "write new code into the module page", faulted, &fi, 14);
	r = module();
	report_value("module_result_after", r);
	if (r != 0x1111 || exec_marker == EXEC_MARK)
		attack_succeeded(name, "new code ran", r);
	pass(name);
}

/* ---- MSRs: EFER pinned whole from the lock, syscall MSRs from END_OF_BOOT ---- */
static void msr_attack(const char *name, int end_of_boot, uint32_t msr, const char *key, uint64_t value,
		       const char *what)
{
	harden(name, end_of_boot);
	uint64_t old = rdmsr(msr);
	report_msr(key, msr, old);
	printf("ATTACK wrmsr %#x: %#lx -> %#lx (%s)\n", msr, old, value, what);
	wrmsr_index = msr;
	struct fault_info fi;
	int faulted = try_reg_write(wrmsr_fn, value, &fi);
	uint64_t now = rdmsr(msr);
	if (now != old)
		attack_succeeded(name, what, now);
	char fault_key[32] = "wrmsr_";
	memcpy(fault_key + 6, key, strlen(key) + 1 < 26 ? strlen(key) + 1 : 26);
	fault_key[31] = 0;
	expect_fault(name, fault_key, what, faulted, &fi, 13);
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_efer_lme, "clear-efer-lme", "attack: clear EFER.LME (EFER pinned whole from the lock)")
{ msr_attack("clear-efer-lme", 1, MSR_EFER, "efer", rdmsr(MSR_EFER) & ~EFER_LME, "EFER.LME cleared"); }

SCENARIO(sc_efer_sce, "clear-efer-sce", "attack: clear EFER.SCE, NXE kept (EFER pinned whole from the lock)")
{ msr_attack("clear-efer-sce", 1, MSR_EFER, "efer", rdmsr(MSR_EFER) & ~EFER_SCE, "EFER.SCE cleared"); }

SCENARIO(sc_lstar_nc, "lstar-non-canonical", "attack: a non-canonical LSTAR before END_OF_BOOT (VTL1 checks it)")
{
	msr_attack("lstar-non-canonical", 0, MSR_LSTAR, "lstar", 0x0000800000000000ULL | (uint64_t)victim_fn,
		   "non-canonical LSTAR");
}

SCENARIO(sc_lstar_eob, "write-lstar-after-eob", "attack: point LSTAR at other code after END_OF_BOOT (pinned)")
{ msr_attack("write-lstar-after-eob", 1, MSR_LSTAR, "lstar", (uint64_t)victim_fn, "LSTAR changed after boot"); }

/* ---- a malicious VTL0 against the pinned registers: seeded random writes ----
 * Through the privileged section's functions (CR0/CR3/CR4/XCR0/GDTR/IDTR/LDTR/TR) and
 * WRMSR (EFER, the syscall MSRs), each under try_run so that #GP is survived.  After every
 * attempt the guest reads back what it can and counts a violation where a pinned value
 * changed; a change VTL1 allowed (an unpinned bit: CR0.MP/TS/CD..., CR4.PGE/MCE/PCE/VMXE,
 * CR3 cache bits, syscall MSRs before END_OF_BOOT) is put back, so the registers the
 * kernel needs stay as they were.  XCR0 cannot be read back on this host (no XGETBV
 * emulation): an XSETBV to a value other than the pinned one that does not fault counts
 * as a violation. */
static const uint32_t fuzz_msrs[] = { MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK,
				      MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP };
static const char *const fuzz_msr_names[] = { "efer", "star", "lstar", "cstar", "sfmask",
					      "sysenter_cs", "sysenter_esp", "sysenter_eip" };
#define NFUZZ_MSRS (sizeof(fuzz_msrs) / sizeof(fuzz_msrs[0]))
static struct desc_ptr fuzz_dp;

static uint64_t fuzz_reg_value(uint64_t cur)
{
	switch (rnd() % 8) {
	case 0: return rnd();                                         /* anything */
	case 1: return cur;                                           /* the same value */
	case 2: return cur ^ (1ULL << (rnd() % 64));                  /* one bit, reserved ones too */
	case 3: return cur ^ (1ULL << (rnd() % 32)) ^ (1ULL << (rnd() % 32));
	case 4: return cur | (rnd() << 48);                           /* non-canonical, high bits */
	case 5: return cur ^ (1ULL << (rnd() % 12));                  /* low bits */
	case 6: return cur & ~(1ULL << (rnd() % 32));                 /* clear a bit */
	default: return cur | (1ULL << (rnd() % 32));                 /* set a bit */
	}
}

static uint64_t fuzz_violations;
static void violation(const char *what, uint64_t want, uint64_t got)
{
	if (fuzz_violations++ < 8)
		printf("VIOLATION: %s is %#lx, pinned %#lx\n", what, got, want);
}

SCENARIO(sc_fuzz_regs, "fuzz-registers",
	 "malicious VTL0: N (param, default 10000) seeded random writes to pinned registers and MSRs")
{
	const char *name = "fuzz-registers";
	harden(name, 0);
	report_value("register_pinning", register_pinning);
	if (!register_pinning)
		fail(name, "register pinning unavailable on this VMM: nothing to fuzz");
	uint64_t n = boot_info->param ? boot_info->param : 10000;
	rng_state = 0x9E3779B97F4A7C15ULL ^ n;
	report_value("seed", rng_state);
	/* The pinned state, reported so that the VMM checks it after the run itself. */
	uint64_t cr0 = read_cr0(), cr3 = read_cr3(), cr4 = read_cr4(), xcr0 = xcr0_boot;
	struct desc_ptr gdtr, idtr;
	sgdt(&gdtr);
	sidt(&idtr);
	uint64_t ldtr = read_ldtr(), tr = read_tr(), msr[NFUZZ_MSRS];
	report_register("cr0", VTL_REG_CR0, cr0, 0);
	report_register("cr3", VTL_REG_CR3, cr3, 0);
	report_register("cr4", VTL_REG_CR4, cr4, 0);
	if (cr4 & CR4_OSXSAVE)
		report_register("xcr0", VTL_REG_XCR0, xcr0, 0);
	report_register("gdtr", VTL_REG_GDTR, gdtr.base, gdtr.limit);
	report_register("idtr", VTL_REG_IDTR, idtr.base, idtr.limit);
	report_register("ldtr", VTL_REG_LDTR, ldtr, 0);
	report_register("tr", VTL_REG_TR, tr, 0);
	for (uint64_t k = 0; k < NFUZZ_MSRS; k++) {
		msr[k] = rdmsr(fuzz_msrs[k]);
		report_msr(fuzz_msr_names[k], fuzz_msrs[k], msr[k]);
	}
	uint64_t attempts = 0, faults = 0, restored = 0, restore_faults = 0;
	fuzz_violations = 0;
	int boot_over = 0;
	for (uint64_t i = 0; i < n; i++) {
		if (i == n / 2) {
			must(name, "end_of_boot", VTL_CALL_END_OF_BOOT, "end of boot",
			     vtl_call(VTL_CALL_END_OF_BOOT, 0, 0, NULL));
			boot_over = 1;
		}
		struct fault_info fi;
		int f = 0, kind = (int)(rnd() % 10);
		uint64_t v = 0;
		switch (kind) {
		case 0:
			f = try_reg_write(priv_write_cr0, fuzz_reg_value(cr0), &fi);
			break;
		case 1:
			switch (rnd() % 4) {
			case 0: v = cr3; break;
			case 1: v = cr3 | (rnd() % 2 ? 0x8 : 0x10); break;
			case 2: v = (rnd() % (boot_info->mem_size >> 12)) << 12; break;
			default: v = fuzz_reg_value(cr3); break;
			}
			f = try_reg_write(priv_write_cr3, v, &fi);
			break;
		case 2:
			f = try_reg_write(priv_write_cr4, fuzz_reg_value(cr4), &fi);
			break;
		case 3:
			if (!(cr4 & CR4_OSXSAVE))
				continue;
			v = rnd() % 3 ? fuzz_reg_value(xcr0) & 0xFF : xcr0;
			f = try_reg_write(xsetbv_fn, v, &fi);
			if (!f && v != xcr0)
				violation("XCR0 (XSETBV not refused)", xcr0, v);
			break;
		case 4:
		case 5: {
			const struct desc_ptr *cur = kind == 4 ? &gdtr : &idtr;
			fuzz_dp.base = rnd() % 3 ? fuzz_reg_value(cur->base) : cur->base;
			fuzz_dp.limit = rnd() % 2 ? (uint16_t)rnd() : cur->limit;
			f = try_reg_write(kind == 4 ? lgdt_fn : lidt_fn, (uint64_t)&fuzz_dp, &fi);
			break;
		}
		case 6: {
			static const uint16_t sels[] = { 0, LDT_SEL, TSS_SEL, KERNEL_DS };
			f = try_reg_write(lldt_fn, rnd() % 5 ? sels[rnd() % 4] : (uint16_t)rnd(), &fi);
			break;
		}
		case 7: {
			static const uint16_t sels[] = { TSS_SEL, TSS2_SEL, LDT_SEL, 0 };
			f = try_reg_write(ltr_fn, rnd() % 5 ? sels[rnd() % 4] : (uint16_t)rnd(), &fi);
			break;
		}
		default: {
			uint64_t k = rnd() % NFUZZ_MSRS;
			wrmsr_index = fuzz_msrs[k];
			f = try_reg_write(wrmsr_fn, fuzz_reg_value(msr[k]), &fi);
			break;
		}
		}
		attempts++;
		faults += (uint64_t)f;
		/* What VTL1 allowed: pinned values must hold; unpinned changes are put back. */
		uint64_t now = read_cr0();
		if ((now ^ cr0) & CR0_PINNED)
			violation("CR0", cr0, now);
		if (now != cr0) {
			restored++;
			restore_faults += (uint64_t)try_reg_write(priv_write_cr0, cr0, &fi);
		}
		now = read_cr4();
		if ((now ^ cr4) & CR4_PINNED)
			violation("CR4", cr4, now);
		if (now != cr4) {
			restored++;
			restore_faults += (uint64_t)try_reg_write(priv_write_cr4, cr4, &fi);
		}
		now = read_cr3();
		if ((now & PTE_ADDR) != (cr3 & PTE_ADDR))
			violation("CR3", cr3, now);
		if (now != cr3) {
			restored++;
			restore_faults += (uint64_t)try_reg_write(priv_write_cr3, cr3, &fi);
		}
		struct desc_ptr dp;
		sgdt(&dp);
		if (dp.base != gdtr.base || dp.limit != gdtr.limit)
			violation("GDTR", gdtr.base, dp.base);
		sidt(&dp);
		if (dp.base != idtr.base || dp.limit != idtr.limit)
			violation("IDTR", idtr.base, dp.base);
		if (read_ldtr() != ldtr)
			violation("LDTR", ldtr, read_ldtr());
		if (read_tr() != tr)
			violation("TR", tr, read_tr());
		if (kind >= 8) {
			for (uint64_t k = 0; k < NFUZZ_MSRS; k++) {
				now = rdmsr(fuzz_msrs[k]);
				if (now == msr[k])
					continue;
				if (k == 0 || boot_over) {
					violation(fuzz_msr_names[k], msr[k], now);
				} else {        /* before END_OF_BOOT a valid syscall MSR may change */
					restored++;
					wrmsr_index = fuzz_msrs[k];
					restore_faults += (uint64_t)try_reg_write(wrmsr_fn, msr[k], &fi);
				}
			}
		}
	}
	report_value("attempts", attempts);
	report_value("faults", faults);
	report_value("allowed", attempts - faults);
	report_value("restored", restored);
	report_value("restore_faults", restore_faults);
	report_value("violations", fuzz_violations);
	printf("fuzz: %lu register writes, %lu refused (#GP), %lu allowed, %lu unpinned changes put back "
	       "(%lu of those refused), %lu violations\n", attempts, faults, attempts - faults, restored,
	       restore_faults, fuzz_violations);
	if (fuzz_violations)
		fail(name, "a pinned register changed");
	if (restore_faults)
		fail(name, "an allowed change could not be put back");
	echo_still_works(name);
	pass(name);
}

/* ---- the cost of a register write VTL1 allows ---- */
SCENARIO(sc_bench_cr, "bench-cr-write",
	 "N (param, default 2000) MOV to CR3 of the locked root, each a register intercept VTL1 allows")
{
	const char *name = "bench-cr-write";
	harden(name, 1);
	/* Without register pinning these are plain CR3 loads: VTL1 says which (VALUE
	 * register_pinning at the lock), and so does this VALUE. */
	report_value("register_pinning", register_pinning);
	uint64_t n = boot_info->param ? boot_info->param : 2000;
	uint64_t batches = n / BENCH_BATCH ? n / BENCH_BATCH : 1;
	if (batches > BENCH_MAX_STAMPS - 1)
		batches = BENCH_MAX_STAMPS - 1;
	uint64_t cr3 = read_cr3();
	for (uint64_t b = 0; b < batches; b++) {
		stamps[b] = rdtsc();
		for (int i = 0; i < BENCH_BATCH; i++)
			priv_write_cr3(cr3);
	}
	stamps[batches] = rdtsc();
	if (read_cr3() != cr3)
		fail(name, "CR3 changed");
	/* STAMPS "cr_write": value[0] = CR3 writes between two stamps */
	uint64_t st = report_stamps("cr_write", stamps, batches + 1, BENCH_BATCH);
	printf("%lu MOV to CR3 (%s) in %lu TSC ticks (report: %s)\n", batches * BENCH_BATCH,
	       register_pinning ? "each judged by VTL1" : "not intercepted: no register pinning",
	       stamps[batches] - stamps[0], vtl_status_name(st));
	pass(name);
}

/* ---- the lock's scan, seen from VTL0: a register write outside the section ---- */
static uint8_t stray_pages[2][4096] __attribute__((aligned(4096)));

SCENARIO(sc_stray, "lock-refuses-stray-cr-write",
	 "MOV to CR0 across two executable pages outside the privileged section: VTL1 refuses the lock")
{
	const char *name = "lock-refuses-stray-cr-write";
	require_vtl1(name);
	harden_protect(name);
	/* Boot maps two adjacent pages executable (r-x for VTL1: W^X holds) whose bytes
	 * spell 0F | 22 C0 (mov %rax, %cr0) across the page end. */
	uint64_t a = (uint64_t)stray_pages[0], b = (uint64_t)stray_pages[1];
	static const uint8_t stray[] = { 0x0F, 0x22, 0xC0, 0xC3 };   /* data: never executable */
	memcpy(&stray_pages[0][4095], stray, 1);
	memcpy(&stray_pages[1][0], stray + 1, 3);
	must(name, "protect_stray_rx", VTL_CALL_PROTECT, "two pages r-x", prot(a, 2, VTL_MEM_NW, 0));
	*pte_for(a) &= ~PTE_NX;
	*pte_for(b) &= ~PTE_NX;
	invlpg(a);
	invlpg(b);
	report_value("stray_va", a + 4095);
	uint64_t ps = (uint64_t)_priv_start, pinning = 0;
	expect_status(name, "lock_with_stray", VTL_CALL_LOCK_PAGE_TABLES, "lock with a stray MOV to CR0",
		      vtl_call(VTL_CALL_LOCK_PAGE_TABLES, ps, PAGES(ps, _priv_end), &pinning), VTL_E_POLICY);
	/* Nothing was locked: the pages can still be taken back, and the lock then succeeds. */
	*pte_for(a) |= PTE_NX;
	*pte_for(b) |= PTE_NX;
	invlpg(a);
	invlpg(b);
	must(name, "protect_stray_rw", VTL_CALL_PROTECT, "the two pages rw- again", prot(a, 2, VTL_MEM_NX, 0));
	harden_lock(name, 1);
	echo_still_works(name);
	pass(name);
}

/* ---- what runs while the privileged section is mapped, and what pinned descriptor-table
 * registers load (issue 14): gates, IST/RSP0 stacks and tables into the section, the
 * GDT, IDT and TSS rewritten after the lock or behind a pinned selector before it ---- */
struct gate64 {
	uint16_t off_lo, sel;
	uint8_t ist, type;
	uint16_t off_mid;
	uint32_t off_hi, zero;
};
struct poke { volatile uint64_t *at; uint64_t value; };
static void poke_fn(void *p) { struct poke *k = p; *k->at = k->value; }
static void lgdt_raw(uint64_t p) { priv_lgdt((const struct desc_ptr *)p); }

static struct gate64 *idt_now(void) { struct desc_ptr d; sidt(&d); return (struct gate64 *)d.base; }
static uint64_t *gdt_now(void) { struct desc_ptr d; sgdt(&d); return (uint64_t *)d.base; }
static uint64_t desc_base(const uint64_t *d)
{
	return ((d[0] >> 16) & 0xFFFFFF) | ((d[0] >> 56) & 0xFF) << 24 | (d[1] & 0xFFFFFFFFULL) << 32;
}
static uint64_t desc_limit(const uint64_t *d) { return (d[0] & 0xFFFF) | ((d[0] >> 48) & 0xF) << 16; }
static uint64_t with_base(uint64_t d0, uint64_t base)
{
	return (d0 & ~0xFF0000FFFFFF0000ULL) | (base & 0xFFFFFF) << 16 | ((base >> 24) & 0xFF) << 56;
}
static uint64_t gate_lo(struct gate64 g, uint64_t handler)
{
	g.off_lo = (uint16_t)handler;
	g.off_mid = (uint16_t)(handler >> 16);
	uint64_t lo;
	memcpy(&lo, &g, 8);
	return lo;
}
/* A byte of the section that is a RET (priv_write_cr0 is `mov %rdi,%cr0; ret`). */
static uint64_t section_ret(void) { return (uint64_t)priv_write_cr0 + 3; }

/* Write `value` at `at` (TARGET `key` first): it must #PF (W) and change nothing. */
static void poke_refused(const char *name, const char *key, const char *what, volatile uint64_t *at,
			 uint64_t value)
{
	uint64_t old = *at;
	report_target(key, (uint64_t)at, 8, old);
	printf("ATTACK %s: %#lx at %#lx -> %#lx\n", what, old, (uint64_t)at, value);
	struct poke k = { at, value };
	struct fault_info fi;
	int faulted = try_run(poke_fn, &k, &fi);
	if (*at != old)
		attack_succeeded(name, "the write landed", *at);
	expect_fault(name, key, what, faulted, &fi, 14);
}

/* A RET in the section whose return address is not canonical: the step raises #GP. */
static void step_gp_fn(void *root)
{
	asm volatile("movq %0, %%rdi\n\t"
		     "movabs $0x8000000000000000, %%rax\n\t"
		     "pushq %%rax\n\t"
		     "jmp *%1" :: "r"(root), "r"(section_ret()) : "rax", "rdi", "memory");
}

SCENARIO(sc_gate_section, "idt-gate-into-section",
	 "attack: point the #GP gate at the section's MOV to CR3, then fault in a single step there")
{
	const char *name = "idt-gate-into-section";
	harden(name, 0);                 /* before END_OF_BOOT: ro_after_init still writable */
	volatile uint64_t *g13 = (volatile uint64_t *)&idt_now()[13];
	uint64_t cr3 = read_cr3(), root = own_root(name, 0);
	plant_marker_code(data_page, EXEC_MARK);
	report_exec("data_page", (uint64_t)data_page, (uint64_t)data_page, (uint64_t)&exec_marker, EXEC_MARK);
	report_register("cr3", VTL_REG_CR3, cr3, 0);
	poke_refused(name, "idt_gate_13", "IDT gate 13 -> priv_write_cr3", g13,
		     gate_lo(*(struct gate64 *)g13, (uint64_t)priv_write_cr3));
	/* Whatever the gate says: a #GP inside a step, RDI = the attacker's root. */
	struct fault_info fi;
	int faulted = try_run(step_gp_fn, (void *)root, &fi);
	if (read_cr3() != cr3) {
		struct fault_info ran;
		try_run(call_fn, data_page, &ran);
		attack_succeeded(name, "CR3 loaded through a gate into the section", read_cr3());
	}
	expect_fault(name, "step_gp", "RET to a non-canonical address in the section", faulted, &fi, 13);
	echo_still_works(name);
	pass(name);
}

/* The lock must be refused while `why`; then `undo` and the lock must succeed. */
static void lock_refused(const char *name, const char *key)
{
	uint64_t ps = (uint64_t)_priv_start, pinning = 0;
	uint64_t st = vtl_call(VTL_CALL_LOCK_PAGE_TABLES, ps, PAGES(ps, _priv_end), &pinning);
	report_status(key, VTL_CALL_LOCK_PAGE_TABLES, st);
	printf("lock -> %s\n", vtl_status_name(st));
	if (st == VTL_OK)
		attack_succeeded(name, "VTL1 locked with a descriptor table leading into the section", st);
}

SCENARIO(sc_gate_lock, "idt-gate-into-section-at-lock",
	 "attack: IDT gates into the privileged section when VTL1 locks (the lock is refused)")
{
	const char *name = "idt-gate-into-section-at-lock";
	require_vtl1(name);
	harden_protect(name);
	struct gate64 *idt = idt_now();
	report_register("cr3", VTL_REG_CR3, read_cr3(), 0);
	uint64_t saved[2];
	memcpy(saved, &idt[13], 16);
	uint64_t lo = gate_lo(idt[13], (uint64_t)priv_write_cr3);
	memcpy(&idt[13], &lo, 8);
	lock_refused(name, "lock_gate_in_section");
	memcpy(&idt[13], saved, 16);
	/* A handler that starts before the section and runs into it counts too. */
	lo = gate_lo(idt[6], (uint64_t)_priv_start - 4);
	memcpy(saved, &idt[6], 16);
	memcpy(&idt[6], &lo, 8);
	lock_refused(name, "lock_gate_into_section_end");
	memcpy(&idt[6], saved, 16);
	harden_lock(name, 1);
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_ist_lock, "ist-into-section-at-lock",
	 "attack: an IST or RSP0 stack inside the privileged section when VTL1 locks (refused)")
{
	const char *name = "ist-into-section-at-lock";
	require_vtl1(name);
	harden_protect(name);
	uint64_t *tss = (uint64_t *)desc_base(&gdt_now()[TSS_SEL / 8]);
	volatile uint64_t *ist1 = (volatile uint64_t *)((uint8_t *)tss + 0x24);
	volatile uint64_t *rsp0 = (volatile uint64_t *)((uint8_t *)tss + 0x04);
	uint64_t top = (uint64_t)_priv_start + 0x800, old_ist = *ist1, old_rsp0 = *rsp0;
	report_register("tr_base", VTL_REG_TR_BASE, (uint64_t)tss, 0x67);
	*ist1 = top;                      /* the #DF gate's IST1 */
	lock_refused(name, "lock_ist_in_section");
	*ist1 = old_ist;
	*rsp0 = top;
	lock_refused(name, "lock_rsp0_in_section");
	*rsp0 = old_rsp0;
	harden_lock(name, 1);
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_table_base_section, "table-base-in-section",
	 "attack: IDTR, then GDTR, based inside the privileged section when VTL1 locks (refused)")
{
	const char *name = "table-base-in-section";
	require_vtl1(name);
	harden_protect(name);
	static struct desc_ptr old_idt, old_gdt, evil;
	sidt(&old_idt);
	sgdt(&old_gdt);
	report_register("idtr", VTL_REG_IDTR, old_idt.base, old_idt.limit);
	report_register("gdtr", VTL_REG_GDTR, old_gdt.base, old_gdt.limit);
	evil.limit = old_idt.limit;
	evil.base = (uint64_t)_priv_start;
	priv_lidt(&evil);                 /* before the lock: VTL0 is still trusted */
	lock_refused(name, "lock_idt_in_section");
	priv_lidt(&old_idt);
	evil.limit = old_gdt.limit;
	priv_lgdt(&evil);                 /* no segment is reloaded until the GDT is back */
	lock_refused(name, "lock_gdt_in_section");
	priv_lgdt(&old_gdt);
	harden_lock(name, 1);
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_tss_rewrite, "tss-rewrite-after-lock",
	 "attack: rewrite RSP0 and IST1 of the loaded TSS after the lock (TSS read-only from the lock)")
{
	const char *name = "tss-rewrite-after-lock";
	harden(name, 0);
	uint8_t *tss = (uint8_t *)desc_base(&gdt_now()[TSS_SEL / 8]);
	poke_refused(name, "tss_rsp0", "TSS RSP0", (volatile uint64_t *)(tss + 0x04), (uint64_t)data_page + 4096);
	poke_refused(name, "tss_ist1", "TSS IST1", (volatile uint64_t *)(tss + 0x24), (uint64_t)data_page + 4096);
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_gdt_rewrite, "gdt-rewrite-after-lock",
	 "attack: rewrite the GDT's TSS and LDT descriptors after the lock, then LGDT the pinned GDTR")
{
	const char *name = "gdt-rewrite-after-lock";
	harden(name, 0);
	uint64_t *gdt = gdt_now();
	poke_refused(name, "gdt_tss_desc", "GDT TSS descriptor -> the spare TSS", (volatile uint64_t *)&gdt[TSS_SEL / 8],
		     with_base(gdt[TSS_SEL / 8], desc_base(&gdt[TSS2_SEL / 8])) & ~(2ULL << 40));
	poke_refused(name, "gdt_ldt_desc", "GDT LDT descriptor -> a data page", (volatile uint64_t *)&gdt[LDT_SEL / 8],
		     with_base(gdt[LDT_SEL / 8], (uint64_t)data_page));
	/* The pinned GDTR again: allowed, and it loads the unchanged table. */
	static struct desc_ptr g;
	sgdt(&g);
	report_register("gdtr", VTL_REG_GDTR, g.base, g.limit);
	struct fault_info fi;
	if (try_reg_write(lgdt_raw, (uint64_t)&g, &fi))
		fail(name, "LGDT of the pinned GDTR refused");
	echo_still_works(name);
	pass(name);
}

static uint64_t evil_ldt[2] __attribute__((aligned(16))) = { 0, 0x00CFF3000000FFFFULL };

SCENARIO(sc_lldt_behind, "lldt-repointed-before-lock",
	 "attack: load the LDT, repoint its GDT descriptor before the lock, LLDT the pinned selector after")
{
	const char *name = "lldt-repointed-before-lock";
	require_vtl1(name);
	harden_protect(name);
	uint64_t *d = &gdt_now()[LDT_SEL / 8];
	uint64_t base = desc_base(d), limit = desc_limit(d);
	priv_lldt(LDT_SEL);               /* before the lock: LDTR = 0x38, base = the real LDT */
	d[0] = with_base(d[0], (uint64_t)evil_ldt);
	d[1] = (uint64_t)evil_ldt >> 32;
	harden_lock(name, 1);
	report_register("ldtr_base", VTL_REG_LDTR_BASE, base, limit);
	printf("ATTACK lldt %#x: descriptor now %#lx, pinned base %#lx\n", LDT_SEL, (uint64_t)evil_ldt, base);
	struct fault_info fi;
	int faulted = try_reg_write(lldt_fn, LDT_SEL, &fi);
	expect_fault(name, "lldt", "LLDT of the pinned selector, repointed descriptor", faulted, &fi, 13);
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_ltr_behind, "ltr-repointed-before-lock",
	 "attack: repoint the loaded TSS's GDT descriptor (available again) before the lock, LTR after")
{
	const char *name = "ltr-repointed-before-lock";
	require_vtl1(name);
	harden_protect(name);
	uint64_t *gdt = gdt_now(), *d = &gdt[TSS_SEL / 8];
	uint64_t base = desc_base(d), limit = desc_limit(d), evil = desc_base(&gdt[TSS2_SEL / 8]);
	d[0] = with_base(d[0], evil) & ~(2ULL << 40);     /* busy -> available, the spare TSS */
	d[1] = evil >> 32;
	harden_lock(name, 1);
	report_register("tr_base", VTL_REG_TR_BASE, base, limit);
	printf("ATTACK ltr %#x: descriptor now %#lx (available), pinned base %#lx\n", TSS_SEL, evil, base);
	struct fault_info fi;
	int faulted = try_reg_write(ltr_fn, TSS_SEL, &fi);
	expect_fault(name, "ltr", "LTR of the pinned selector, repointed descriptor", faulted, &fi, 13);
	echo_still_works(name);
	pass(name);
}

SCENARIO(sc_step_int3, "section-unsteppable",
	 "attack: run the section's INT3 bytes (not steppable here): #UD, the partition runs on")
{
	const char *name = "section-unsteppable";
	harden(name, 1);
	report_register("cr3", VTL_REG_CR3, read_cr3(), 0);
	struct fault_info fi;
	int faulted = try_run(call_fn, _priv_start, &fi);
	expect_fault(name, "section_int3", "INT3 in the privileged section", faulted, &fi, 6);
	echo_still_works(name);
	pass(name);
}
