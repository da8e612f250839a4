"""VTL1's allowlist: the SHA-256 digests `vtl run --trust` provisions into VTL1's boot data.

An entry names what VTL1 may accept later (a kexec image, a module), by the digest VTL1
computes itself from memory:

  an ELF file     the loaded-image measurement (vmm/measure.py, docs/abi.md
                  "Measurement"): what VTL1 recomputes over the segments VTL0 placed
                  for VTL_CALL_KEXEC_VALIDATE;
  any other file  SHA-256 of its bytes zero-padded to whole 4 KiB pages: what VTL1
                  hashes over the pages of VTL_CALL_MODULE_VALIDATE;
  sha256:HEX      that digest as given.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vmm.elf import parse_image
from vmm.errors import VmmError
from vmm.files import read_input
from vmm.measure import loaded_image_sha256
from vmm.memory import PAGE_SIZE
from vtl.abi import ABI

ELF_MAGIC = b"\x7fELF"
MAX_TRUSTED_FILE = 256 << 20


class TrustError(VmmError):
    """A --trust entry that cannot be turned into a digest."""


def page_padded_sha256(data: bytes) -> bytes:
    pad = -len(data) % PAGE_SIZE
    return hashlib.sha256(data + bytes(pad)).digest()


def trust_digest(entry: str | Path) -> bytes:
    """The 32-byte digest a --trust entry stands for (see the module doc)."""
    text = str(entry)
    if text.startswith("sha256:"):
        hexpart = text[len("sha256:"):]
        try:
            digest = bytes.fromhex(hexpart)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise TrustError(f"--trust {text!r}: sha256: takes 64 hex digits")
        return digest
    path = Path(entry)
    data = read_input(path, "--trust", MAX_TRUSTED_FILE, TrustError)
    if data[:4] == ELF_MAGIC:
        return bytes.fromhex(loaded_image_sha256(parse_image(path, data)))
    return page_padded_sha256(data)


def trust_list(entries: list[str] | list[Path]) -> list[bytes]:
    if len(entries) > ABI.VTL_TRUST_MAX:
        raise TrustError(f"{len(entries)} --trust entries: VTL1's allowlist holds {ABI.VTL_TRUST_MAX}")
    return [trust_digest(e) for e in entries]
