/*
 * C floor for `vtl bench`: alternate KVM_RUN between two VMs whose guests only do
 * port-I/O exits.  Same guests, same 64-bit boot state and same RDTSC-per-batch
 * timing as vmm/floor.py; prints one JSON object (stamps, tsc_khz, pairs, wall_s).
 * Usage: floor_c PAIRS
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define BATCH 100
#define CODE_GPA 0x10000
#define STAMPS_GPA 0x100000
#define MEM (4 << 20)

/* Keep byte-for-byte equal to GUEST_A / GUEST_B in vmm/floor.py (tests/test_floor.py checks). */
static const uint8_t GUEST_A[] = {
	0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0x48, 0x89, 0x03, 0x48, 0x83, 0xc3, 0x08,
	0x4d, 0x85, 0xe4, 0x74, 0x12, 0x41, 0xbd, 0x64, 0x00, 0x00, 0x00, 0xe6, 0xf0, 0x41, 0xff, 0xcd,
	0x75, 0xf9, 0x49, 0xff, 0xcc, 0xeb, 0xd9, 0xe7, 0xf4, 0xf4,
};
static const uint8_t GUEST_B[] = { 0xe6, 0xf1, 0xeb, 0xfc };

struct guest {
	int vm, vcpu;
	uint8_t *mem;
	struct kvm_run *run;
};

static void die(const char *what)
{
	fprintf(stderr, "floor_c: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void boot(int kvm, struct guest *g, const uint8_t *code, size_t len, uint64_t rbx, uint64_t r12)
{
	if ((g->vm = ioctl(kvm, KVM_CREATE_VM, 0)) < 0)
		die("KVM_CREATE_VM");
	ioctl(g->vm, KVM_SET_TSS_ADDR, 0xfffbd000);
	g->mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (g->mem == MAP_FAILED)
		die("mmap guest memory");
	struct kvm_userspace_memory_region r = { .slot = 0, .guest_phys_addr = 0, .memory_size = MEM,
						 .userspace_addr = (uint64_t)g->mem };
	if (ioctl(g->vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	/* identity map of the first GiB with 2 MiB pages: PML4 0x2000, PDPT 0x3000, PD 0x4000 */
	uint64_t *pml4 = (uint64_t *)(g->mem + 0x2000), *pdpt = (uint64_t *)(g->mem + 0x3000),
		 *pd = (uint64_t *)(g->mem + 0x4000), *gdt = (uint64_t *)(g->mem + 0x9000);
	pml4[0] = 0x3000 | 3;
	pdpt[0] = 0x4000 | 3;
	for (int i = 0; i < 512; i++)
		pd[i] = ((uint64_t)i << 21) | 0x83 | 0x60;
	gdt[1] = 0x00AF9B000000FFFFULL;
	gdt[2] = 0x00CF93000000FFFFULL;
	memcpy(g->mem + CODE_GPA, code, len);

	if ((g->vcpu = ioctl(g->vm, KVM_CREATE_VCPU, 0)) < 0)
		die("KVM_CREATE_VCPU");
	struct { struct kvm_cpuid2 h; struct kvm_cpuid_entry2 e[256]; } cpuid = { .h.nent = 256 };
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0 || ioctl(g->vcpu, KVM_SET_CPUID2, &cpuid) < 0)
		die("CPUID");
	int sz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	g->run = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED, g->vcpu, 0);
	if (g->run == MAP_FAILED)
		die("mmap kvm_run");
	/* the same sync-regs setting as the Python VMM's vCPUs */
	g->run->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;

	struct kvm_sregs s;
	if (ioctl(g->vcpu, KVM_GET_SREGS, &s) < 0)
		die("KVM_GET_SREGS");
	struct kvm_segment cs = { .base = 0, .limit = 0xffffffff, .selector = 8, .type = 0xb, .present = 1,
				  .dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1 };
	struct kvm_segment ds = cs;
	ds.selector = 0x10, ds.type = 3, ds.l = 0, ds.db = 1;
	s.cs = cs, s.ds = s.es = s.fs = s.gs = s.ss = ds;
	s.gdt.base = 0x9000, s.gdt.limit = 23;
	s.cr0 = 0x80010033, s.cr3 = 0x2000, s.cr4 = 0x620, s.efer = 0xd01;
	if (ioctl(g->vcpu, KVM_SET_SREGS, &s) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = CODE_GPA, .rsp = 0x9000, .rflags = 2, .rbx = rbx, .r12 = r12 };
	if (ioctl(g->vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
}

int main(int argc, char **argv)
{
	long pairs = argc > 1 ? atol(argv[1]) : 100000;
	long batches = pairs / BATCH > 0 ? pairs / BATCH : 1;
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	struct guest a, b;
	boot(kvm, &a, GUEST_A, sizeof(GUEST_A), STAMPS_GPA, batches);
	boot(kvm, &b, GUEST_B, sizeof(GUEST_B), 0, 0);

	long n = 0;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		ioctl(a.vcpu, KVM_RUN, 0);
		if (a.run->exit_reason != KVM_EXIT_IO || a.run->io.port != 0xf0)
			break;
		ioctl(b.vcpu, KVM_RUN, 0);
		if (b.run->exit_reason != KVM_EXIT_IO) {
			fprintf(stderr, "floor_c: guest B stopped with exit %u\n", b.run->exit_reason);
			return 1;
		}
		n++;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (a.run->exit_reason != KVM_EXIT_IO || a.run->io.port != 0xf4) {
		fprintf(stderr, "floor_c: guest A stopped with exit %u\n", a.run->exit_reason);
		return 1;
	}
	int khz = ioctl(a.vcpu, KVM_GET_TSC_KHZ, 0);
	if (khz <= 0)
		die("KVM_GET_TSC_KHZ");
	const uint64_t *stamps = (const uint64_t *)(a.mem + STAMPS_GPA);
	printf("{\"pairs\": %ld, \"batch\": %d, \"tsc_khz\": %d, \"wall_s\": %.9f, \"stamps\": [", n, BATCH, khz,
	       (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
	for (long i = 0; i <= batches; i++)
		printf("%s%llu", i ? ", " : "", (unsigned long long)stamps[i]);
	printf("]}\n");
	return 0;
}
