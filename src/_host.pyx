"""The host kernel's own write tracking: userfaultfd write-protect (async) + PAGEMAP_SCAN.

Linux >= 6.7 tracks the writes to a process's anonymous memory with the
scheme KVM uses for guests: write-protect, let the first write fault (the
kernel resolves it at once in async mode and marks the page written), then
harvest the written pages and write-protect them again in one call.

  userfaultfd(2) + UFFDIO_API with UFFD_FEATURE_WP_ASYNC | WP_UNPOPULATED
  UFFDIO_REGISTER (MODE_WP), UFFDIO_WRITEPROTECT (MODE_WP)  -> protect
  ioctl(/proc/self/pagemap, PAGEMAP_SCAN) with PM_SCAN_WP_MATCHING and
  category PAGE_IS_WRITTEN                                  -> harvest + re-protect

The installed uapi headers may be older than the running kernel, so the
structs and numbers are defined here (checked against the headers where
they have them) and support is established at run time by kvmdirty.host.

Every call validates at the def boundary, then runs the syscall or loop with
the GIL released.  A failing syscall raises OSError(errno, message).
"""
from libc.errno cimport errno, EINTR
from libc.stdint cimport uint8_t, uint64_t, uintptr_t
from libc.string cimport memset
from posix.fcntl cimport open as c_open, O_RDONLY, O_CLOEXEC, O_NONBLOCK
from posix.mman cimport (mmap, munmap, PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS,
                         MAP_FAILED)
from posix.unistd cimport close as c_close

import os
import threading

import numpy as np

from _atomic cimport kd_store_relaxed_u64

cdef extern from *:
    """
    #include <stdint.h>
    #include <sys/ioctl.h>
    #include <sys/mman.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    #include <linux/userfaultfd.h>

    /* include/uapi/linux/fs.h (Linux 6.7) */
    struct kd_page_region { uint64_t start, end, categories; };
    struct kd_pm_scan_arg {
        uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
        uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
    };
    #define KD_PAGEMAP_SCAN _IOWR('f', 16, struct kd_pm_scan_arg)

    /* include/uapi/linux/userfaultfd.h */
    struct kd_uffdio_api { uint64_t api, features, ioctls; };
    struct kd_uffdio_range { uint64_t start, len; };
    struct kd_uffdio_register { struct kd_uffdio_range range; uint64_t mode, ioctls; };
    struct kd_uffdio_writeprotect { struct kd_uffdio_range range; uint64_t mode; };
    #define KD_UFFDIO 0xAA
    #define KD_UFFDIO_API _IOWR(KD_UFFDIO, 0x3F, struct kd_uffdio_api)
    #define KD_UFFDIO_REGISTER _IOWR(KD_UFFDIO, 0x00, struct kd_uffdio_register)
    #define KD_UFFDIO_UNREGISTER _IOR(KD_UFFDIO, 0x01, struct kd_uffdio_range)
    #define KD_UFFDIO_WRITEPROTECT _IOWR(KD_UFFDIO, 0x06, struct kd_uffdio_writeprotect)

    _Static_assert(sizeof(struct kd_pm_scan_arg) == 96, "pm_scan_arg is 96 bytes");
    _Static_assert(sizeof(struct kd_page_region) == 24, "page_region is 24 bytes");
    #ifdef UFFDIO_API
    _Static_assert(KD_UFFDIO_API == UFFDIO_API, "UFFDIO_API");
    _Static_assert(KD_UFFDIO_REGISTER == UFFDIO_REGISTER, "UFFDIO_REGISTER");
    _Static_assert(KD_UFFDIO_UNREGISTER == UFFDIO_UNREGISTER, "UFFDIO_UNREGISTER");
    #endif
    #ifdef UFFDIO_WRITEPROTECT
    _Static_assert(KD_UFFDIO_WRITEPROTECT == UFFDIO_WRITEPROTECT, "UFFDIO_WRITEPROTECT");
    #endif
    #ifdef PAGEMAP_SCAN
    _Static_assert(KD_PAGEMAP_SCAN == PAGEMAP_SCAN, "PAGEMAP_SCAN");
    #endif

    static long kd_userfaultfd(int flags) { return syscall(__NR_userfaultfd, flags); }
    static int kd_madvise(void *addr, size_t len, int advice) { return madvise(addr, len, advice); }
    #ifndef MADV_NOHUGEPAGE
    #define MADV_NOHUGEPAGE 15
    #endif
    """
    struct kd_page_region:
        uint64_t start
        uint64_t end
        uint64_t categories
    struct kd_pm_scan_arg:
        uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages
        uint64_t category_inverted, category_mask, category_anyof_mask, return_mask
    struct kd_uffdio_api:
        uint64_t api, features, ioctls
    struct kd_uffdio_range:
        uint64_t start, len
    struct kd_uffdio_register:
        kd_uffdio_range range
        uint64_t mode, ioctls
    struct kd_uffdio_writeprotect:
        kd_uffdio_range range
        uint64_t mode
    const unsigned long KD_PAGEMAP_SCAN
    const unsigned long KD_UFFDIO_API
    const unsigned long KD_UFFDIO_REGISTER
    const unsigned long KD_UFFDIO_UNREGISTER
    const unsigned long KD_UFFDIO_WRITEPROTECT
    const int MADV_NOHUGEPAGE
    long kd_userfaultfd(int flags) nogil
    int kd_madvise(void *addr, size_t len, int advice) nogil
    int ioctl(int fd, unsigned long request, ...) nogil

PAGE_SHIFT = 12
PAGE_SIZE = 4096
cdef uint64_t _PAGE = 4096

#: userfaultfd(2) flag: handle faults from user mode only (allowed to
#: unprivileged users when vm.unprivileged_userfaultfd = 0, Linux >= 5.11).
UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
#: Bit numbers of the UFFDIO_* ioctls in uffdio_register.ioctls.
UFFDIO_WRITEPROTECT_BIT = 0x06

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

#: Regions one PAGEMAP_SCAN call may return (the walk goes on from walk_end).
cdef size_t VEC_LEN = 4096


cdef object _os_error(int err, str what):
    return OSError(err, f"{what}: {os.strerror(err)}")


cdef uint64_t _u64(object v, str what) except? 0:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{what} must be an int, not {type(v).__name__}")
    v = int(v)
    if v < 0 or v >= (1 << 64):
        raise ValueError(f"{what} must be in [0, 2**64), got {v}")
    return <uint64_t>v


cdef int _check_range(uint64_t addr, uint64_t length) except -1:
    if addr % _PAGE or length % _PAGE:
        raise ValueError(f"address {addr:#x} and length {length:#x} must be page aligned")
    if length == 0:
        raise ValueError("length must be > 0")
    if addr + length < addr:
        raise ValueError("address + length overflows")
    return 0


def no_huge_pages(uint64_t addr, uint64_t length):
    """madvise(MADV_NOHUGEPAGE): a transparent huge page would report 512 pages per write."""
    _check_range(addr, length)
    cdef int r
    with nogil:
        r = kd_madvise(<void *><uintptr_t>addr, length, MADV_NOHUGEPAGE)
    if r:
        raise _os_error(errno, "madvise(MADV_NOHUGEPAGE)")


cdef class Uffd:
    """A userfaultfd in async write-protect mode (UFFDIO_API done with `features`).

    Not thread-safe by itself: kvmdirty.host.tracker serialises its calls.
    """
    cdef int fd
    cdef readonly uint64_t features
    cdef readonly bint user_mode_only
    # Held by every ioctl and by close(): a close racing an ioctl in another
    # thread waits for it, so the fd number is never reused under it.
    cdef object _lock

    def __cinit__(self):
        self.fd = -1
        self._lock = threading.Lock()

    def __init__(self, features, *, user_mode_only=False):
        """Open a userfaultfd and enable `features` (UFFDIO_API); OSError when refused."""
        cdef uint64_t want = _u64(features, "features")
        cdef int flags = O_CLOEXEC | O_NONBLOCK | (UFFD_USER_MODE_ONLY if user_mode_only else 0)
        cdef long fd
        cdef kd_uffdio_api api
        cdef int r = 0, err = 0
        with nogil:
            fd = kd_userfaultfd(flags)
        if fd < 0:
            raise _os_error(errno, "userfaultfd")
        self.fd = <int>fd
        self.user_mode_only = user_mode_only
        memset(&api, 0, sizeof(api))
        api.api = UFFD_API
        api.features = want
        with nogil:
            r = ioctl(self.fd, KD_UFFDIO_API, &api)
            err = errno
        if r:
            self.close()
            raise _os_error(err, f"UFFDIO_API(features={want:#x})")
        self.features = api.features

    cdef int _fd(self, str what) except -1:
        """The fd, to be used with self._lock held."""
        if self.fd < 0:
            raise OSError(9, f"{what}: the userfaultfd is closed")
        return self.fd

    def register_wp(self, uint64_t addr, uint64_t length):
        """UFFDIO_REGISTER in write-protect mode; returns the ioctls the range supports."""
        _check_range(addr, length)
        cdef int fd
        cdef kd_uffdio_register reg
        cdef int r = 0, err = 0
        memset(&reg, 0, sizeof(reg))
        reg.range.start = addr
        reg.range.len = length
        reg.mode = UFFDIO_REGISTER_MODE_WP
        with self._lock:
            fd = self._fd("UFFDIO_REGISTER")
            with nogil:
                r = ioctl(fd, KD_UFFDIO_REGISTER, &reg)
                err = errno
        if r:
            raise _os_error(err, f"UFFDIO_REGISTER({addr:#x}, {length:#x})")
        return reg.ioctls

    def unregister(self, uint64_t addr, uint64_t length):
        _check_range(addr, length)
        cdef int fd
        cdef kd_uffdio_range rng
        cdef int r = 0, err = 0
        rng.start = addr
        rng.len = length
        with self._lock:
            fd = self._fd("UFFDIO_UNREGISTER")
            with nogil:
                r = ioctl(fd, KD_UFFDIO_UNREGISTER, &rng)
                err = errno
        if r:
            raise _os_error(err, f"UFFDIO_UNREGISTER({addr:#x}, {length:#x})")

    def writeprotect(self, uint64_t addr, uint64_t length, bint protect=True):
        """UFFDIO_WRITEPROTECT: (un)protect a registered range; a write then marks it written."""
        _check_range(addr, length)
        cdef int fd
        cdef kd_uffdio_writeprotect wp
        cdef int r = 0, err = 0
        memset(&wp, 0, sizeof(wp))
        wp.range.start = addr
        wp.range.len = length
        wp.mode = UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
        with self._lock:
            fd = self._fd("UFFDIO_WRITEPROTECT")
            with nogil:
                while True:
                    r = ioctl(fd, KD_UFFDIO_WRITEPROTECT, &wp)
                    err = errno
                    if r == 0 or err != EINTR:
                        break
        if r:
            raise _os_error(err, f"UFFDIO_WRITEPROTECT({addr:#x}, {length:#x})")

    def writeprotect_bits(self, uint64_t base, const uint64_t[::1] words, uint64_t first_page=0):
        """Write-protect each run of set bits of `words` (bit i = page first_page + i from base).

        Returns the number of pages protected.  Stops at the first failure
        (OSError); the pages before it stay protected.
        """
        cdef int fd
        cdef size_t n = words.shape[0]
        cdef uint64_t total = 0, nbits = <uint64_t>n * 64
        cdef kd_uffdio_writeprotect wp
        cdef int r = 0, err = 0
        if base % _PAGE:
            raise ValueError("base must be page aligned")
        memset(&wp, 0, sizeof(wp))
        wp.mode = UFFDIO_WRITEPROTECT_MODE_WP
        self._lock.acquire()
        try:
            fd = self._fd("UFFDIO_WRITEPROTECT")
            with nogil:
                total = _protect_runs(fd, base, &words[0] if n else NULL, nbits, first_page, &wp, &r, &err)
        finally:
            self._lock.release()
        if r:
            raise _os_error(err, "UFFDIO_WRITEPROTECT")
        return total

    def fileno(self):
        return self.fd

    @property
    def closed(self):
        return self.fd < 0

    def close(self):
        """Close the fd (after any ioctl in flight): the kernel drops its registrations."""
        with self._lock:
            if self.fd >= 0:
                c_close(self.fd)
                self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            c_close(self.fd)


cdef uint64_t _protect_runs(int fd, uint64_t base, const uint64_t *words, uint64_t nbits,
                            uint64_t first_page, kd_uffdio_writeprotect *wp, int *r,
                            int *err) noexcept nogil:
    """UFFDIO_WRITEPROTECT each run of set bits; stops at the first failure (r, err)."""
    cdef uint64_t page = 0, run_start, total = 0
    r[0] = 0
    while page < nbits:
        if page & 63 == 0 and words[page >> 6] == 0:
            page += 64
            continue
        if not (words[page >> 6] >> (page & 63)) & 1:
            page += 1
            continue
        run_start = page
        while page < nbits and (words[page >> 6] >> (page & 63)) & 1:
            page += 1
        wp.range.start = base + (first_page + run_start) * _PAGE
        wp.range.len = (page - run_start) * _PAGE
        while True:
            r[0] = ioctl(fd, KD_UFFDIO_WRITEPROTECT, wp)
            err[0] = errno
            if r[0] == 0 or err[0] != EINTR:
                break
        if r[0]:
            break
        total += page - run_start
    return total


cdef class Pagemap:
    """/proc/self/pagemap and a region buffer for PAGEMAP_SCAN.

    The region buffer is a private mmap of its own, so a recorder can leave
    it out of what it tracks (the kernel writes it on every scan).
    """
    cdef int fd
    cdef kd_page_region *vec
    cdef size_t vec_bytes
    # Held by every scan (the region buffer is shared) and by close(): a
    # close racing a scan waits for it, so the buffer is never unmapped under it.
    cdef object _lock

    def __cinit__(self):
        self.fd = -1
        self.vec = NULL
        self._lock = threading.Lock()

    def __init__(self):
        cdef int fd
        cdef void *p
        with nogil:
            fd = c_open(b"/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        if fd < 0:
            raise _os_error(errno, "open(/proc/self/pagemap)")
        self.fd = fd
        self.vec_bytes = (VEC_LEN * sizeof(kd_page_region) + _PAGE - 1) & ~(_PAGE - 1)
        p = mmap(NULL, self.vec_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if p == MAP_FAILED:
            err = errno
            self.close()
            raise _os_error(err, "mmap(region buffer)")
        self.vec = <kd_page_region *>p

    @property
    def buffer_range(self):
        """(address, length) of the region buffer the kernel writes on each scan."""
        return (<uintptr_t>self.vec, self.vec_bytes)

    cdef int _check(self) except -1:
        if self.fd < 0 or self.vec == NULL:
            raise OSError(9, "PAGEMAP_SCAN: the pagemap is closed")
        return 0

    cdef long _scan_once(self, kd_pm_scan_arg *arg, int *err) noexcept nogil:
        """One PAGEMAP_SCAN call; the number of regions, also recovered when it fails.

        On an error the kernel still copies out the regions it found (and has
        already re-protected) and sets walk_end: the buffer is zeroed before
        the call so that those regions can be counted and never dropped.
        """
        cdef long r
        cdef size_t k = 0
        memset(self.vec, 0, VEC_LEN * sizeof(kd_page_region))
        r = ioctl(self.fd, KD_PAGEMAP_SCAN, arg)
        if r >= 0:
            err[0] = 0
            return r
        err[0] = errno
        while k < VEC_LEN and self.vec[k].end != 0:
            k += 1
        return <long>k

    def scan_bits(self, uint64_t start, uint64_t end, uint64_t[::1] words, *, uint64_t flags,
                  uint64_t category_mask, uint64_t anyof_mask=0, uint64_t inverted=0):
        """OR the pages of [start, end) matching the categories into `words` (bit 0 = start).

        Returns (pages set, errno): errno 0 when the whole range was walked;
        otherwise the walk stopped there and every page found before it is
        in `words` all the same (with PM_SCAN_WP_MATCHING it is re-protected).
        `words` is the caller's private buffer (plain stores).
        """
        _check_range(start, end - start if end > start else 0)
        cdef uint64_t npages = (end - start) >> 12
        if <uint64_t>words.shape[0] * 64 < npages:
            raise ValueError(f"words has {words.shape[0]} words, {(npages + 63) >> 6} needed")
        cdef kd_pm_scan_arg arg
        cdef int err = 0
        cdef uint64_t total = 0
        memset(&arg, 0, sizeof(arg))
        arg.size = sizeof(arg)
        arg.flags = flags
        arg.vec_len = VEC_LEN
        arg.category_mask = category_mask
        arg.category_anyof_mask = anyof_mask
        arg.category_inverted = inverted
        arg.return_mask = category_mask | anyof_mask
        with self._lock:
            self._check()
            arg.vec = <uintptr_t>self.vec
            with nogil:
                self._scan_bits(&arg, start, end, &words[0], &total, &err)
        return total, err

    cdef uint64_t _scan_bits(self, kd_pm_scan_arg *arg, uint64_t start, uint64_t end,
                             uint64_t *words, uint64_t *total, int *err) noexcept nogil:
        cdef long n, k
        cdef uint64_t a, b, cur = start
        while cur < end:
            arg.start = cur
            arg.end = end
            arg.walk_end = 0
            n = self._scan_once(arg, err)
            for k in range(n):
                a = (self.vec[k].start - start) >> 12
                b = (self.vec[k].end - start) >> 12
                total[0] += b - a
                _set_bits(words, a, b)
            if err[0] == EINTR and arg.walk_end > cur:
                err[0] = 0
            if err[0]:
                break
            if arg.walk_end <= cur:       # no progress: nothing left to walk
                break
            cur = arg.walk_end
        return cur

    def scan_regions(self, uint64_t start, uint64_t end, *, uint64_t flags,
                     uint64_t category_mask, uint64_t anyof_mask=0, uint64_t inverted=0):
        """The regions [a, b) of [start, end) matching the categories: (uint64 (n, 2) array, errno)."""
        if start % _PAGE or end % _PAGE or end <= start:
            raise ValueError("start < end, both page aligned")
        cdef kd_pm_scan_arg arg
        memset(&arg, 0, sizeof(arg))
        arg.size = sizeof(arg)
        arg.flags = flags
        arg.vec_len = VEC_LEN
        arg.category_mask = category_mask
        arg.category_anyof_mask = anyof_mask
        arg.category_inverted = inverted
        arg.return_mask = category_mask | anyof_mask
        with self._lock:
            self._check()
            arg.vec = <uintptr_t>self.vec
            return self._scan_regions(&arg, start, end)

    cdef object _scan_regions(self, kd_pm_scan_arg *arg, uint64_t start, uint64_t end):
        cdef long n, k
        cdef int err = 0
        cdef uint64_t cur = start
        cdef uint64_t[:, ::1] chunk
        out = []
        while cur < end:
            arg.start = cur
            arg.end = end
            arg.walk_end = 0
            with nogil:
                n = self._scan_once(arg, &err)
            if n:
                a = np.empty((n, 2), np.uint64)
                chunk = a
                for k in range(n):
                    chunk[k, 0] = self.vec[k].start
                    chunk[k, 1] = self.vec[k].end
                out.append(a)
            if err == EINTR and arg.walk_end > cur:
                err = 0
            if err or arg.walk_end <= cur:
                break
            cur = arg.walk_end
        regions = np.concatenate(out) if out else np.zeros((0, 2), np.uint64)
        return regions, err

    def close(self):
        """Close the pagemap and free the region buffer (after any scan in flight)."""
        with self._lock:
            self._release()

    cdef void _release(self) noexcept:
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1
        if self.vec != NULL:
            munmap(self.vec, self.vec_bytes)
            self.vec = NULL

    def __dealloc__(self):
        self._release()


cdef inline void _set_bits(uint64_t *w, uint64_t a, uint64_t b) noexcept nogil:
    """Set bits [a, b) of w: whole words at once in the middle."""
    while a < b and a & 63:
        w[a >> 6] |= (<uint64_t>1) << (a & 63)
        a += 1
    while a + 64 <= b:
        w[a >> 6] = ~(<uint64_t>0)
        a += 64
    while a < b:
        w[a >> 6] |= (<uint64_t>1) << (a & 63)
        a += 1


def store_loop(const uint64_t[::1] bases, const uint64_t[::1] npages, const uint64_t[::1] addrs,
               const uint8_t[::1] writable, const uint64_t[::1] gfns, values, size_t pos,
               size_t budget):
    """A host vCPU: store a u64 to the first word of each page of `gfns[pos:]`, GIL released.

    The slot table (bases sorted, npages, host addresses, writable) is the
    caller's, held read-locked for the call.  A gfn outside every slot or in
    a read-only one is an MMIO exit, retired with the exit as KVM does.
    Returns (reason, writes done): reason 0 = plan done, 1 = MMIO, 2 = budget.
    `values`: one int, or a uint64 array with one value per gfn.
    """
    cdef size_t nslots = bases.shape[0], n = gfns.shape[0], i = pos, lo, hi, mid, s = 0
    cdef bint have_slot = False
    cdef uint64_t gfn, one = 0
    cdef const uint64_t[::1] vals
    cdef bint per_write = not isinstance(values, (int, np.integer))
    cdef int reason = 0
    if npages.shape[0] != nslots or addrs.shape[0] != nslots or writable.shape[0] != nslots:
        raise ValueError("slot table columns differ in length")
    if pos > n:
        raise ValueError("pos beyond the plan")
    if per_write:
        vals = values
        if vals.shape[0] != n:
            raise ValueError(f"values has {vals.shape[0]} entries, the plan {n}")
    else:
        one = _u64(values, "value")
        vals = np.zeros(1, np.uint64)
    with nogil:
        while i < n:
            if budget and i - pos >= budget:
                reason = 2
                break
            gfn = gfns[i]
            if not have_slot or gfn < bases[s] or gfn - bases[s] >= npages[s]:
                lo = 0
                hi = nslots
                while lo < hi:                  # last slot with base <= gfn
                    mid = (lo + hi) >> 1
                    if bases[mid] <= gfn:
                        lo = mid + 1
                    else:
                        hi = mid
                have_slot = lo > 0 and gfn - bases[lo - 1] < npages[lo - 1] and writable[lo - 1]
                if not have_slot:
                    reason = 1
                    i += 1
                    break
                s = lo - 1
            # A real store: the first one to a protected page takes the
            # write-protect fault.  Relaxed: readers of guest memory (a shadow
            # copy) are ordered by the harvest's page-table lock, not by us.
            kd_store_relaxed_u64(<uint64_t *><uintptr_t>(addrs[s] + (gfn - bases[s]) * _PAGE),
                                 vals[i] if per_write else one)
            i += 1
    return reason, i - pos
