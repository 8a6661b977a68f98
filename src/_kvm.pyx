"""Thin typed wrappers over the /dev/kvm ioctls kvmdirty needs.

Structs and constants come from the system <linux/kvm.h> (never hand-copied
offsets). Every failing ioctl raises kvmdirty.errors.KvmError(errno, NAME).
Arguments are checked here, before any syscall, so that no input can make the
kernel write outside a buffer we own or map guest memory we do not own:
  - guest memory is always a `Mapping` owned by Python (never a raw address);
  - `Vm` records the size of every slot it registered, so KVM_GET_DIRTY_LOG
    always gets a buffer as large as the kernel will fill;
  - a closed object raises KvmError(EBADF); a close() racing an ioctl in
    another thread is deferred until that ioctl returns (the kvm_run page
    stays mapped while KVM_RUN uses it);
  - guest memory stays mapped while the kernel can still write it: a
    `Mapping` registered in a memslot is pinned by its `Vm` until the slot is
    deleted or the kernel VM is gone (the VM fd and every vCPU fd closed: a
    vCPU fd keeps the kernel VM, and its memslots, alive). Until then
    `Mapping.close()` only marks it, so no later mmap can reuse the range and
    receive guest writes;
  - every class refuses direct construction or is valid after it: an object
    made with `cls.__new__(cls)` has no fd and raises EBADF.
All counters here (busy, pins, exports, live vCPUs) are only touched with the
GIL held.
"""
from cpython.buffer cimport PyBUF_WRITABLE
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport errno, EINTR, EBADF, EINVAL, E2BIG
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset
from posix.fcntl cimport open as c_open, O_RDWR, O_CLOEXEC
from posix.mman cimport (mmap, munmap, mprotect, PROT_NONE, PROT_READ, PROT_WRITE, MAP_SHARED,
                         MAP_PRIVATE, MAP_ANONYMOUS, MAP_FAILED, MAP_NORESERVE, MAP_FIXED)
from posix.unistd cimport close as c_close

import numpy as np

from _uapi cimport (KVM_EXIT_IO, KVM_EXIT_MMIO, KVM_EXIT_FAIL_ENTRY,
                    KVM_EXIT_INTERNAL_ERROR)

cdef extern from "<sys/ioctl.h>" nogil:
    # request is unsigned long in glibc; _IOR codes do not fit an int.
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<linux/kvm.h>" nogil:
    const unsigned long KVM_GET_API_VERSION
    const unsigned long KVM_CREATE_VM
    const unsigned long KVM_CHECK_EXTENSION
    const unsigned long KVM_GET_VCPU_MMAP_SIZE
    const unsigned long KVM_SET_USER_MEMORY_REGION
    const unsigned long KVM_ENABLE_CAP
    const unsigned long KVM_CREATE_VCPU
    const unsigned long KVM_GET_DIRTY_LOG
    const unsigned long KVM_CLEAR_DIRTY_LOG
    const unsigned long KVM_RESET_DIRTY_RINGS
    const unsigned long KVM_RUN
    const unsigned long KVM_GET_REGS
    const unsigned long KVM_SET_REGS
    const unsigned long KVM_GET_SREGS
    const unsigned long KVM_SET_SREGS
    const unsigned long KVM_GET_SUPPORTED_CPUID
    const unsigned long KVM_SET_CPUID2
    const int KVM_DIRTY_LOG_PAGE_OFFSET
    const int KVM_EXIT_UNKNOWN

    struct kvm_userspace_memory_region:
        uint32_t slot
        uint32_t flags
        uint64_t guest_phys_addr
        uint64_t memory_size
        uint64_t userspace_addr

    struct kvm_enable_cap:
        uint32_t cap
        uint32_t flags
        uint64_t args[4]

    struct kvm_dirty_log:
        uint32_t slot
        void *dirty_bitmap

    struct kvm_clear_dirty_log:
        uint32_t slot
        uint32_t num_pages
        uint64_t first_page
        void *dirty_bitmap

    struct kvm_cpuid_entry2:
        uint32_t function, index, flags, eax, ebx, ecx, edx

    struct kvm_cpuid2:
        uint32_t nent

    struct kvm_regs:
        uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp
        uint64_t r8, r9, r10, r11, r12, r13, r14, r15
        uint64_t rip, rflags

    struct kvm_segment:
        uint64_t base
        uint32_t limit
        uint16_t selector
        uint8_t type, present, dpl, db, s, l, g, avl, unusable

    struct kvm_dtable:
        uint64_t base
        uint16_t limit

    struct kvm_sregs:
        kvm_segment cs, ds, es, fs, gs, ss, tr, ldt
        kvm_dtable gdt, idt
        uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base

    # Members of kvm_run's anonymous exit union. The struct names below are
    # never emitted: Cython only generates `run->mmio.phys_addr` and the like.
    ctypedef struct _run_mmio "struct kd_unused_mmio":
        uint64_t phys_addr
        uint8_t data[8]
        uint32_t len
        uint8_t is_write
    ctypedef struct _run_io "struct kd_unused_io":
        uint8_t direction
        uint8_t size
        uint16_t port
        uint32_t count
        uint64_t data_offset
    ctypedef struct _run_fail_entry "struct kd_unused_fail":
        uint64_t hardware_entry_failure_reason
        uint32_t cpu
    ctypedef struct _run_internal "struct kd_unused_internal":
        uint32_t suberror
        uint32_t ndata
        uint64_t data[16]
    ctypedef struct _run_hw "struct kd_unused_hw":
        uint64_t hardware_exit_reason

    struct kvm_run:
        uint8_t immediate_exit
        uint32_t exit_reason
        _run_mmio mmio
        _run_io io
        _run_fail_entry fail_entry
        _run_internal internal
        _run_hw hw

cdef enum:
    _PAGE_SIZE = 4096

#: Byte offset of the dirty ring in the vCPU fd (KVM_DIRTY_LOG_PAGE_OFFSET pages).
DIRTY_RING_MMAP_OFFSET = KVM_DIRTY_LOG_PAGE_OFFSET * _PAGE_SIZE

_REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_SEG_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SEG_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s",
               "l", "g", "avl", "unusable")
_CR_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")

cdef uint64_t _U32_MAX = 0xFFFFFFFF


cdef object _kvm_error(int err, str name, str detail=""):
    from kvmdirty.errors import KvmError
    return KvmError(err, name, detail)


cdef uint64_t _u64(object v, str what) except? 0:
    """A Python int in [0, 2**64), or TypeError/ValueError (bool is refused too)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{what} must be an int, not {type(v).__name__}")
    v = int(v)
    if v < 0 or v >= (1 << 64):
        raise ValueError(f"{what} must be in [0, 2**64), got {v}")
    return <uint64_t>v


cdef uint32_t _u32(object v, str what) except? 0:
    cdef uint64_t x = _u64(v, what)
    if x > _U32_MAX:
        raise ValueError(f"{what} must be in [0, 2**32), got {x}")
    return <uint32_t>x


# --------------------------------------------------------------------------
# Memory mappings

cdef class Mapping:
    """An mmap owned by Python, exported through the buffer protocol.

    close() unmaps it at once when no buffer (numpy view, memoryview) is
    exported and no memslot pins it (see the module docstring), and
    otherwise when the last export is released or the last pin dropped, so
    a view that outlives its VM reads valid memory instead of crashing, and
    a guest still running cannot write into a later mmap of the range.
    """
    cdef void *addr
    cdef size_t size
    cdef int exports
    cdef int pins            # memslots of a live kernel VM over this mapping
    cdef bint closing
    cdef bint readonly
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __cinit__(self):
        self.addr = NULL

    def __init__(self, size, *, readonly=False):
        """Anonymous private, MAP_NORESERVE mapping of `size` bytes (rounded up to pages)."""
        if self.addr != NULL:
            raise TypeError("Mapping is already initialized")
        cdef uint64_t n = _u64(size, "size")
        if n == 0:
            raise ValueError("size must be > 0")
        if n > (<uint64_t>1 << 47):
            raise ValueError(f"size {n} is larger than any address space")
        n = (n + _PAGE_SIZE - 1) & ~(<uint64_t>_PAGE_SIZE - 1)
        self._map(n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        self.readonly = readonly

    cdef int _map(self, size_t n, int prot, int flags, int fd, long off) except -1:
        cdef void *p = mmap(NULL, n, prot, flags, fd, off)
        cdef int err = errno
        if p == MAP_FAILED:
            raise _kvm_error(err, "mmap", f"{n} bytes")
        self.addr = p
        self.size = n
        self.shape[0] = <Py_ssize_t>n
        self.strides[0] = 1
        return 0

    cdef void _pin(self) noexcept:
        self.pins += 1

    cdef void _unpin(self) noexcept:
        self.pins -= 1
        if self.pins == 0 and self.exports == 0 and self.closing:
            self._unmap()

    cdef void _unmap(self) noexcept:
        if self.addr != NULL:
            munmap(self.addr, self.size)
            self.addr = NULL

    def __dealloc__(self):
        self._unmap()

    @property
    def address(self) -> int:
        return <uintptr_t>self.addr

    @property
    def size(self) -> int:
        return self.size

    @property
    def closed(self) -> bool:
        return self.addr == NULL or self.closing

    def close(self):
        """Unmap now, or when the last exported buffer is released."""
        self.closing = True
        if self.exports == 0 and self.pins == 0:
            self._unmap()

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if self.addr == NULL or self.closing:
            raise ValueError("mapping is closed")
        if self.readonly and (flags & PyBUF_WRITABLE):
            raise BufferError("mapping is read-only")
        buf.buf = self.addr
        buf.len = <Py_ssize_t>self.size
        buf.readonly = self.readonly
        buf.itemsize = 1
        buf.format = "B"
        buf.ndim = 1
        buf.shape = self.shape
        buf.strides = self.strides
        buf.suboffsets = NULL
        buf.internal = NULL
        buf.obj = self
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self.exports -= 1
        if self.exports == 0 and self.pins == 0 and self.closing:
            self._unmap()

    def __repr__(self):
        state = "closed" if self.closed else f"{self.size} bytes at {self.address:#x}"
        return f"<kvmdirty._kvm.Mapping {state}>"


cdef Mapping _map_fd(int fd, size_t size, long offset, str name):
    cdef Mapping m = Mapping.__new__(Mapping)
    try:
        m._map(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset)
    except OSError as e:
        raise _kvm_error(e.errno, name, f"mmap of {size} bytes at offset {offset:#x}")
    return m


# --------------------------------------------------------------------------
# File descriptors

cdef class _Fd:
    """A KVM file descriptor; ioctls hold it busy so that close() is deferred."""
    cdef int fd
    cdef int busy
    cdef bint close_pending

    def __cinit__(self):
        self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    cdef int _acquire(self, str name) except -1:
        if self.fd < 0 or self.close_pending:
            raise _kvm_error(EBADF, name, f"{type(self).__name__} is closed")
        self.busy += 1
        return self.fd

    cdef void _release(self) noexcept:
        self.busy -= 1
        if self.busy == 0 and self.close_pending:
            self._do_close()

    cdef void _do_close(self) noexcept:
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Close the fd (after any ioctl in flight in another thread returns)."""
        self.close_pending = True
        if self.busy == 0:
            self._do_close()

    @property
    def closed(self) -> bool:
        return self.fd < 0 or self.close_pending

    def fileno(self) -> int:
        if self.closed:
            raise ValueError(f"{type(self).__name__} is closed")
        return self.fd

    cdef long _ioctl_val(self, unsigned long req, unsigned long arg, str name) except -1:
        """An ioctl taking an integer argument; its non-negative result."""
        cdef int fd = self._acquire(name)
        cdef long r
        cdef int err = 0
        try:
            with nogil:
                r = ioctl(fd, req, arg)
                if r < 0:
                    err = errno      # before anything else can overwrite it
            if r < 0:
                raise _kvm_error(err, name)
            return r
        finally:
            self._release()

    cdef long _ioctl_ptr(self, unsigned long req, void *arg, str name) except -1:
        """An ioctl taking a pointer to a struct we own; GIL released."""
        cdef int fd = self._acquire(name)
        cdef long r
        cdef int err = 0
        try:
            with nogil:
                r = ioctl(fd, req, arg)
                if r < 0:
                    err = errno      # before anything else can overwrite it
            if r < 0:
                raise _kvm_error(err, name)
            return r
        finally:
            self._release()


cdef class Kvm(_Fd):
    """The system fd: /dev/kvm."""

    def __init__(self, path="/dev/kvm"):
        if self.fd >= 0 or self.close_pending:
            raise TypeError("Kvm is already initialized")
        if not isinstance(path, str):
            raise TypeError(f"path must be a str, not {type(path).__name__}")
        cdef bytes p = path.encode()
        if b"\0" in p:
            raise ValueError("path contains a NUL byte")
        cdef int fd = c_open(p, O_RDWR | O_CLOEXEC)
        if fd < 0:
            raise _kvm_error(errno, "open", path)
        self.fd = fd

    def api_version(self) -> int:
        return self._ioctl_val(KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap) -> int:
        return self._ioctl_val(KVM_CHECK_EXTENSION, _u32(cap, "cap"), "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        return self._ioctl_val(KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> np.ndarray:
        """KVM_GET_SUPPORTED_CPUID as a CPUID_ENTRY array (what Vcpu.set_cpuid takes)."""
        cdef uint32_t n = 128
        cdef uint8_t[::1] buf
        cdef kvm_cpuid2 *c
        while True:
            raw = np.zeros(8 + n * CPUID_ENTRY.itemsize, dtype=np.uint8)
            buf = raw
            c = <kvm_cpuid2 *>&buf[0]
            c.nent = n
            try:
                self._ioctl_ptr(KVM_GET_SUPPORTED_CPUID, c, "KVM_GET_SUPPORTED_CPUID")
            except OSError as e:
                if e.errno != E2BIG or n >= 65536:
                    raise
                n *= 2
                continue
            return raw[8:8 + c.nent * CPUID_ENTRY.itemsize].view(CPUID_ENTRY).copy()

    def create_vm(self, vm_type=0):
        cdef unsigned long t = _u32(vm_type, "vm_type")
        cdef long mmap_size = self.vcpu_mmap_size()
        cdef Vm vm = Vm.__new__(Vm)
        vm.fd = self._ioctl_val(KVM_CREATE_VM, t, "KVM_CREATE_VM")
        vm.vcpu_mmap_size = mmap_size
        return vm


#: struct kvm_cpuid_entry2, as Kvm.supported_cpuid returns and Vcpu.set_cpuid takes.
CPUID_ENTRY = np.dtype([("function", "<u4"), ("index", "<u4"), ("flags", "<u4"), ("eax", "<u4"),
                        ("ebx", "<u4"), ("ecx", "<u4"), ("edx", "<u4"), ("padding", "<u4", (3,))])
assert CPUID_ENTRY.itemsize == sizeof(kvm_cpuid_entry2)


cdef class Vm(_Fd):
    """A VM fd (from Kvm.create_vm). Tracks the memslots it registered.

    The kernel VM lives until this fd and every vCPU fd are closed; until
    then every slot's Mapping stays pinned (mapped), see the module docstring.
    """
    cdef dict slots          # u32 slot id -> (npages, Mapping) for every live slot
    cdef dict pending        # vCPU id -> Vcpu the kernel created but we failed to set up
    cdef long vcpu_mmap_size
    cdef int live_vcpus      # vCPU fds open on this VM (each keeps the kernel VM alive)

    def __cinit__(self):
        self.slots = {}
        self.pending = {}

    def __init__(self):
        raise TypeError("use Kvm.create_vm()")

    cdef void _do_close(self) noexcept:
        _Fd._do_close(self)
        for v in self.pending.values():
            (<Vcpu>v)._do_close()      # never handed out: nobody else holds its fd
        self.pending = {}
        self._maybe_release_memory()

    cdef void _vcpu_gone(self) noexcept:
        self.live_vcpus -= 1
        self._maybe_release_memory()

    cdef void _maybe_release_memory(self) noexcept:
        """Unpin guest memory once the kernel VM is gone (no fd left that reaches it)."""
        if self.fd >= 0 or self.live_vcpus > 0:
            return
        slots, self.slots = self.slots, {}
        for _npages, m in slots.values():
            (<Mapping>m)._unpin()

    def check_extension(self, cap) -> int:
        return self._ioctl_val(KVM_CHECK_EXTENSION, _u32(cap, "cap"), "KVM_CHECK_EXTENSION")

    def enable_cap(self, cap, args=(), flags=0) -> None:
        cdef kvm_enable_cap ec
        cdef int i
        memset(&ec, 0, sizeof(ec))
        ec.cap = _u32(cap, "cap")
        ec.flags = _u32(flags, "flags")
        args = tuple(args)
        if len(args) > 4:
            raise ValueError(f"at most 4 args, got {len(args)}")
        for i in range(len(args)):
            ec.args[i] = _u64(args[i], f"args[{i}]")
        self._ioctl_ptr(KVM_ENABLE_CAP, &ec, "KVM_ENABLE_CAP")

    def set_user_memory_region(self, slot, flags, guest_phys_addr, memory_size,
                               Mapping memory=None) -> None:
        """KVM_SET_USER_MEMORY_REGION over `memory` (None only to delete: size 0)."""
        cdef kvm_userspace_memory_region r
        memset(&r, 0, sizeof(r))
        r.slot = _u32(slot, "slot")
        r.flags = _u32(flags, "flags")
        r.guest_phys_addr = _u64(guest_phys_addr, "guest_phys_addr")
        r.memory_size = _u64(memory_size, "memory_size")
        if r.memory_size != 0:
            if memory is None or memory.closed:
                raise ValueError("a non-empty slot needs an open Mapping")
            if r.memory_size > memory.size:
                raise ValueError(f"memory_size {r.memory_size} exceeds the mapping ({memory.size} bytes)")
            r.userspace_addr = <uintptr_t>memory.addr
            # Pinned before the GIL is released for the ioctl: a close() of the
            # mapping in another thread meanwhile cannot unmap what the kernel
            # is registering.
            memory._pin()
        try:
            self._ioctl_ptr(KVM_SET_USER_MEMORY_REGION, &r, "KVM_SET_USER_MEMORY_REGION")
        except BaseException:
            if r.memory_size != 0:
                memory._unpin()
            raise
        # Deleted: the kernel has waited for every vCPU to leave the old slot
        # (synchronize_srcu) before returning, so its memory may be unpinned.
        old = self.slots.pop(r.slot, None)
        if r.memory_size != 0:
            self.slots[r.slot] = (r.memory_size // _PAGE_SIZE, memory)
        if old is not None:
            (<Mapping>old[1])._unpin()
        self._maybe_release_memory()     # the VM may have been closed during the ioctl

    def get_dirty_log(self, slot, out=None) -> np.ndarray:
        """KVM_GET_DIRTY_LOG into a new uint64 array of ceil(npages/64) words,
        or into ``out`` (a caller-owned uint64 array the caller has checked:
        kvmdirty.kvm.KvmVM.get_dirty_log), which is returned."""
        cdef kvm_dirty_log log
        cdef uint32_t s = _u32(slot, "slot")
        cdef uint64_t[::1] view
        entry = self.slots.get(s)
        # An unknown slot cannot succeed (only this object creates slots on this
        # fd): the kernel fails before copying, so one scratch word is enough.
        nwords = 1 if entry is None else max(1, (entry[0] + 63) // 64)
        if out is not None and entry is not None and len(out) >= nwords:
            view = out
        else:
            out = np.zeros(nwords, dtype=np.uint64)
            view = out
        memset(&log, 0, sizeof(log))
        log.slot = s
        log.dirty_bitmap = &view[0]
        self._ioctl_ptr(KVM_GET_DIRTY_LOG, &log, "KVM_GET_DIRTY_LOG")
        return out

    def clear_dirty_log(self, slot, first_page, num_pages, bitmap) -> None:
        """KVM_CLEAR_DIRTY_LOG; bitmap: ceil(num_pages/64) uint64 words (fewer: EFAULT, as the kernel)."""
        cdef kvm_clear_dirty_log c
        memset(&c, 0, sizeof(c))
        c.slot = _u32(slot, "slot")
        c.first_page = _u64(first_page, "first_page")
        c.num_pages = _u32(num_pages, "num_pages")
        cdef const uint64_t[::1] words = _as_words(bitmap)
        cdef uint64_t have = words.shape[0]
        cdef Mapping guard = None
        # The kernel reads ALIGN(num_pages, 64) / 8 bytes from the bitmap (after
        # its slot and range checks). A short bitmap is copied to end exactly at
        # an inaccessible page, so the kernel fails with its own EFAULT, in its
        # own order, without reading past memory we own.
        if have < (<uint64_t>c.num_pages + 63) // 64:
            guard = _guarded_copy(words)
            c.dirty_bitmap = <char *>guard.addr + guard.size - _PAGE_SIZE - have * 8
        elif have:
            c.dirty_bitmap = <void *>&words[0]
        self._ioctl_ptr(KVM_CLEAR_DIRTY_LOG, &c, "KVM_CLEAR_DIRTY_LOG")

    def reset_dirty_rings(self) -> int:
        return self._ioctl_val(KVM_RESET_DIRTY_RINGS, 0, "KVM_RESET_DIRTY_RINGS")

    def create_vcpu(self, vcpu_id):
        """KVM_CREATE_VCPU with its kvm_run page mapped.

        The address range of the kvm_run mapping is reserved before the ioctl,
        so that running out of address space fails before the kernel creates
        the vCPU. If mapping still fails afterwards, the kernel's vCPU (which
        can never be destroyed) is kept, and a retry with the same id returns
        it: a failed call leaves nothing visible behind.
        """
        cdef unsigned long i = _u32(vcpu_id, "vcpu_id")
        cdef Vcpu v = self.pending.pop(i, None)
        if v is not None:
            try:
                v._map_run(self.vcpu_mmap_size, NULL)
            except BaseException:
                self.pending[i] = v
                raise
            return v
        if self.vcpu_mmap_size <= 0:
            raise _kvm_error(EBADF, "KVM_CREATE_VCPU", "Vm is closed")
        cdef void *reserve = mmap(NULL, self.vcpu_mmap_size, PROT_NONE,
                                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if reserve == MAP_FAILED:
            raise _kvm_error(errno, "KVM_CREATE_VCPU", "reserving the kvm_run mapping")
        v = Vcpu.__new__(Vcpu)
        try:
            v.fd = self._ioctl_val(KVM_CREATE_VCPU, i, "KVM_CREATE_VCPU")
        except BaseException:
            munmap(reserve, self.vcpu_mmap_size)
            raise
        v.vm = self
        self.live_vcpus += 1
        try:
            v._map_run(self.vcpu_mmap_size, reserve)
        except BaseException:
            self.pending[i] = v
            raise
        return v


cdef Mapping _guarded_copy(const uint64_t[::1] words):
    """`words` copied to end right before a PROT_NONE page."""
    cdef size_t n = words.shape[0]
    cdef size_t data = (n * 8 + _PAGE_SIZE - 1) // _PAGE_SIZE * _PAGE_SIZE
    cdef Mapping m = Mapping(data + _PAGE_SIZE)
    cdef char *end = <char *>m.addr + data
    if mprotect(end, _PAGE_SIZE, PROT_NONE) != 0:
        raise _kvm_error(errno, "mprotect")
    if n:
        memcpy(end - n * 8, &words[0], n * 8)
    return m


cdef object _as_words(object bitmap):
    """A C-contiguous 1-D uint64 copy/view of `bitmap`; never a lossy cast."""
    arr = np.asarray(bitmap)
    if arr.ndim != 1:
        raise ValueError(f"bitmap must be 1-D, got {arr.ndim} dimensions")
    if arr.dtype != np.uint64:
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"bitmap must hold uint64 words, not {arr.dtype}")
        if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and (arr < 0).any():
            raise ValueError("bitmap words must be non-negative")
        arr = arr.astype(np.uint64)
    return np.ascontiguousarray(arr)


cdef class Vcpu(_Fd):
    """A vCPU fd with its kvm_run page mapped."""
    cdef kvm_run *run_page
    cdef size_t run_size
    cdef Vm vm               # the VM this vCPU fd keeps alive in the kernel

    def __init__(self):
        raise TypeError("use Vm.create_vcpu()")

    cdef int _map_run(self, long size, void *reserved) except -1:
        """mmap kvm_run, over `reserved` (an address range of `size` bytes we own) if given."""
        cdef int flags = MAP_SHARED | (MAP_FIXED if reserved != NULL else 0)
        cdef void *p = mmap(reserved, size, PROT_READ | PROT_WRITE, flags, self.fd, 0)
        cdef int err = errno
        if p == MAP_FAILED:
            if reserved != NULL:
                munmap(reserved, size)
            raise _kvm_error(err, "KVM_CREATE_VCPU", "mmap of kvm_run")
        self.run_page = <kvm_run *>p
        self.run_size = size
        return 0

    cdef void _do_close(self) noexcept:
        if self.run_page != NULL:
            munmap(self.run_page, self.run_size)
            self.run_page = NULL
        cdef bint had_fd = self.fd >= 0
        _Fd._do_close(self)
        if had_fd and self.vm is not None:
            self.vm._vcpu_gone()

    def __dealloc__(self):
        self._do_close()

    def run(self) -> int:
        """KVM_RUN with the GIL released, retried on EINTR; the exit reason.

        Python signal handlers run between retries (so Ctrl-C raises here, and
        the vCPU stays resumable).
        """
        cdef int fd = self._acquire("KVM_RUN")
        cdef int r, err
        try:
            if self.run_page == NULL:
                raise _kvm_error(EBADF, "KVM_RUN", "no kvm_run page")
            while True:
                with nogil:
                    r = ioctl(fd, KVM_RUN, 0)
                    err = errno
                if r == 0:
                    return self.run_page.exit_reason
                if err != EINTR:
                    raise _kvm_error(err, "KVM_RUN")
                PyErr_CheckSignals()
        finally:
            self._release()

    def exit_info(self) -> dict:
        """Details of the last exit from kvm_run (MMIO, IO, failures)."""
        cdef int fd = self._acquire("KVM_RUN")
        cdef kvm_run *run = self.run_page
        try:
            if run == NULL:
                raise _kvm_error(EBADF, "KVM_RUN", "no kvm_run page")
            d = {"exit_reason": run.exit_reason}
            if run.exit_reason == KVM_EXIT_MMIO:
                d.update(phys_addr=run.mmio.phys_addr, len=run.mmio.len,
                         is_write=bool(run.mmio.is_write),
                         data=bytes(run.mmio.data[:min(run.mmio.len, 8)]))
            elif run.exit_reason == KVM_EXIT_IO:
                d.update(port=run.io.port, direction=run.io.direction, size=run.io.size,
                         count=run.io.count)
            elif run.exit_reason == KVM_EXIT_FAIL_ENTRY:
                d.update(hardware_entry_failure_reason=run.fail_entry.hardware_entry_failure_reason,
                         cpu=run.fail_entry.cpu)
            elif run.exit_reason == KVM_EXIT_INTERNAL_ERROR:
                n = min(run.internal.ndata, 16)
                d.update(suberror=run.internal.suberror,
                         data=[run.internal.data[i] for i in range(n)])
            elif run.exit_reason == KVM_EXIT_UNKNOWN:
                d.update(hardware_exit_reason=run.hw.hardware_exit_reason)
            return d
        finally:
            self._release()

    def get_regs(self) -> dict:
        cdef kvm_regs r
        self._ioctl_ptr(KVM_GET_REGS, &r, "KVM_GET_REGS")
        return _regs_to_dict(&r)

    def set_regs(self, regs) -> None:
        """KVM_SET_REGS; registers not named in `regs` keep their current value."""
        cdef kvm_regs r
        _check_keys(regs, _REG_NAMES, "register")
        values = {k: _u64(v, k) for k, v in regs.items()}
        self._ioctl_ptr(KVM_GET_REGS, &r, "KVM_GET_REGS")
        _dict_to_regs(values, &r)
        self._ioctl_ptr(KVM_SET_REGS, &r, "KVM_SET_REGS")

    def set_cpuid(self, entries) -> None:
        """KVM_SET_CPUID2 with `entries`, a CPUID_ENTRY array (e.g. Kvm.supported_cpuid())."""
        arr = np.asarray(entries)
        if arr.dtype != CPUID_ENTRY or arr.ndim != 1:
            raise TypeError("entries must be a 1-D CPUID_ENTRY array")
        raw = np.zeros(8 + arr.nbytes, dtype=np.uint8)
        raw[8:] = np.ascontiguousarray(arr).view(np.uint8)
        cdef uint8_t[::1] buf = raw
        (<kvm_cpuid2 *>&buf[0]).nent = <uint32_t>arr.shape[0]
        self._ioctl_ptr(KVM_SET_CPUID2, &buf[0], "KVM_SET_CPUID2")

    def get_sregs(self) -> dict:
        cdef kvm_sregs s
        self._ioctl_ptr(KVM_GET_SREGS, &s, "KVM_GET_SREGS")
        return _sregs_to_dict(&s)

    def set_sregs(self, sregs) -> None:
        """KVM_SET_SREGS; fields not named in `sregs` keep their current value.

        Segments are dicts of kvm_segment fields, gdt/idt dicts of base/limit.
        """
        cdef kvm_sregs s
        _check_keys(sregs, _SEG_NAMES + ("gdt", "idt") + _CR_NAMES, "sreg")
        for k, v in sregs.items():
            if k in _SEG_NAMES:
                _check_keys(v, _SEG_FIELDS, f"{k} field")
            elif k in ("gdt", "idt"):
                _check_keys(v, ("base", "limit"), f"{k} field")
        self._ioctl_ptr(KVM_GET_SREGS, &s, "KVM_GET_SREGS")
        _dict_to_sregs(sregs, &s)
        self._ioctl_ptr(KVM_SET_SREGS, &s, "KVM_SET_SREGS")

    def map_dirty_ring(self, nbytes) -> Mapping:
        """mmap the vCPU's dirty ring (MAP_SHARED, read/write) of `nbytes` bytes."""
        cdef uint64_t n = _u64(nbytes, "nbytes")
        if n == 0 or n % _PAGE_SIZE or n > (<uint64_t>1 << 32):
            raise ValueError(f"ring size {n} must be a non-zero multiple of the page size")
        cdef int fd = self._acquire("mmap dirty ring")
        try:
            return _map_fd(fd, n, DIRTY_RING_MMAP_OFFSET, "mmap dirty ring")
        finally:
            self._release()


cdef _check_keys(object d, tuple allowed, str what):
    if not isinstance(d, dict):
        raise TypeError(f"expected a dict of {what}s, not {type(d).__name__}")
    for k in d:
        if k not in allowed:
            raise ValueError(f"unknown {what} {k!r}")


cdef dict _regs_to_dict(kvm_regs *r):
    return dict(rax=r.rax, rbx=r.rbx, rcx=r.rcx, rdx=r.rdx, rsi=r.rsi, rdi=r.rdi,
                rsp=r.rsp, rbp=r.rbp, r8=r.r8, r9=r.r9, r10=r.r10, r11=r.r11,
                r12=r.r12, r13=r.r13, r14=r.r14, r15=r.r15, rip=r.rip, rflags=r.rflags)


cdef _dict_to_regs(dict d, kvm_regs *r):
    r.rax = d.get("rax", r.rax); r.rbx = d.get("rbx", r.rbx)
    r.rcx = d.get("rcx", r.rcx); r.rdx = d.get("rdx", r.rdx)
    r.rsi = d.get("rsi", r.rsi); r.rdi = d.get("rdi", r.rdi)
    r.rsp = d.get("rsp", r.rsp); r.rbp = d.get("rbp", r.rbp)
    r.r8 = d.get("r8", r.r8); r.r9 = d.get("r9", r.r9)
    r.r10 = d.get("r10", r.r10); r.r11 = d.get("r11", r.r11)
    r.r12 = d.get("r12", r.r12); r.r13 = d.get("r13", r.r13)
    r.r14 = d.get("r14", r.r14); r.r15 = d.get("r15", r.r15)
    r.rip = d.get("rip", r.rip); r.rflags = d.get("rflags", r.rflags)


cdef dict _seg_to_dict(kvm_segment *s):
    return dict(base=s.base, limit=s.limit, selector=s.selector, type=s.type,
                present=s.present, dpl=s.dpl, db=s.db, s=s.s, l=s.l, g=s.g,
                avl=s.avl, unusable=s.unusable)


cdef _dict_to_seg(dict d, kvm_segment *s, str name):
    s.base = _u64(d.get("base", s.base), name + ".base")
    s.limit = _u32(d.get("limit", s.limit), name + ".limit")
    sel = _u32(d.get("selector", s.selector), name + ".selector")
    if sel > 0xFFFF:
        raise ValueError(f"{name}.selector must fit 16 bits")
    s.selector = <uint16_t>sel
    s.type = _u8(d.get("type", s.type), name + ".type")
    s.present = _u8(d.get("present", s.present), name + ".present")
    s.dpl = _u8(d.get("dpl", s.dpl), name + ".dpl")
    s.db = _u8(d.get("db", s.db), name + ".db")
    s.s = _u8(d.get("s", s.s), name + ".s")
    s.l = _u8(d.get("l", s.l), name + ".l")
    s.g = _u8(d.get("g", s.g), name + ".g")
    s.avl = _u8(d.get("avl", s.avl), name + ".avl")
    s.unusable = _u8(d.get("unusable", s.unusable), name + ".unusable")


cdef uint8_t _u8(object v, str what) except? 0:
    cdef uint64_t x = _u64(v, what)
    if x > 0xFF:
        raise ValueError(f"{what} must fit 8 bits, got {x}")
    return <uint8_t>x


cdef dict _sregs_to_dict(kvm_sregs *s):
    return dict(cs=_seg_to_dict(&s.cs), ds=_seg_to_dict(&s.ds), es=_seg_to_dict(&s.es),
                fs=_seg_to_dict(&s.fs), gs=_seg_to_dict(&s.gs), ss=_seg_to_dict(&s.ss),
                tr=_seg_to_dict(&s.tr), ldt=_seg_to_dict(&s.ldt),
                gdt=dict(base=s.gdt.base, limit=s.gdt.limit),
                idt=dict(base=s.idt.base, limit=s.idt.limit),
                cr0=s.cr0, cr2=s.cr2, cr3=s.cr3, cr4=s.cr4, cr8=s.cr8,
                efer=s.efer, apic_base=s.apic_base)


cdef _dict_to_sregs(dict d, kvm_sregs *s):
    # Validate every value into a copy first: a bad value changes nothing.
    cdef kvm_sregs t = s[0]
    if "cs" in d: _dict_to_seg(d["cs"], &t.cs, "cs")
    if "ds" in d: _dict_to_seg(d["ds"], &t.ds, "ds")
    if "es" in d: _dict_to_seg(d["es"], &t.es, "es")
    if "fs" in d: _dict_to_seg(d["fs"], &t.fs, "fs")
    if "gs" in d: _dict_to_seg(d["gs"], &t.gs, "gs")
    if "ss" in d: _dict_to_seg(d["ss"], &t.ss, "ss")
    if "tr" in d: _dict_to_seg(d["tr"], &t.tr, "tr")
    if "ldt" in d: _dict_to_seg(d["ldt"], &t.ldt, "ldt")
    for name in ("gdt", "idt"):
        if name in d:
            base = _u64(d[name].get("base", t.gdt.base if name == "gdt" else t.idt.base), name + ".base")
            lim = _u32(d[name].get("limit", t.gdt.limit if name == "gdt" else t.idt.limit), name + ".limit")
            if lim > 0xFFFF:
                raise ValueError(f"{name}.limit must fit 16 bits")
            if name == "gdt":
                t.gdt.base = base; t.gdt.limit = <uint16_t>lim
            else:
                t.idt.base = base; t.idt.limit = <uint16_t>lim
    t.cr0 = _u64(d.get("cr0", t.cr0), "cr0")
    t.cr2 = _u64(d.get("cr2", t.cr2), "cr2")
    t.cr3 = _u64(d.get("cr3", t.cr3), "cr3")
    t.cr4 = _u64(d.get("cr4", t.cr4), "cr4")
    t.cr8 = _u64(d.get("cr8", t.cr8), "cr8")
    t.efer = _u64(d.get("efer", t.efer), "efer")
    t.apic_base = _u64(d.get("apic_base", t.apic_base), "apic_base")
    s[0] = t
