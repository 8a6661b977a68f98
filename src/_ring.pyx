"""KVM's dirty ring: DirtyRing, and collect() over a ring in foreign memory.

Entries are exactly ``struct kvm_dirty_gfn`` from <linux/kvm.h> (ENTRY_DTYPE).
Kernel side (the vCPU and KVM_RESET_DIRTY_RINGS): push, push_many, reset.
User side (the VMM): collect, fetch_index.  The inline C is in _ringcore.pxd
and is shared with the guest write loop in _mmu, which pushes through the
ring's ``_kd_ring`` capsule.

Threads: one producer (the vCPU, or push/push_many), one collector and one
resetter may run at the same time; each releases the GIL in its loop.  Two
collectors (or two resetters) at once raise RuntimeError and change nothing;
so does a collect() of foreign memory that overlaps a ring another thread is
collecting (with collect() or DirtyRing.collect).

User space owns the entries and may write anything into them: reset follows
KVM exactly (see _ringcore.pxd), and nothing written there can make us read
or write outside the ring.

Fault injection (ordering bugs the verifier must catch; off by default):
  publish_early    push stores flags = DIRTY before slot/offset (also in the MMU's push)
  relaxed_collect  collect uses relaxed flag loads/stores (payload read first)
"""
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE,
                             PyBUF_C_CONTIGUOUS, PyBUF_FORMAT)
from cpython.pycapsule cimport PyCapsule_New
from libc.stdint cimport uint32_t, uint64_t, uintptr_t

import operator

import numpy as np

from _atomic cimport kd_load_acquire_u32, kd_load_relaxed_u32, kd_store_relaxed_u32, kd_load_relaxed_u64
from _uapi cimport kvm_dirty_gfn
from _sink cimport kd_sink, kd_owned_capsule, KD_RING_CAPSULE
from _ringcore cimport (kd_ring, kd_ring_used, kd_ring_full, kd_ring_push, kd_ring_push_many,
                        kd_ring_collect, kd_ring_collect_relaxed, kd_ring_reset,
                        kd_batcher, kd_batcher_init, kd_batch_log, kd_batch_log_protect,
                        kd_sink_resolve, KD_SINK_NONE, KD_SINK_C, KD_SINK_PY,
                        KD_PUSH_FULL, KD_RING_F_PUBLISH_EARLY, KD_RESET_MAX)

ENTRY_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
if ENTRY_DTYPE.itemsize != sizeof(kvm_dirty_gfn):
    raise ImportError(f"kvm_dirty_gfn is {sizeof(kvm_dirty_gfn)} bytes, ENTRY_DTYPE {ENTRY_DTYPE.itemsize}")

#: KVM_DIRTY_RING_RSVD_ENTRIES: the soft limit's reserve for pushes in flight.
RSVD_ENTRIES = 64
#: KVM_DIRTY_RING_MAX_ENTRIES
MAX_ENTRIES = 65536
PAGE_SIZE = 4096
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF

# Busy bits: which role is inside a nogil loop (guarded under the GIL).
cdef enum:
    BUSY_PRODUCER = 1
    BUSY_COLLECT = 2
    BUSY_RESET = 4


# Rings being collected right now, as [start, end) byte ranges: a second
# collector of the same entries is refused.  A C table (read and written with
# the GIL held, so check-and-add is one step), not a Python list: a one-entry
# collect must cost well under a microsecond.
cdef enum:
    MAX_CLAIMS = 4096
cdef uintptr_t _claims[2 * MAX_CLAIMS]
cdef size_t _nclaims = 0


cdef int _claim(uintptr_t start, size_t nbytes) except -1:
    """Register [start, start + nbytes) as being collected; RuntimeError if it overlaps one."""
    global _nclaims
    cdef uintptr_t end = start + nbytes
    cdef size_t i
    for i in range(_nclaims):
        if start < _claims[2 * i + 1] and _claims[2 * i] < end:
            raise RuntimeError("another thread is already collecting this ring")
    if _nclaims == MAX_CLAIMS:
        raise RuntimeError(f"more than {MAX_CLAIMS} rings are being collected at once")
    _claims[2 * _nclaims] = start
    _claims[2 * _nclaims + 1] = end
    _nclaims += 1
    return 0


cdef void _unclaim(uintptr_t start) noexcept:
    """Drop the claim starting at ``start`` (GIL held)."""
    global _nclaims
    cdef size_t i
    for i in range(_nclaims):
        if _claims[2 * i] == start:
            _nclaims -= 1
            _claims[2 * i] = _claims[2 * _nclaims]
            _claims[2 * i + 1] = _claims[2 * _nclaims + 1]
            return


class RingFullError(RuntimeError):
    """push refused: every entry of the ring is live (KVM would WARN; we never overwrite)."""


cdef object _uint(object v, str name, object limit):
    """An int argument in [0, limit]; TypeError for non-integers, ValueError out of range."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
    if v < 0 or v > limit:
        raise ValueError(f"{name} {v} out of range [0, {limit}]")
    return v


cdef size_t _max_count(object max_count, size_t cap) except? 0:
    if max_count is None:
        return cap
    if type(max_count) is int and 0 <= max_count <= 0xFFFFFFFF:
        return cap if <size_t>max_count > cap else <size_t>max_count
    mc = _uint(max_count, "max_count", _U64_MAX)
    return cap if mc > cap else <size_t>mc


cdef object _out_array(object a, object dtype, str name):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of {np.dtype(dtype)}, got {type(a).__name__}")
    if a.dtype != dtype or a.ndim != 1 or not a.flags.c_contiguous or not a.flags.writeable:
        raise ValueError(f"{name} must be a writable, C-contiguous 1-D {np.dtype(dtype)} array")
    return a


cdef object _np_empty = np.empty
cdef object _U32 = np.dtype(np.uint32)
cdef object _U64 = np.dtype(np.uint64)
cdef object _ndarray = np.ndarray


cdef int _out_buf(object a, Py_buffer *view, Py_ssize_t itemsize, object dtype, str name) except -1:
    """Export a caller-owned output array (as _out_array accepts it, with its errors);
    the caller releases ``view``.  Checked through the buffer protocol: no
    Python attribute lookups on the hot path."""
    cdef const char *f
    if not isinstance(a, _ndarray):
        _out_array(a, dtype, name)
    try:
        PyObject_GetBuffer(a, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    except (BufferError, ValueError, TypeError):
        _out_array(a, dtype, name)
        raise
    f = view.format
    if f != NULL and (f[0] == c'<' or f[0] == c'=' or f[0] == c'@'):
        f += 1
    if (view.ndim != 1 or view.itemsize != itemsize or (<uintptr_t>view.buf) % itemsize or f == NULL
            or f[1] != 0 or not (f[0] == c'I' or f[0] == c'L' or f[0] == c'Q')):
        PyBuffer_Release(view)
        _out_array(a, dtype, name)
        raise ValueError(f"{name} must be a writable, C-contiguous 1-D {np.dtype(dtype)} array")
    return 0


cdef int _new_buf(object a, Py_buffer *view) except -1:
    """Export an array this module just made (known good)."""
    PyObject_GetBuffer(a, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
    return 0


cdef class DirtyRing:
    """One vCPU's dirty ring: ``entries`` struct kvm_dirty_gfn in a page-aligned, zeroed buffer."""
    cdef kd_ring r
    cdef object _buf             # numpy uint8 array owning the entries
    cdef object _gfns            # ENTRY_DTYPE view of _buf
    cdef uint32_t _fetch         # user space's free-running fetch index
    cdef uint32_t _busy
    cdef readonly uint32_t cpu_dirty_log_size
    cdef uint64_t _collected, _resets, _reset_calls, _batches, _dropped
    cdef bint _relaxed_collect
    cdef bint _closed
    cdef bint _capsule_taken
    # Reset batches a raising Python sink did not protect: offered again,
    # first, by the next reset with a sink (never dropped).
    cdef list _unprotected

    def __cinit__(self, entries, *, cpu_dirty_log_size=0):
        cdef uintptr_t addr
        cdef unsigned char[::1] mv
        entries = _uint(entries, "entries", MAX_ENTRIES)
        cdl = _uint(cpu_dirty_log_size, "cpu_dirty_log_size", MAX_ENTRIES)
        if entries == 0 or entries & (entries - 1):
            raise ValueError(f"entries {entries} is not a power of two")
        if entries < RSVD_ENTRIES + cdl + 1:
            raise ValueError(f"entries {entries} must exceed the reserve {RSVD_ENTRIES} + {cdl}")
        nbytes = entries * sizeof(kvm_dirty_gfn)
        raw = np.zeros(nbytes + PAGE_SIZE, np.uint8)
        addr = raw.ctypes.data
        skip = (-addr) & (PAGE_SIZE - 1)
        self._buf = raw[skip:skip + nbytes]
        mv = self._buf
        self._gfns = self._buf.view(ENTRY_DTYPE)
        self.r.gfns = <kvm_dirty_gfn *>&mv[0]
        self.r.size = entries
        self.r.soft_limit = entries - RSVD_ENTRIES - cdl
        self.cpu_dirty_log_size = cdl
        self._unprotected = []

    # -- lifetime ---------------------------------------------------------
    cdef int _enter(self, uint32_t role) except -1:
        # Called with the GIL held, so check-and-set is atomic w.r.t. other callers.
        if self._closed:
            raise ValueError("the dirty ring is closed")
        if self._busy & role:
            raise RuntimeError("another thread is already in this ring operation")
        self._busy |= role
        return 0

    cdef void _leave(self, uint32_t role) noexcept:
        self._busy &= ~role

    def close(self):
        """Refuse every later call.  The memory stays valid while an MMU or a gfns view holds it."""
        if self._busy:
            raise RuntimeError("the dirty ring is in use by another thread")
        self._closed = True
        if not self._capsule_taken:
            self._buf = None          # gfns views handed out keep their own reference
            self._gfns = None

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def _kd_ring(self):
        """PyCapsule (KD_RING_CAPSULE) for kvmdirty._mmu.VcpuCore.attach_ring; valid while this object lives."""
        if self._closed:
            raise ValueError("the dirty ring is closed")
        self._capsule_taken = True
        return kd_owned_capsule(&self.r, KD_RING_CAPSULE, self)

    # -- kernel side ------------------------------------------------------
    def push(self, slot, offset):
        """Push one dirty page; returns True when the ring is now soft-full.

        Raises RingFullError (changing nothing) when every entry is live.
        Single producer: do not push while a vCPU running on this ring does.
        """
        cdef uint32_t s = _uint(slot, "slot", _U32_MAX)
        cdef uint64_t o = _uint(offset, "offset", _U64_MAX)
        cdef int rc
        self._enter(BUSY_PRODUCER)
        try:
            if kd_ring_full(&self.r):
                raise RingFullError(f"all {self.r.size} entries are live; reset first")
            rc = kd_ring_push(&self.r, s, o)
        finally:
            self._leave(BUSY_PRODUCER)
        return rc == 1

    def push_many(self, const uint32_t[::1] slots not None, const uint64_t[::1] offsets not None):
        """Push slots[i], offsets[i] in order until done or every entry is live; returns the count."""
        cdef size_t n = slots.shape[0], k
        if <size_t>offsets.shape[0] != n:
            raise ValueError(f"slots has {n} entries, offsets {offsets.shape[0]}")
        self._enter(BUSY_PRODUCER)
        try:
            if n == 0:
                return 0
            with nogil:
                k = kd_ring_push_many(&self.r, &slots[0], &offsets[0], n)
        finally:
            self._leave(BUSY_PRODUCER)
        return k

    def reset(self, sink=None):
        """KVM_RESET_DIRTY_RINGS for this ring: free every harvested (RESET) entry, in order.

        As KVM: from reset_index while the entry's flags have RESET, whoever
        wrote them (RESET forged on entries never pushed is reset too, and
        reset_index may then pass dirty_index).  Consecutive entries are
        coalesced into (slot, first_page, 64-bit mask) batches as
        kvm_dirty_ring_reset does, and each batch is write-protected through
        ``sink``: None (nothing protected), an object with a ``_kd_sink``
        capsule (e.g. kvmdirty._mmu.Mmu), or a Python callable
        ``sink(slot, first_page, mask)`` returning False when it drops the
        batch.  Returns the number of entries reset.  The TLB flush is the caller's.

        A Python sink that raises (KeyboardInterrupt included) cannot undo the
        reset: the entries are free and the producer may already reuse them.
        So every batch is still offered to it; then the first exception is
        re-raised with the batches it failed on as ``exc.unprotected_batches``.
        Those batches are also kept on the ring (``unprotected_batches``) and
        offered first to the sink of the next reset that has one, until one
        protects them: a protect is never lost.
        """
        cdef kd_sink *cs = NULL
        # cap stays referenced (and its owner alive) for the whole call.
        cap = getattr(sink, "_kd_sink", None) if sink is not None else None
        cdef int kind = kd_sink_resolve(sink, cap, &cs)
        cdef kd_batcher b
        cdef kd_batch_log log
        cdef uint32_t count, max_count = KD_RESET_MAX
        cdef uint32_t[::1] ls
        cdef uint64_t[::1] lf, lm
        count = 0
        kd_batcher_init(&b, NULL, NULL)
        self._enter(BUSY_RESET)
        try:
            if self._unprotected and kind != KD_SINK_NONE:
                self._reprotect(sink, kind, cs)
            if kind == KD_SINK_C:
                kd_batcher_init(&b, cs.protect, cs.ctx)
            elif kind == KD_SINK_PY:
                a_s = np.empty(self.r.size, np.uint32)
                a_f = np.empty(self.r.size, np.uint64)
                a_m = np.empty(self.r.size, np.uint64)
                ls, lf, lm = a_s, a_f, a_m
                log.slots, log.firsts, log.masks = &ls[0], &lf[0], &lm[0]
                log.n, log.cap = 0, self.r.size
                kd_batcher_init(&b, kd_batch_log_protect, &log)
                # The log holds a batch per entry at most: walk at most size
                # entries (more only if user space forges RESET behind the walk).
                max_count = self.r.size
            with nogil:
                count = kd_ring_reset(&self.r, &b, max_count)
            if kind == KD_SINK_PY:
                # The entries are already free (as in KVM, where reset_index moves
                # before the batch is protected); protect before returning.
                b.dropped += self._offer(sink, a_s, a_f, a_m, log.n)
        finally:
            self._resets += count
            self._reset_calls += 1
            self._batches += b.batches
            self._dropped += b.dropped
            self._leave(BUSY_RESET)
        return count

    cdef int _offer(self, object sink, slots, firsts, masks, size_t n) except -1:
        """Offer batches i < n to a Python sink; keep and report the ones it raised on.

        Returns how many it dropped (returned False).
        """
        cdef int dropped = 0
        cdef size_t i
        failed = []
        first = None
        for i in range(n):
            try:
                if sink(int(slots[i]), int(firsts[i]), int(masks[i])) is False:
                    dropped += 1
            except BaseException as e:
                failed.append((int(slots[i]), int(firsts[i]), int(masks[i])))
                if first is None:
                    first = e
        if first is not None:
            self._unprotected.extend(failed)
            try:
                first.unprotected_batches = failed
            except AttributeError:
                pass
            raise first
        return dropped

    cdef int _reprotect(self, object sink, int kind, kd_sink *cs) except -1:
        """Offer the batches a raising sink left unprotected to this reset's sink, first."""
        pending = self._unprotected
        self._unprotected = []
        if kind == KD_SINK_C:
            for slot, first, mask in pending:
                cs.protect(cs.ctx, slot, first, mask)
            return 0
        self._offer(sink, [p[0] for p in pending], [p[1] for p in pending],
                    [p[2] for p in pending], len(pending))
        return 0

    @property
    def unprotected_batches(self):
        """(slot, first_page, mask) batches a raising Python sink has not protected yet."""
        return list(self._unprotected)

    # -- user side --------------------------------------------------------
    def collect(self, max_count=None, out_slots=None, out_offsets=None):
        """Harvest from fetch_index on, in order, while flags == DIRTY, marking each RESET.

        Returns (slots uint32, offsets uint64).  With ``out_slots`` /
        ``out_offsets`` (both or neither: caller-owned arrays, reused from
        call to call) they are filled and returned (views of the filled part
        when it is shorter); at most min(len(out), max_count) entries.
        """
        cdef Py_buffer vs, vo
        cdef bint have_s = False, have_o = False, relaxed
        cdef size_t cap = self.r.size, n = 0
        cdef uintptr_t start
        if (out_slots is None) != (out_offsets is None):
            raise ValueError("give both out_slots and out_offsets, or neither")
        try:
            if out_slots is not None:
                _out_buf(out_slots, &vs, 4, np.uint32, "out_slots")
                have_s = True
                _out_buf(out_offsets, &vo, 8, np.uint64, "out_offsets")
                have_o = True
                if <size_t>vs.shape[0] < cap:
                    cap = vs.shape[0]
                if <size_t>vo.shape[0] < cap:
                    cap = vo.shape[0]
                a_s, a_o = out_slots, out_offsets
            cap = _max_count(max_count, cap)
            self._enter(BUSY_COLLECT)
            try:
                if out_slots is None:
                    a_s = _np_empty(cap, _U32)
                    a_o = _np_empty(cap, _U64)
                    _new_buf(a_s, &vs)
                    have_s = True
                    _new_buf(a_o, &vo)
                    have_o = True
                if cap == 0:
                    return a_s[:0], a_o[:0]
                start = <uintptr_t>self.r.gfns
                _claim(start, self.r.size * sizeof(kvm_dirty_gfn))
                # Read under the GIL: another thread may flip the knob meanwhile.
                relaxed = self._relaxed_collect
                try:
                    # vs / vo stay exported until the finally below.
                    with nogil:
                        if relaxed:
                            n = kd_ring_collect_relaxed(self.r.gfns, self.r.size, self._fetch,
                                                        <uint32_t *>vs.buf, <uint64_t *>vo.buf, cap)
                        else:
                            n = kd_ring_collect(self.r.gfns, self.r.size, self._fetch,
                                                <uint32_t *>vs.buf, <uint64_t *>vo.buf, cap)
                finally:
                    _unclaim(start)
                self._fetch += <uint32_t>n
                self._collected += n
            finally:
                self._leave(BUSY_COLLECT)
        finally:
            if have_s:
                PyBuffer_Release(&vs)
            if have_o:
                PyBuffer_Release(&vo)
        if <Py_ssize_t>n == len(a_s) and <Py_ssize_t>n == len(a_o):   # filled: no views to make
            return a_s, a_o
        return a_s[:n], a_o[:n]

    property fetch_index:
        """User space's free-running u32 fetch index (it owns it and may move it)."""
        def __get__(self):
            return self._fetch
        def __set__(self, v):
            cdef uint32_t f = _uint(v, "fetch_index", _U32_MAX)   # validate before entering
            self._enter(BUSY_COLLECT)
            self._fetch = f
            self._leave(BUSY_COLLECT)

    # -- views and state --------------------------------------------------
    @property
    def gfns(self):
        """Zero-copy ENTRY_DTYPE view of the entries (user space's mmap)."""
        if self._closed:
            raise ValueError("the dirty ring is closed")
        return self._gfns

    @property
    def entries(self):
        return self.r.size

    @property
    def soft_limit(self):
        return self.r.soft_limit

    @property
    def dirty_index(self):
        return kd_load_relaxed_u32(&self.r.dirty_index)

    @property
    def reset_index(self):
        return kd_load_acquire_u32(&self.r.reset_index)

    @property
    def used(self):
        return kd_ring_used(&self.r)

    @property
    def soft_full(self):
        return kd_ring_used(&self.r) >= self.r.soft_limit

    property publish_early:
        """Fault injection: push stores flags = DIRTY before slot/offset."""
        def __get__(self):
            return bool(kd_load_relaxed_u32(&self.r.faults) & KD_RING_F_PUBLISH_EARLY)
        def __set__(self, bint on):
            # Relaxed: a producer running now reads it relaxed, per push.
            cdef uint32_t f = kd_load_relaxed_u32(&self.r.faults)
            if on:
                f |= KD_RING_F_PUBLISH_EARLY
            else:
                f &= ~KD_RING_F_PUBLISH_EARLY
            kd_store_relaxed_u32(&self.r.faults, f)

    property relaxed_collect:
        """Fault injection: collect uses relaxed loads and stores of flags."""
        def __get__(self):
            return self._relaxed_collect
        def __set__(self, bint on):
            self._relaxed_collect = on

    @property
    def stats(self):
        # Relaxed: the producer (a vCPU thread) counts them with relaxed fetch-adds.
        return {"pushes": kd_load_relaxed_u64(&self.r.pushes), "collected": self._collected,
                "resets": self._resets, "reset_calls": self._reset_calls, "batches": self._batches,
                "dropped": self._dropped, "overflows": kd_load_relaxed_u64(&self.r.overflows)}

    def __repr__(self):
        return (f"DirtyRing(entries={self.r.size}, used={kd_ring_used(&self.r)}, "
                f"soft_limit={self.r.soft_limit}, fetch_index={self._fetch}"
                f"{', closed' if self._closed else ''})")


def collect(entries, fetch_index, max_count=None, out_slots=None, out_offsets=None):
    """Harvest a ring in foreign memory (e.g. the mmap of a real KVM vCPU fd).

    ``entries``: a writable, C-contiguous buffer of a power-of-two number of
    16-byte struct kvm_dirty_gfn, 8-byte aligned: a numpy array of
    ENTRY_DTYPE, or raw bytes (mmap, bytearray, memoryview, uint8 array).
    From ``fetch_index`` (u32) on, in order, while flags == DIRTY: read slot
    and offset, store-release RESET.  Returns (slots, offsets, new_fetch_index).
    ``out_slots`` / ``out_offsets``: as DirtyRing.collect (caller-owned, reused).
    """
    cdef Py_buffer view, vs, vo
    cdef bint have_s = False, have_o = False
    cdef size_t nbytes, count, cap, n = 0
    cdef uint32_t fetch = _uint(fetch_index, "fetch_index", _U32_MAX)
    cdef uintptr_t start
    if (out_slots is None) != (out_offsets is None):
        raise ValueError("give both out_slots and out_offsets, or neither")
    if isinstance(entries, np.ndarray) and entries.dtype != ENTRY_DTYPE and entries.dtype.itemsize != 1:
        raise TypeError(f"entries must have dtype {ENTRY_DTYPE} or be raw bytes, got {entries.dtype}")
    try:
        if out_slots is not None:
            _out_buf(out_slots, &vs, 4, np.uint32, "out_slots")
            have_s = True
            _out_buf(out_offsets, &vo, 8, np.uint64, "out_offsets")
            have_o = True
        try:
            PyObject_GetBuffer(entries, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
        except TypeError:
            raise TypeError(f"entries must be a writable buffer, got {type(entries).__name__}") from None
        except (BufferError, ValueError) as e:
            raise ValueError(f"entries must be a C-contiguous buffer: {e}") from None
        try:
            if view.readonly:
                raise ValueError("entries is read-only; collect stores RESET into it")
            if not isinstance(entries, np.ndarray) and view.itemsize != 1:
                raise TypeError(f"entries must be raw bytes (itemsize 1), got format "
                                f"{(<bytes>view.format).decode() if view.format else 'B'!r}")
            nbytes = <size_t>view.len
            if nbytes == 0 or nbytes % sizeof(kvm_dirty_gfn):
                raise ValueError(f"entries is {nbytes} bytes, not a non-zero multiple of {sizeof(kvm_dirty_gfn)}")
            count = nbytes // sizeof(kvm_dirty_gfn)
            if count & (count - 1) or count > 0xFFFFFFFF:
                raise ValueError(f"entries holds {count} entries, not a power of two")
            if (<uintptr_t>view.buf) & 7:
                raise ValueError("entries must be 8-byte aligned for atomic access")
            cap = count
            if have_s:
                cap = min(cap, <size_t>vs.shape[0], <size_t>vo.shape[0])
                a_s, a_o = out_slots, out_offsets
            cap = _max_count(max_count, cap)
            if not have_s:
                a_s = _np_empty(cap, _U32)
                a_o = _np_empty(cap, _U64)
                _new_buf(a_s, &vs)
                have_s = True
                _new_buf(a_o, &vo)
                have_o = True
            if cap:
                # The Py_buffers stay held (exported) until the finally blocks below.
                start = <uintptr_t>view.buf
                _claim(start, nbytes)
                try:
                    with nogil:
                        n = kd_ring_collect(<kvm_dirty_gfn *>view.buf, <uint32_t>count, fetch,
                                            <uint32_t *>vs.buf, <uint64_t *>vo.buf, cap)
                finally:
                    _unclaim(start)
        finally:
            PyBuffer_Release(&view)
    finally:
        if have_s:
            PyBuffer_Release(&vs)
        if have_o:
            PyBuffer_Release(&vo)
    return a_s[:n], a_o[:n], (fetch + n) & _U32_MAX
