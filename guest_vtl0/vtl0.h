#ifndef VTL0_H
#define VTL0_H
#include "lib.h"
#include "probe.h"

extern struct vtl_boot_info *boot_info;
extern uint64_t cr4_boot_set, xcr0_boot;   /* main.c: what boot enabled */
void pass(const char *name) __attribute__((noreturn));
void fail(const char *name, const char *why) __attribute__((noreturn));

/* scenarios.c: helpers every scenario file uses (what each reports: the comments there). */
uint64_t enable_vtl1(void);
void require_vtl1(const char *name);
void echo_still_works(const char *name);
void expect_status(const char *name, const char *key, uint64_t code, const char *what, uint64_t got,
		   uint64_t want);
void expect_fault(const char *name, const char *key, const char *what, int ok, struct fault_info *fi,
		  int vector);
void must(const char *name, const char *key, uint64_t code, const char *what, uint64_t st);
uint64_t prot(uint64_t gpa, uint64_t pages, uint64_t attrs, uint64_t flags);
uint64_t protection_of(uint64_t gpa);
void harden_protect(const char *name);
void harden_lock(const char *name, int end_of_boot);
void harden(const char *name, int end_of_boot);
/* smp.c: the APs (docs/smp.md) */
struct ap_slot { volatile uint64_t online, fn, arg, done, result; };
extern struct ap_slot ap[];
extern int vtl1_on;             /* scenarios.c: this kernel enabled VTL1 (or it persisted) */
uint64_t smp_boot(const char *name);
uint64_t smp_start(uint64_t vp);
struct vtl_start_vp smp_request(uint64_t vp);
uint64_t smp_start_request(const struct vtl_start_vp *req);
void smp_lock_aps(const char *name, uint64_t skip);
void smp_echo_all(const char *name);
void smp_run_on(uint64_t vp, void (*fn)(uint64_t, uint64_t), uint64_t arg);
void smp_post(uint64_t vp, void (*fn)(uint64_t, uint64_t), uint64_t arg);
void smp_wait(uint64_t vp);
void smp_run_all(void (*fn)(uint64_t, uint64_t), uint64_t arg);
void ipi(uint64_t vp);

/* heki.c: Heki mode (boot_info->flags & VTL_BOOT_F_HEKI): the same hardening through the
 * Heki hypercalls (docs/heki-mode.md). */
int heki_mode(void);
void heki_harden(const char *name, int end_of_boot);
void heki_lock_crs(const char *name);
uint64_t heki_protect_kernel(int end_of_boot);
void heki_end_of_boot(const char *name);
void heki_still_served(const char *name);
void heki_boot(void) __attribute__((noreturn));
/* heki_kexec.c: Linux's kexec under Heki, an in-guest jump the host never sees. */
void heki_kexec_jump(const char *name, const struct vtl_kexec_request *req) __attribute__((noreturn));
void heki_kexec_tamper(const char *name, const struct vtl_kexec_request *req);
void heki_after_kexec(const char *name) __attribute__((noreturn));
void attack_succeeded(const char *name, const char *why, uint64_t seen) __attribute__((noreturn));
void attack_write(const char *name, const char *key, const char *what, uint64_t target);
void write_u64_fn(void *p);
void call_fn(void *p);
void attack_exec(const char *name, const char *target_key, const char *fault_key, const char *what,
		 uint8_t *code, struct fault_info *fi);
#define EXEC_MARK 0x45584543554D4521ULL
extern volatile uint64_t exec_marker;
uint64_t plant_marker_code(uint8_t *p, uint64_t value);
int try_reg_write(void (*fn)(uint64_t), uint64_t value, struct fault_info *fi);
void expect_register_kept(const char *name, const char *key, const char *what, int faulted,
			  struct fault_info *fi, uint64_t old, uint64_t now);
extern uint64_t rng_state;
uint64_t rnd(void);
extern uint8_t data_page[4096];
extern const uint64_t rodata_target;
extern char _text_start[], _text_end[], _priv_start[], _priv_end[], _image_end[];
#define PAGES(a, b) (((uint64_t)(b) - (uint64_t)(a)) >> 12)

/* elfload.c: the staged kexec image (boot_info->staged_*), an untrusted ELF, placed at its
 * physical addresses; NULL on success, else why not. */
const char *kexec_load_staged(struct vtl_kexec_request *req);
uint64_t kexec_staged_symbol(const char *name);   /* its value in the staged file, 0 if none */
/* lifecycle.c: the staged image placed for a kexec to scenario `next` (boot_info.param =
 * param); the request (VTL0 memory) that KEXEC_VALIDATE takes.  Fails the scenario if the
 * staged file is not a kernel this loader places. */
struct vtl_kexec_request *kexec_stage(const char *name, const char *next, uint64_t param);

/* A scenario: listed in .vtl_scenarios so the VMM can list and select it. */
#define SCENARIO(id, name_, desc_)                                                  \
	static void id(void);                                                       \
	static const struct vtl_scenario_desc id##_desc                              \
		__attribute__((section(".vtl_scenarios"), used, aligned(8))) = {       \
		.name = name_, .description = desc_, .entry = (uint64_t)id };          \
	static void id(void)

#endif
