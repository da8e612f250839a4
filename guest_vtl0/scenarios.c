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

/* STATUS "enable_vtl1": value[0] = VTL_HC_ENABLE_VTL1, value[1] = the status. */
static uint64_t enable_vtl1(void)
{
	uint64_t st = hypercall(VTL_HC_ENABLE_VTL1, 0, 0, 0, NULL);
	report_status("enable_vtl1", VTL_HC_ENABLE_VTL1, st);
	printf("enable VTL1: %s\n", vtl_status_name(st));
	return st;
}

static void require_vtl1(const char *name)
{
	if (enable_vtl1() != VTL_OK)
		fail(name, "VTL1 could not be enabled");
}

/* After a refusal: VTL1 and the VMM still serve VTL calls.
 * STATUS "echo" (VTL_CALL_ECHO) and VALUE "echo_rcx" = RCX after the call (ECHO_ARG + 1). */
static void echo_still_works(const char *name)
{
	uint64_t rcx = 0;
	uint64_t st = vtl_call(VTL_CALL_ECHO, ECHO_ARG, 0, &rcx);
	report_status("echo", VTL_CALL_ECHO, st);
	report_value("echo_rcx", rcx);
	if (st != VTL_OK || rcx != ECHO_ARG + 1)
		fail(name, "VTL_CALL_ECHO failed after the refusal");
	printf("VTL_CALL_ECHO still served (RCX %#x -> %#lx)\n", ECHO_ARG, rcx);
}

/* STATUS `key`: value[0] = the call or hypercall code, value[1] = the status received. */
static void expect_status(const char *name, const char *key, uint64_t code, const char *what, uint64_t got,
			  uint64_t want)
{
	report_status(key, code, got);
	printf("%s -> %s\n", what, vtl_status_name(got));
	if (got != want)
		fail(name, "unexpected status");
}

/* FAULT `key` (vector, error code, RIP, CR2) when the attempt faulted. */
static void expect_fault(const char *name, const char *key, const char *what, int ok, struct fault_info *fi,
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
	uint64_t st = enable_vtl1();
	if (st == VTL_E_DISABLED) {
		printf("running without VTL1\n");
		pass("boot");
	}
	if (st != VTL_OK)
		fail("boot", "enable failed");
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

static const uint64_t rodata_target __attribute__((aligned(8), used)) = 0x0123456789ABCDEFULL;
static uint64_t ro_after_init_var __attribute__((section(".data..ro_after_init"), aligned(8))) = 0x1111;
static uint8_t data_page[4096] __attribute__((aligned(4096)));
static uint64_t audit_page[512] __attribute__((aligned(4096)));

#define EFER_NXE (1ULL << 11)
#define MSR_EFER 0xC0000080
#define PAGES(a, b) (((uint64_t)(b) - (uint64_t)(a)) >> 12)

static uint64_t prot(uint64_t gpa, uint64_t pages, uint64_t attrs, uint64_t flags)
{
	return vtl_call4(VTL_CALL_PROTECT, gpa, pages, attrs, flags, NULL);
}

static uint64_t protection_of(uint64_t gpa)
{
	uint64_t rcx = 0;
	vtl_call4(VTL_CALL_GET_PROTECTION, gpa, 0, 0, 0, &rcx);
	return rcx;
}

/* STATUS `key` (value[0] = code), then the scenario fails unless it is VTL_OK. */
static void must(const char *name, const char *key, uint64_t code, const char *what, uint64_t st)
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
static void harden_protect(const char *name)
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
 * pins the registers; RCX = the privileged section, RDI = its pages. */
static void harden_lock(const char *name, int end_of_boot)
{
	uint64_t ps = (uint64_t)_priv_start;
	must(name, "lock_page_tables", VTL_CALL_LOCK_PAGE_TABLES, "lock page tables, pin registers",
	     vtl_call(VTL_CALL_LOCK_PAGE_TABLES, ps, PAGES(ps, _priv_end), &register_pinning));
	printf("register pinning %s\n", register_pinning ? "on: the privileged section is VTL1's" :
	       "unavailable on this VMM");
	if (end_of_boot)
		must(name, "end_of_boot", VTL_CALL_END_OF_BOOT, "end of boot",
		     vtl_call(VTL_CALL_END_OF_BOOT, 0, 0, NULL));
}

static void harden(const char *name, int end_of_boot)
{
	require_vtl1(name);
	harden_protect(name);
	harden_lock(name, end_of_boot);
}

static void write_u64_fn(void *p) { *(volatile uint64_t *)p = 0xBADBADBADBADBAD0ULL; }

/* The guest saw its attack work: VALUE "attack_succeeded" (value[0] = what it saw). */
static void __attribute__((noreturn)) attack_succeeded(const char *name, const char *why, uint64_t seen)
{
	report_value("attack_succeeded", seen);
	printf("ATTACK-RESULT succeeded: %s (%#lx)\n", why, seen);
	fail(name, why);
}

/* TARGET `key` (GPA, 8 bytes, old value), then the write must fault with #PF(W) (FAULT
 * `key`) and leave memory as it was. */
static void attack_write(const char *name, const char *key, const char *what, uint64_t target)
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

SCENARIO(sc_w_roai, "write-ro-after-init", "attack: write ro_after_init data after END_OF_BOOT")
{
	harden("write-ro-after-init", 0);
	ro_after_init_var = 0x2222;     /* still boot: allowed */
	uint64_t landed = *(volatile uint64_t *)&ro_after_init_var;
	report_value("ro_after_init_boot_write", landed);
	if (landed != 0x2222)
		fail("write-ro-after-init", "boot-time write to ro_after_init did not land");
	printf("boot-time write to ro_after_init landed (%#lx)\n", landed);
	must("write-ro-after-init", "end_of_boot", VTL_CALL_END_OF_BOOT, "end of boot",
	     vtl_call(VTL_CALL_END_OF_BOOT, 0, 0, NULL));
	attack_write("write-ro-after-init", "ro_after_init", "ro_after_init", (uint64_t)&ro_after_init_var);
	pass("write-ro-after-init");
}

static void call_fn(void *p) { ((void (*)(void))p)(); }

/* Planted code announces itself: it stores a value into exec_marker (which the VMM reads
 * back after the run, through the EXEC report) and returns. */
#define EXEC_MARK 0x45584543554D4521ULL
static volatile uint64_t exec_marker __attribute__((aligned(8)));

/* movabs $value, %rax; movabs %rax, exec_marker; ret.  Returns the length (21). */
static uint64_t plant_marker_code(uint8_t *p, uint64_t value)
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
	plant_marker_code(data_page, EXEC_MARK);
	report_exec("data_page", (uint64_t)data_page, (uint64_t)data_page, (uint64_t)&exec_marker, EXEC_MARK);
	printf("ATTACK exec=%#lx\n", (uint64_t)data_page);
	struct fault_info fi;
	int faulted = try_run(call_fn, data_page, &fi);
	if (!faulted || exec_marker == EXEC_MARK)
		attack_succeeded("exec-data-page", "the data page executed", (uint64_t)data_page);
	expect_fault("exec-data-page", "exec_data_page", "execute data page", faulted, &fi, 14);
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
static uint64_t rng_state;
static uint64_t rnd(void)
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
			st = hypercall(rnd() % 0x200, rnd(), rnd(), rnd(), NULL);
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
