/* VTL1's stacks, one per VP (guest_vtl1/entry.S, main.c): VTL1 on two VPs may run at the
 * same time, each on the stack of its VP index.  Each is VTL1_STACK_SIZE bytes, aligned
 * to its size, so that a VP finds its own index from RSP alone (this_vp(), vtl1.h), as
 * Linux once found its thread_info from the stack pointer. */
#ifndef VTL1_STACK_H
#define VTL1_STACK_H
#define VTL1_STACK_SHIFT 15
#define VTL1_STACK_SIZE (1 << VTL1_STACK_SHIFT)   /* 32 KiB */
#endif
