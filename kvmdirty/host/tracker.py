"""Write tracking of this process's memory by the host kernel (userfaultfd-wp + PAGEMAP_SCAN).

The same write-protect-and-harvest scheme KVM uses for guests, applied by
Linux to an ordinary anonymous mapping:

1. ``userfaultfd`` with ``UFFD_FEATURE_WP_ASYNC`` (faults resolved by the
   kernel itself, no handler thread) and ``UFFD_FEATURE_WP_UNPOPULATED``
   (never-touched pages are protected too, so a first write is seen);
2. ``UFFDIO_REGISTER`` (mode WP) and ``UFFDIO_WRITEPROTECT`` the range;
3. a harvest is one ``PAGEMAP_SCAN`` over the range with
   ``PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`` and category
   ``PAGE_IS_WRITTEN``: the kernel reports the written pages and
   write-protects them again in the same walk, under the page-table lock,
   and flushes the TLB before it unlocks (as KVM_GET_DIRTY_LOG does).

Rights: root (CAP_SYS_PTRACE), or ``vm.unprivileged_userfaultfd = 1``, or
read/write access to ``/dev/userfaultfd``; otherwise an unprivileged process
may only open a userfaultfd with ``UFFD_USER_MODE_ONLY`` (Linux >= 5.11),
which is enough here and is tried second.  Kernel: Linux >= 6.7.
"""
from __future__ import annotations

import errno
import functools
import threading
from typing import Any, Optional

import numpy as np

from .. import _host

#: The userfaultfd features the tracker needs.
FEATURES = _host.UFFD_FEATURE_WP_ASYNC | _host.UFFD_FEATURE_WP_UNPOPULATED
#: The harvest: report written pages and re-protect them in the same walk;
#: fail (EPERM) on a page that is not under async write-protect.
HARVEST_FLAGS = _host.PM_SCAN_WP_MATCHING | _host.PM_SCAN_CHECK_WPASYNC
PAGE_SIZE = _host.PAGE_SIZE

_FEATURE_NAMES = ((_host.UFFD_FEATURE_WP_ASYNC, "UFFD_FEATURE_WP_ASYNC"),
                  (_host.UFFD_FEATURE_WP_UNPOPULATED, "UFFD_FEATURE_WP_UNPOPULATED"))


class HostTrackingUnsupported(OSError):
    """This kernel or process cannot track writes with userfaultfd-wp + PAGEMAP_SCAN."""


def open_uffd() -> _host.Uffd:
    """A userfaultfd with FEATURES enabled, or HostTrackingUnsupported saying why not."""
    try:
        return _host.Uffd(FEATURES)
    except OSError as e:
        first = e
    if first.errno == errno.EPERM:
        try:
            return _host.Uffd(FEATURES, user_mode_only=True)
        except OSError as e:
            if e.errno == errno.EPERM:
                raise HostTrackingUnsupported(
                    errno.EPERM, "userfaultfd is not permitted: run as root, or set "
                    "vm.unprivileged_userfaultfd=1, or grant access to /dev/userfaultfd") from None
            first = e
    if first.errno == errno.ENOSYS:
        raise HostTrackingUnsupported(errno.ENOSYS, "this kernel has no userfaultfd "
                                      "(CONFIG_USERFAULTFD is off)") from None
    if first.errno == errno.EINVAL:
        missing = _missing_features()
        if missing:
            raise HostTrackingUnsupported(
                errno.EINVAL, f"this kernel's userfaultfd lacks {' and '.join(missing)} "
                "(Linux >= 6.7 needed)") from None
    raise HostTrackingUnsupported(first.errno, f"userfaultfd: {first.strerror or first}") from None


def _missing_features() -> list:
    """The FEATURES the kernel does not offer (asked with UFFDIO_API features=0)."""
    for umo in (False, True):
        try:
            u = _host.Uffd(0, user_mode_only=umo)
        except OSError:
            continue
        have = u.features
        u.close()
        return [name for bit, name in _FEATURE_NAMES if not have & bit]
    return []


@functools.lru_cache(maxsize=None)
def host_unusable() -> Optional[str]:
    """Why host write tracking cannot run here (one line), or None when it works.

    Proved end to end on a two-page mapping: protect it, write one page, and
    the harvest must report exactly that page and then nothing.
    """
    from .._kvm import Mapping
    try:
        m = Mapping(2 * PAGE_SIZE)
    except OSError as e:
        return f"cannot map memory: {e}"
    try:
        t = Tracker(m)
    except OSError as e:
        m.close()
        return str(e.strerror if isinstance(e, HostTrackingUnsupported) else e)
    try:
        np.frombuffer(m, dtype=np.uint64)[PAGE_SIZE // 8] = 1
        try:
            first = t.harvest()
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOTTY):
                return "this kernel has no PAGEMAP_SCAN ioctl (Linux >= 6.7 needed)"
            return f"PAGEMAP_SCAN fails: {e}"
        second = t.harvest()
        if int(first[0]) != 2 or int(second[0]) != 0:
            return (f"PAGEMAP_SCAN reported pages {int(first[0]):#b} then {int(second[0]):#b} "
                    "after one write to page 1 (expected 0b10 then 0)")
        return None
    finally:
        t.close()
        m.close()


def require_host() -> None:
    """Raise HostTrackingUnsupported (one clear line) unless host tracking works here."""
    why = host_unusable()
    if why:
        raise HostTrackingUnsupported(errno.EOPNOTSUPP, f"host write tracking unavailable: {why}")


class Tracker:
    """The host kernel's write log of one page-aligned buffer of this process.

    ``memory``: a writable buffer (an mmap, kvmdirty._kvm.Mapping, ...) whose
    address and length are page aligned; it stays exported (cannot be
    unmapped) until ``close()``.  Pages are bit i of uint64 words, as KVM's
    dirty bitmaps.  Transparent huge pages are disabled on the range (a THP
    would report 512 pages for one write).
    """

    def __init__(self, memory: Any, *, protect: bool = True) -> None:
        view = memoryview(memory)
        if view.readonly:
            raise TypeError("memory must be writable")
        if not view.c_contiguous:
            raise ValueError("memory must be contiguous")
        arr = np.frombuffer(view, dtype=np.uint8)
        self.address = int(arr.ctypes.data)
        self.length = view.nbytes
        if self.address % PAGE_SIZE or self.length % PAGE_SIZE or not self.length:
            view.release()
            raise ValueError("memory must be a non-empty whole number of pages, page aligned")
        self.npages = self.length // PAGE_SIZE
        self.nwords = (self.npages + 63) >> 6
        del arr
        self._view: Optional[memoryview] = view
        self._lock = threading.Lock()
        # Pages reported by a harvest that then failed: handed out by the next one.
        self._pending = np.zeros(self.nwords, np.uint64)
        self._pagemap: Optional[_host.Pagemap] = None
        self._uffd: Optional[_host.Uffd] = None
        try:
            _host.no_huge_pages(self.address, self.length)
            self._uffd = open_uffd()
            self._uffd.register_wp(self.address, self.length)
            self._pagemap = _host.Pagemap()
            if protect:
                self._uffd.writeprotect(self.address, self.length)
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return self._view is None

    def _check(self, what: str) -> None:
        if self._view is None:
            raise OSError(errno.EBADF, f"{what}: the tracker is closed")

    def harvest(self, *, reprotect: bool = True) -> np.ndarray:
        """The pages written since they were last protected, as uint64 bitmap words.

        With ``reprotect`` (KVM_GET_DIRTY_LOG without manual protect) the
        kernel write-protects them again in the same walk, so the next
        harvest reports only later writes.  Without it (manual protect) the
        pages stay reported until ``protect`` is called for them.
        """
        with self._lock:
            self._check("PAGEMAP_SCAN")
            if not reprotect:
                words = self._pending.copy()
                _, err = self._pagemap.scan_bits(self.address, self.address + self.length, words,
                                                 flags=_host.PM_SCAN_CHECK_WPASYNC,
                                                 category_mask=_host.PAGE_IS_WRITTEN)
                if err:
                    raise OSError(err, f"PAGEMAP_SCAN: {errno.errorcode.get(err, err)}")
                return words
            # The kernel re-protects what it reports: the bits go straight into
            # _pending, and leave it only once copied out, so neither a failed
            # walk nor a KeyboardInterrupt between the calls can drop them.
            _, err = self._pagemap.scan_bits(self.address, self.address + self.length, self._pending,
                                             flags=HARVEST_FLAGS, category_mask=_host.PAGE_IS_WRITTEN)
            if err:
                raise OSError(err, f"PAGEMAP_SCAN: {errno.errorcode.get(err, err)}")
            words = self._pending.copy()
            self._pending.fill(0)
            return words

    def protect(self, first_page: int = 0, words: Optional[np.ndarray] = None) -> int:
        """Write-protect pages again: all of them, or the set bits of ``words`` from first_page.

        Returns the pages protected.  (KVM_CLEAR_DIRTY_LOG's re-protect.)
        """
        with self._lock:
            self._check("UFFDIO_WRITEPROTECT")
            if words is None:
                self._uffd.writeprotect(self.address, self.length)
                self._pending[:] = 0
                return self.npages
            w = np.array(words, dtype=np.uint64, copy=True).reshape(-1)
            if first_page < 0 or first_page & 63 or first_page + len(w) * 64 > self.nwords * 64:
                raise ValueError("words must lie inside the tracked range from a multiple of 64")
            tail = self.npages - first_page - (len(w) - 1) * 64
            if len(w) and tail < 64:      # bits beyond the last page are ignored
                w[-1] &= np.uint64((1 << tail) - 1)
            self._pending[first_page >> 6:(first_page >> 6) + len(w)] &= ~w
            return self._uffd.writeprotect_bits(self.address, w, first_page)

    def close(self) -> None:
        """Unregister and release the buffer; idempotent."""
        with self._lock:
            if self._uffd is not None:
                self._uffd.close()       # drops the registration
                self._uffd = None
            if self._pagemap is not None:
                self._pagemap.close()
                self._pagemap = None
            if self._view is not None:
                self._view.release()
                self._view = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
