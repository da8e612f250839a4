/* kexec in Heki mode (docs/heki-mode.md, "kexec"): what Linux does under in-KVM Heki,
 * which has no kexec flow.  machine_kexec -> relocate_kernel is a jump inside the guest:
 * the old kernel places the next kernel's segments (elfload.c), builds the next boot info
 * as kexec builds boot_params (a copy of its own with the next command line), maps the
 * new text executable, turns interrupts off and jumps to the entry with RDI = that boot
 * info.  Nothing validates the image, and the host never sees the jump, so KVM keeps what
 * the old kernel asked for in struct kvm (the patches "don't handle VM reboot, kexec, nor
 * hibernate yet"): the next kernel reports what it meets. */
#include "vtl0.h"

#define PAGE_UP(x) (((x) + 0xFFFULL) & ~0xFFFULL)
#define PTE_NX (UINT64_C(1) << 63)
#define NEG(e) ((uint64_t)-(int64_t)(e))
/* A word of every kernel's rodata; kexec-deny in Heki mode changes it in the placed copy,
 * a change any validator would refuse, and the next kernel still runs to the end. */
#define KEXEC_IMAGE_WORD     0x4B45584543494D47ULL
#define KEXEC_IMAGE_TAMPERED 0x54414D5045524544ULL
const uint64_t kexec_image_word __attribute__((aligned(8), used)) = KEXEC_IMAGE_WORD;

static int overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

/* The next kernel's boot info: this kernel's copied, with the next scenario and param,
 * boot_count + 1 and the new image's extent.  In the first page of this kernel's free
 * RAM (RW- in its page list: not protected), clear of the new image and the staged file. */
static struct vtl_boot_info *next_boot_info(const char *name, const struct vtl_kexec_request *req)
{
	const struct vtl_kexec_segment *last = &req->seg[req->nr_segments - 1];
	uint64_t start = req->seg[0].paddr, end = last->paddr + PAGE_UP(last->memsz);
	uint64_t gpa = PAGE_UP(boot_info->free_start);
	if (gpa + 4096 > boot_info->free_end || overlaps(gpa, 4096, start, end - start) ||
	    overlaps(gpa, 4096, boot_info->staged_gpa, boot_info->staged_size))
		fail(name, "no free page for the next kernel's boot info");
	struct vtl_boot_info *bi = (struct vtl_boot_info *)gpa;
	memcpy(bi, boot_info, sizeof(*bi));
	memcpy(bi->scenario, req->scenario, sizeof(bi->scenario));
	bi->param = req->param;
	bi->boot_count = boot_info->boot_count + 1;
	bi->image_start = start;               /* >= VTL0_IMAGE_MIN: elfload.c checked */
	bi->image_end = end;
	bi->free_start = end;
	return bi;
}

/* This kernel's tables map everything but its own text NX (heki_harden); the next
 * kernel runs on them until its paging_init, so its executable segments lose NX, as
 * kexec's identity map for relocate_kernel is executable. */
static void map_executable(const struct vtl_kexec_request *req)
{
	for (uint32_t i = 0; i < req->nr_segments; i++) {
		const struct vtl_kexec_segment *s = &req->seg[i];
		if (!(s->flags & VTL_SEG_X))
			continue;
		for (uint64_t va = s->paddr; va < s->paddr + PAGE_UP(s->memsz); va += 4096) {
			uint64_t *pte = pte_for(va);       /* segments lie below VTL1's base: 4 KiB pages */
			if (pte) {
				*pte &= ~PTE_NX;
				invlpg(va);
			}
		}
	}
}

void heki_kexec_jump(const char *name, const struct vtl_kexec_request *req)
{
	struct vtl_boot_info *bi = next_boot_info(name, req);
	map_executable(req);
	report_value("next_boot_info", (uint64_t)bi);
	report_value("kexec_jump", 1);          /* the last word of the old kernel */
	printf("in-guest kexec to %#lx, boot info at %#lx: nothing validates it, the host sees nothing\n",
	       req->entry, (uint64_t)bi);
	asm volatile("cli\n\tjmp *%0" : : "r"(req->entry), "D"(bi) : "memory");
	__builtin_unreachable();
}

/* kexec-deny under Heki: change the placed image (VALUE tampered_gpa; the VMM compares the
 * segments with the staged file itself). */
void heki_kexec_tamper(const char *name, const struct vtl_kexec_request *req)
{
	uint64_t a = kexec_staged_symbol("kexec_image_word");
	int placed = 0;
	for (uint32_t i = 0; i < req->nr_segments; i++)
		placed |= a >= req->seg[i].paddr && a + 8 <= req->seg[i].paddr + req->seg[i].filesz;
	report_value("tampered_gpa", a);
	if (!placed || (a & 7))
		fail(name, "the staged image has no kexec_image_word in a placed segment");
	*(volatile uint64_t *)a = KEXEC_IMAGE_TAMPERED;
	printf("placed image changed at %#lx: no validation will notice\n", a);
}

/* The next kernel, started by the in-guest jump (param = the old kernel's text): what
 * the host still holds for the old kernel, and its own late init refused whole. */
void heki_after_kexec(const char *name)
{
	report_value("boot_count", boot_info->boot_count);
	if (boot_info->boot_count != 1)
		fail(name, "boot_count is not 1");
	report_value("image_word", *(const volatile uint64_t *)&kexec_image_word);
	/* The old kernel's text: R-X immutable in struct kvm, whoever runs now. */
	attack_write(name, "old_kernel_text", "the old kernel's text", boot_info->param);
	/* CR0.WP: pinned VM-wide by the old kernel, never unpinned. */
	uint64_t old = read_cr0();
	report_register("cr0", VTL_REG_CR0, old, 0);
	struct fault_info fi;
	int faulted = try_reg_write(priv_write_cr0, old & ~CR0_WP, &fi);
	expect_register_kept(name, "write_cr0", "mov to CR0 clearing WP", faulted, &fi, old, read_cr0());
	/* Its own heki_late_init: the pins are there already (OR-ed, 0), the page list is
	 * refused whole because it names the old kernel's immutable pages. */
	paging_set_nx_except((uint64_t)_text_start, (uint64_t)_text_end);
	heki_lock_crs(name);
	uint64_t st = heki_protect_kernel(1);
	report_status("heki_protect", KVM_HC_PROTECT_MEMORY, st);
	printf("own page list -> %ld: this kernel's text stays writable\n", (int64_t)st);
	if (st != NEG(KVM_EPERM))
		fail(name, "the page list was not refused -EPERM");
	heki_still_served(name);
	pass(name);
}
