"""KvmError: what a KVM ioctl fails with, carrying the kernel's errno."""
from __future__ import annotations

import errno as _errno
import os


class KvmError(OSError):
    """An ioctl-shaped call failed as the kernel would fail it.

    ``err.errno`` is the errno the kernel returns for the same misuse
    (EINVAL, ENOENT, ENXIO, E2BIG, EEXIST, ...); ``err.ioctl`` names the call.
    """

    def __init__(self, err: int, ioctl: str, detail: str = "") -> None:
        name = _errno.errorcode.get(err, str(err))
        msg = f"{ioctl}: {name} ({os.strerror(err)})"
        if detail:
            msg += f": {detail}"
        super().__init__(err, msg)
        self.ioctl = ioctl
        self.detail = detail

    def __reduce__(self):  # keep pickling (multiprocessing) working
        return (type(self), (self.errno, self.ioctl, self.detail))
