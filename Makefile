# Guest kernels (freestanding C + asm, the machine's gcc/binutils) and the C bench floor.
# `make setup` is the one set-up command of the README; `make test` the test command.

CC      ?= gcc
PYTHON  ?= python3
CFLAGS  := -std=gnu11 -O2 -Wall -Wextra -Werror -ffreestanding -fno-pic -fno-pie -fno-stack-protector \
           -fno-asynchronous-unwind-tables -fno-builtin -fno-toplevel-reorder -mno-red-zone -mgeneral-regs-only \
           -mno-sse -mno-mmx -mno-80387 -mcmodel=small -I vtl/abi -I guest_lib
LDFLAGS := -nostdlib -static -no-pie -Wl,--build-id=none -Wl,-z,max-page-size=0x1000 -Wl,-z,noexecstack

LIB_SRC := guest_lib/console.c guest_lib/string.c guest_lib/arch.c guest_lib/paging.c guest_lib/entry_common.S
HDRS    := vtl/abi/vtl_abi.h $(wildcard guest_lib/*.h guest_vtl0/*.h)
VTL0    := guest_vtl0/build/vtl0.elf
VTL1    := guest_vtl1/build/vtl1.elf

.PHONY: all guests bench setup test check clean
all: guests bench

guests: $(VTL0) $(VTL1)

$(VTL0): guest_vtl0/entry.S guest_vtl0/main.c guest_vtl0/scenarios.c guest_vtl0/linker.ld $(LIB_SRC) $(HDRS)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(LDFLAGS) -T guest_vtl0/linker.ld -o $@ guest_vtl0/entry.S guest_vtl0/main.c \
	    guest_vtl0/scenarios.c $(LIB_SRC)

$(VTL1): guest_vtl1/entry.S guest_vtl1/main.c guest_vtl1/policy.c guest_vtl1/vtl1.h guest_vtl1/linker.ld $(LIB_SRC) $(HDRS)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(LDFLAGS) -T guest_vtl1/linker.ld -o $@ guest_vtl1/entry.S guest_vtl1/main.c \
	    guest_vtl1/policy.c $(LIB_SRC)

bench:
	$(MAKE) -C bench

# Installs what the project needs (Debian packages if missing, the Python package with
# its test tools), builds the guests and runs the main job on them.
setup:
	bash scripts/install-deps.sh
	$(PYTHON) -m pip install -q -e '.[test,plot]'
	$(MAKE) guests
	-$(MAKE) bench
	$(PYTHON) -m vtl run

test:
	$(PYTHON) -m pytest -q

check:
	ruff check vmm vtl tests
	mypy vmm vtl tests

clean:
	rm -rf guest_vtl0/build guest_vtl1/build
	-$(MAKE) -C bench clean
