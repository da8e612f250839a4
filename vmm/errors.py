"""Errors raised by the KVM layer.  Each names the operation and the errno."""

from __future__ import annotations

import errno
import os


class VmmError(Exception):
    """Base class for every error the VMM reports to a user."""


class KvmUnavailable(VmmError):
    """/dev/kvm is missing or cannot be used."""


class KvmIoctlError(VmmError):
    def __init__(self, name: str, err: int, detail: str = "") -> None:
        self.name = name
        self.errno = err
        code = errno.errorcode.get(err, str(err))
        msg = f"{name} failed: {code} ({os.strerror(err)})"
        super().__init__(msg + (f": {detail}" if detail else ""))


class GuestImageError(VmmError):
    """A guest image that cannot be loaded (not an ELF, wrong machine, out of range)."""

