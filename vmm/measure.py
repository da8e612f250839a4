"""The measurement of a guest image: SHA-256 of what the loader puts in memory.

Not the hash of the file: section headers, symbols and anything else the loader does
not copy are left out, so two files that load the same bytes at the same places with
the same entry point measure the same, and every loaded byte is covered.

Format (docs/abi.md, "Measurement"), all integers little-endian:

    u64 entry point
    then for each PT_LOAD segment with p_memsz > 0, in ascending GPA (p_paddr) order:
        u64 GPA, u64 p_filesz, u64 p_memsz, u32 p_flags, then the p_filesz file bytes

The zero fill from p_filesz up to p_memsz is covered by p_memsz.  Ascending GPA is the
program-header order of any conforming ELF (the ELF spec keeps PT_LOAD entries sorted);
the loader refuses overlapping segments, so the order is unambiguous.
"""

from __future__ import annotations

import hashlib
import struct

from vmm.elf import ElfImage

_SEGMENT = struct.Struct("<QQQI")


def loaded_image_sha256(image: ElfImage) -> str:
    """Hex SHA-256 over the entry point and every loaded segment (see the module doc)."""
    h = hashlib.sha256(struct.pack("<Q", image.entry))
    for s in sorted(image.segments, key=lambda s: s.gpa):
        if s.memsz == 0:
            continue
        h.update(_SEGMENT.pack(s.gpa, s.filesz, s.memsz, s.flags))
        h.update(image.data[s.offset:s.offset + s.filesz])
    return h.hexdigest()
