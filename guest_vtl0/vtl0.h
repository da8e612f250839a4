#ifndef VTL0_H
#define VTL0_H
#include "lib.h"
#include "probe.h"

extern struct vtl_boot_info *boot_info;
extern uint64_t cr4_boot_set, xcr0_boot;   /* main.c: what boot enabled */
void pass(const char *name) __attribute__((noreturn));
void fail(const char *name, const char *why) __attribute__((noreturn));

/* A scenario: listed in .vtl_scenarios so the VMM can list and select it. */
#define SCENARIO(id, name_, desc_)                                                  \
	static void id(void);                                                       \
	static const struct vtl_scenario_desc id##_desc                              \
		__attribute__((section(".vtl_scenarios"), used, aligned(8))) = {       \
		.name = name_, .description = desc_, .entry = (uint64_t)id };          \
	static void id(void)

#endif
