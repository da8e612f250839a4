# Guest kernels (freestanding C + asm, the machine's gcc/binutils) and the C bench floor.
# `make setup` is the one set-up command of the README; `make test` the test command.

CC      ?= gcc
# PYTHON is the interpreter the project's venv is made from (Debian's /usr/bin/python3 or any
# other CPython 3.11+); everything after set-up runs in the venv, VENV/bin/python.
PYTHON  ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
CFLAGS  := -std=gnu11 -O2 -Wall -Wextra -Werror -ffreestanding -fno-pic -fno-pie -fno-stack-protector \
           -fno-asynchronous-unwind-tables -fno-builtin -fno-toplevel-reorder -mno-red-zone -mgeneral-regs-only \
           -mno-sse -mno-mmx -mno-80387 -mcmodel=small -I vtl/abi -I guest_lib
LDFLAGS := -nostdlib -static -no-pie -Wl,--build-id=none -Wl,-z,max-page-size=0x1000 -Wl,-z,noexecstack

# Guests are built reproducibly: every source is compiled to a named object under
# guest_vtlN/build/obj/ (guest_lib objects once per image, under obj/lib/), then linked
# in a fixed order.  Paths reach the objects only relative to the top directory
# (-ffile-prefix-map covers anything that would expand an absolute one), there is no
# build-id and no timestamp, so the same sources give byte-identical ELF files in any
# directory.  tests/test_build.py checks it.
GUEST_CFLAGS := $(CFLAGS) -ffile-prefix-map=$(CURDIR)=. -MMD -MP

LIB_SRC  := guest_lib/console.c guest_lib/string.c guest_lib/arch.c guest_lib/paging.c guest_lib/report.c \
            guest_lib/entry_common.S guest_lib/priv.S
VTL0_SRC := guest_vtl0/entry.S guest_vtl0/main.c guest_vtl0/scenarios.c guest_vtl0/lifecycle.c \
            guest_vtl0/elfload.c guest_vtl0/modules.S guest_vtl0/heki.c guest_vtl0/heki_kexec.c \
            guest_vtl0/compare.c guest_vtl0/smp.c guest_vtl0/xvp.c guest_vtl0/snapshot.c
VTL1_SRC := guest_vtl1/entry.S guest_vtl1/main.c guest_vtl1/policy.c guest_vtl1/sha256.c guest_vtl1/lifecycle.c
VTL0     := guest_vtl0/build/vtl0.elf
VTL0_KEXEC := guest_vtl0/build/vtl0-kexec.elf   # the same kernel at 0x800000: a kexec target
MODULES  := guest_vtl0/build/module.bin guest_vtl0/build/module-priv.bin
VTL1     := guest_vtl1/build/vtl1.elf

# guest_vtlN/foo.c -> guest_vtlN/build/obj/foo.o; guest_lib/bar.c -> guest_vtlN/build/obj/lib/bar.o
guest_objs = $(patsubst $(1)/%,$(1)/build/obj/%.o,$(basename $(2))) \
             $(patsubst guest_lib/%,$(1)/build/obj/lib/%.o,$(basename $(LIB_SRC)))
VTL0_OBJ := $(call guest_objs,guest_vtl0,$(VTL0_SRC))
VTL1_OBJ := $(call guest_objs,guest_vtl1,$(VTL1_SRC))

.PHONY: all guests bench fastpath install setup test check clean
all: guests bench fastpath

# The VTL switch's C fast path (vtl/run/fastpath.c), loaded by vtl/run/fastpath.py; host
# code, built with the machine's compiler against its linux/kvm.h.
FASTPATH := vtl/run/build/fastpath.so
fastpath: $(FASTPATH)
$(FASTPATH): vtl/run/fastpath.c vtl/abi/vtl_abi.h
	@mkdir -p $(dir $@)
	$(CC) -O2 -Wall -Wextra -Werror -shared -fPIC -I vtl/abi -o $@ $<

guests: $(VTL0) $(VTL0_KEXEC) $(VTL1) $(MODULES)

# VTL1 refuses to lock VTL0's page tables if a byte sequence that writes CR0/CR3/CR4/XCR0/
# GDTR/IDTR/LDTR/TR lies in executable memory outside the privileged section
# (docs/writing-guests.md, "Register pinning").  A call displacement or an address can
# spell one by accident: link with growing padding between the kernel's code and
# guest_lib's (PRIVSCAN_PAD, some of it a page, which moves the data too) until
# guest_lib/privscan.py, the same scan, finds nothing; else fail naming the function.
PRIVSCAN_PADS := 0 16 48 80 112 4096 4112 4144 8192 8208 8240 12288
# $(call link_vtl0,extra linker flags); vtl0-kexec.elf is linked at 0x800000.
KEXEC_LDFLAGS := -Wl,--defsym=VTL0_BASE=0x800000
define link_vtl0
	@for pad in $(PRIVSCAN_PADS); do \
		$(CC) $(LDFLAGS) $(1) -Wl,--defsym=PRIVSCAN_PAD=$$pad -T guest_vtl0/linker.ld -o $@ $(VTL0_OBJ) || exit 1; \
		if $(PYTHON) guest_lib/privscan.py $@ --quiet; then \
			[ $$pad = 0 ] || echo "privscan: $@ linked with PRIVSCAN_PAD=$$pad"; exit 0; fi; \
	done; \
	$(PYTHON) guest_lib/privscan.py $@; rm -f $@; exit 1
endef
$(VTL0): $(VTL0_OBJ) guest_vtl0/linker.ld guest_lib/privscan.py
	$(call link_vtl0,)
$(VTL0_KEXEC): $(VTL0_OBJ) guest_vtl0/linker.ld guest_lib/privscan.py
	$(call link_vtl0,$(KEXEC_LDFLAGS))

# Modules: flat, position-independent code, one page each (the sources pad themselves),
# embedded in the VTL0 image by modules.S (.incbin, which -MMD does not see).
guest_vtl0/build/%.bin: guest_vtl0/build/obj/%.o
	objcopy -O binary -j .text $< $@
guest_vtl0/build/obj/modules.o: $(MODULES)
.SECONDARY: $(MODULES:guest_vtl0/build/%.bin=guest_vtl0/build/obj/%.o)

$(VTL1): $(VTL1_OBJ) guest_vtl1/linker.ld
	$(CC) $(LDFLAGS) -T guest_vtl1/linker.ld -o $@ $(VTL1_OBJ)

# One compile rule per (image, source directory, language).  Objects also depend on the
# Makefile (flags) and, through the -MMD files, on every header they include.
define guest_compile_rules
$(1)/build/obj/%.o: $(1)/%.c Makefile
	@mkdir -p $$(@D)
	$$(CC) $$(GUEST_CFLAGS) -c -o $$@ $$<
$(1)/build/obj/%.o: $(1)/%.S Makefile
	@mkdir -p $$(@D)
	$$(CC) $$(GUEST_CFLAGS) -c -o $$@ $$<
$(1)/build/obj/lib/%.o: guest_lib/%.c Makefile
	@mkdir -p $$(@D)
	$$(CC) $$(GUEST_CFLAGS) -c -o $$@ $$<
$(1)/build/obj/lib/%.o: guest_lib/%.S Makefile
	@mkdir -p $$(@D)
	$$(CC) $$(GUEST_CFLAGS) -c -o $$@ $$<
endef
$(foreach image,guest_vtl0 guest_vtl1,$(eval $(call guest_compile_rules,$(image))))
-include $(VTL0_OBJ:.o=.d) $(VTL1_OBJ:.o=.d)

bench:
	$(MAKE) -C bench

# `make install`: what the project needs (Debian packages if missing, a venv with the
# project and its test tools: scripts/venv.sh, because Debian's Python refuses `pip install`
# under PEP 668), the guests and the C bench floor.  `make setup` (the README's set-up
# command) is that, then the main job on the built-in guests.
install:
	PYTHON=$(PYTHON) bash scripts/install-deps.sh
	bash scripts/venv.sh $(PYTHON) $(VENV)
	$(MAKE) guests
	$(MAKE) fastpath
	-$(MAKE) bench

setup: install
	$(VPY) -m vtl run

$(VPY):
	@echo "no venv at $(VENV): run 'make setup' (or 'make install') first" >&2; exit 1

test: $(VPY)
	$(VPY) -m pytest -q

check: $(VPY)
	$(VPY) -m ruff check vmm vtl tests
	$(VPY) -m mypy vmm vtl tests

clean:
	rm -rf guest_vtl0/build guest_vtl1/build vtl/run/build   # the venv stays: `rm -rf $(VENV)` for that
	-$(MAKE) -C bench clean
