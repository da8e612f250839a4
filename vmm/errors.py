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


def kvm_unavailable_reason(path: str = "/dev/kvm") -> str | None:
    """One sentence saying why KVM cannot be used here, or None if it can be opened."""
    if not os.path.exists(path):
        return (f"{path} does not exist: this host has no KVM (enable virtualization, "
                "load kvm_intel/kvm_amd, or run inside a VM with nested virtualization)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return (f"{path} exists but this user may not open it ({e.strerror}): "
                    "add the user to the 'kvm' group or run as root")
        return f"{path} cannot be opened: {e.strerror}"
    os.close(fd)
    return None
