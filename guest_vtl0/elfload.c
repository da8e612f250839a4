/* A small ELF64 loader for kexec: the staged file (boot_info->staged_gpa/size, placed by
 * the VMM as a boot loader places an initrd) is the next kernel.  It is untrusted input
 * even for VTL0 (VTL1 decides whether it may run, by measurement), so every offset and
 * size is checked before use: the loader must not be a way to corrupt the running
 * kernel.  Each PT_LOAD goes to its physical address, which must lie in free VTL0 memory
 * inside the image window, clear of the running kernel and of the staged file itself;
 * the rest of its last page is zeroed (VTL1 refuses unmeasured bytes there). */
#include "vtl0.h"

#define PT_LOAD 1
#define SHT_SYMTAB 2
#define PAGE_UP(x) (((x) + 0xFFFULL) & ~0xFFFULL)

struct elf64_ehdr {
	uint8_t ident[16];
	uint16_t type, machine;
	uint32_t version;
	uint64_t entry, phoff, shoff;
	uint32_t flags;
	uint16_t ehsize, phentsize, phnum, shentsize, shnum, shstrndx;
};

struct elf64_phdr {
	uint32_t type, flags;
	uint64_t offset, vaddr, paddr, filesz, memsz, align;
};

struct elf64_shdr {
	uint32_t name, type;
	uint64_t flags, addr, offset, size;
	uint32_t link, info;
	uint64_t addralign, entsize;
};

struct elf64_sym {
	uint32_t name;
	uint8_t info, other;
	uint16_t shndx;
	uint64_t value, size;
};

/* REP MOVSB / STOSB: this host runs a string instruction's repeats in one go. */
static void copy_fast(uint64_t dst, uint64_t src, uint64_t n)
{
	asm volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
}

static void zero_fast(uint64_t dst, uint64_t n)
{
	asm volatile("rep stosb" : "+D"(dst), "+c"(n) : "a"(0) : "memory");
}

/* [off, off+len) inside a file of `size` bytes?  Overflow-safe. */
static int in_file(uint64_t off, uint64_t len, uint64_t size)
{
	return len <= size && off <= size - len;
}

static int overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

/* The value of symbol `want` in the file's symbol table, 0 if absent. */
static uint64_t elf_symbol(uint64_t f, uint64_t size, const struct elf64_ehdr *eh, const char *want)
{
	if (eh->shentsize != sizeof(struct elf64_shdr) || eh->shnum > 64 ||
	    !in_file(eh->shoff, (uint64_t)eh->shnum * sizeof(struct elf64_shdr), size))
		return 0;
	const struct elf64_shdr *sh = (const struct elf64_shdr *)(f + eh->shoff);
	for (uint32_t i = 0; i < eh->shnum; i++) {
		if (sh[i].type != SHT_SYMTAB || sh[i].entsize != sizeof(struct elf64_sym) || sh[i].link >= eh->shnum)
			continue;
		const struct elf64_shdr *str = &sh[sh[i].link];
		if (!in_file(sh[i].offset, sh[i].size, size) || !in_file(str->offset, str->size, size))
			continue;
		const struct elf64_sym *sym = (const struct elf64_sym *)(f + sh[i].offset);
		const char *names = (const char *)(f + str->offset);
		uint64_t wl = strlen(want);
		for (uint64_t k = 0; k < sh[i].size / sizeof(*sym); k++)
			if (sym[k].name < str->size && str->size - sym[k].name > wl &&
			    memcmp(names + sym[k].name, want, wl + 1) == 0)
				return sym[k].value;
	}
	return 0;
}

/* The headers: an x86-64 ELF64 executable whose program headers lie in the file. */
static const char *check_header(uint64_t f, uint64_t size, const struct elf64_ehdr *eh)
{
	static const uint8_t magic[7] = { 0x7F, 'E', 'L', 'F', 2, 1, 1 };   /* ELF64, LE, v1 */
	if (size < sizeof(*eh) || memcmp((const void *)f, magic, sizeof(magic)) != 0)
		return "not a little-endian ELF64 file";
	if (eh->type != 2 || eh->machine != 62)
		return "not an x86-64 executable";
	if (eh->phentsize != sizeof(struct elf64_phdr) || eh->phnum == 0 || eh->phnum > 32 ||
	    !in_file(eh->phoff, (uint64_t)eh->phnum * sizeof(struct elf64_phdr), size))
		return "bad program headers";
	return NULL;
}

/* One PT_LOAD: in the file, identity-linked, page aligned, after the previous one, in
 * the image window, clear of the running kernel, the staged file and low memory. */
static const char *check_segment(const struct elf64_phdr *ph, uint64_t size, uint64_t prev_end)
{
	uint64_t lo = ph->paddr, len = PAGE_UP(ph->memsz);
	if (!in_file(ph->offset, ph->filesz, size) || ph->filesz > ph->memsz)
		return "a segment runs past the file";
	if (ph->vaddr != ph->paddr || (lo & 0xFFF) || (ph->flags & ~7U))
		return "a segment is not identity-linked and page aligned";
	if (ph->memsz > boot_info->vtl1_base || lo < VTL0_IMAGE_MIN || lo > boot_info->vtl1_base - len)
		return "a segment leaves the image window";
	if (lo < prev_end)
		return "segments not ascending or overlapping";
	if (overlaps(lo, len, boot_info->image_start, PAGE_UP(boot_info->image_end) - boot_info->image_start))
		return "a segment overlaps the running kernel";
	if (overlaps(lo, len, boot_info->staged_gpa, boot_info->staged_size))
		return "a segment overlaps the staged file";
	return NULL;
}

const char *kexec_load_staged(struct vtl_kexec_request *req)
{
	uint64_t f = boot_info->staged_gpa, size = boot_info->staged_size;
	if (!size)
		return "no staged file";
	if (size > boot_info->mem_size || f > boot_info->mem_size - size ||
	    overlaps(f, size, boot_info->vtl1_base, boot_info->vtl1_size))
		return "the staged file is not in VTL0 memory";
	const struct elf64_ehdr *eh = (const struct elf64_ehdr *)f;
	const char *why = check_header(f, size, eh);
	if (why)
		return why;
	const struct elf64_phdr *ph = (const struct elf64_phdr *)(f + eh->phoff);
	uint64_t prev_end = 0;
	uint32_t n = 0;
	for (uint32_t i = 0; i < eh->phnum; i++) {     /* check everything before copying */
		if (ph[i].type != PT_LOAD || ph[i].memsz == 0)
			continue;
		if (n == VTL_KEXEC_MAX_SEGMENTS)
			return "too many segments";
		if ((why = check_segment(&ph[i], size, prev_end)))
			return why;
		prev_end = ph[i].paddr + PAGE_UP(ph[i].memsz);
		n++;
	}
	if (!n)
		return "no loadable segment";
	memset(req, 0, sizeof(*req));
	req->entry = eh->entry;
	req->nr_segments = n;
	n = 0;
	for (uint32_t i = 0; i < eh->phnum; i++) {
		if (ph[i].type != PT_LOAD || ph[i].memsz == 0)
			continue;
		copy_fast(ph[i].paddr, f + ph[i].offset, ph[i].filesz);
		zero_fast(ph[i].paddr + ph[i].filesz, PAGE_UP(ph[i].memsz) - ph[i].filesz);
		req->seg[n++] = (struct vtl_kexec_segment){ ph[i].paddr, ph[i].filesz, ph[i].memsz, ph[i].flags, 0 };
	}
	/* The new kernel's privileged section, for the persist policy (VTL1 checks it). */
	uint64_t ps = elf_symbol(f, size, eh, "_priv_start"), pe = elf_symbol(f, size, eh, "_priv_end");
	if (ps && pe > ps) {
		req->priv_gpa = ps;
		req->priv_pages = (pe - ps) >> 12;
	}
	return NULL;
}

/* A symbol of the staged file (checked as kexec_load_staged checks it), 0 if none. */
uint64_t kexec_staged_symbol(const char *name)
{
	uint64_t f = boot_info->staged_gpa, size = boot_info->staged_size;
	if (!size || size > boot_info->mem_size || f > boot_info->mem_size - size)
		return 0;
	const struct elf64_ehdr *eh = (const struct elf64_ehdr *)f;
	return check_header(f, size, eh) ? 0 : elf_symbol(f, size, eh, name);
}
