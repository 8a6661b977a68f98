"""Dirty-bitmap word kernels and DirtyBitmap.

A bitmap is one bit per page in little-endian 64-bit words, as KVM's
memslot->dirty_bitmap.  The kernels work on any C-contiguous, 8-byte aligned
uint64 buffer (numpy array, mmap through memoryview.cast('Q'), ...).  They
validate everything first, then run with the GIL released; each shared word
is read-modified-written atomically (src/_atomic.h), zero words are skipped
with a vectorised hint read (src/_scan.h).

Harvest protocol (as kvm_get_dirty_log_protect; the caller owns steps 3-4):
  1. Exchange each non-zero word with 0 (kd_xchg_u64): the bits it returns
     belong to this harvest; a bit a vCPU sets afterwards (its fetch-or in
     mark-dirty) belongs to the next one.
  2. Hand each (word, mask) to the sink, which write-protects exactly those
     pages (one atomic and-not per word of W bits).
  3. The caller flushes every vCPU's TLB, then
  4. returns the snapshot to user space, which copies the pages after that.
  Between 2 and 3 a vCPU may still write a page through a stale writable TLB
  entry without faulting, so that write is not logged.  That is safe: the page
  is already in this harvest's snapshot (step 1 came first) and user space
  reads its content only after step 3, so it sees the write; every write after
  step 3 faults and is logged for the next harvest.
Clear protocol (KVM_CLEAR_DIRTY_LOG): the same, with step 1 a fetch-and-not
of the user's mask, of which only bits that really were set count.

Error paths: a harvest that fails part-way (a raising Python sink, including
KeyboardInterrupt; MemoryError growing an output) puts every bit it took back
into the words (atomic fetch-or) before raising: bits are never dropped.  The
sink may have seen some of them; they are simply harvested again.

Buffer lifetime: every buffer a GIL-free loop touches is held as a typed
memoryview (an export) for the whole loop, so another thread cannot resize
or close it meanwhile: it gets BufferError instead.
"""
cimport cython
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_CheckExact
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from cython.view cimport array as cvarray
from libc.string cimport memcpy, memset

import numpy as np

from _atomic cimport (kd_xchg_u64, kd_fetch_or_u64, kd_fetch_andnot_u64, kd_load_relaxed_u64,
                      kd_load_acquire_u64, kd_popcount64, kd_ctz64)
from _scan cimport kd_next_nonzero, kd_nonzero_mask16, kd_ctz32
from _sink cimport kd_sink, KD_SINK_CAPSULE

# How a harvest hands (word, mask) batches on.
cdef enum SinkKind:
    SINK_NONE = 0
    SINK_WORDS = 1      # a writable-bits array: and-not the mask into it
    SINK_C = 2          # a kd_sink from a capsule (e.g. the simulated MMU)
    SINK_PY = 3         # a Python callable(word_index, mask), GIL held


cdef int _check_aligned(const uint64_t[::1] w, str name) except -1:
    if w.shape[0] and (<uintptr_t>&w[0]) % 8:
        raise ValueError(f"{name} must be 8-byte aligned for atomic access")
    return 0


cdef inline size_t nwords_for(uint64_t npages) noexcept nogil:
    return <size_t>((npages + 63) >> 6)


# Only this module builds a _Sink (with this token): a half-built one from
# Python could not be used anyway (it has no Python methods), but refuse it.
cdef object _SINK_TOKEN = object()


@cython.auto_pickle(False)
@cython.final
cdef class _Sink:
    """A resolved write-protect sink (validated at the def boundary)."""
    cdef SinkKind kind
    cdef uint64_t *words
    cdef size_t nwords
    cdef kd_sink *c
    cdef object py
    cdef object keep
    # The buffer sink's export: held as long as this _Sink (the whole call),
    # so `words` stays valid through the GIL-free loop.
    cdef uint64_t[::1] wv

    def __cinit__(self, token=None):
        if token is not _SINK_TOKEN:
            raise TypeError("_Sink is internal to kvmdirty._bitmap and cannot be built directly")

    cdef int resolve(self, object sink, size_t nwords) except -1:
        cdef uint64_t[::1] w
        self.keep = sink
        if sink is None:
            self.kind = SINK_NONE
            return 0
        cap = getattr(sink, "_kd_sink", None)
        if cap is not None and PyCapsule_CheckExact(cap):
            self.c = <kd_sink *>PyCapsule_GetPointer(cap, KD_SINK_CAPSULE)
            self.keep = cap      # the capsule keeps the sink's owner alive
            self.kind = SINK_C
            return 0
        if callable(sink):
            self.kind = SINK_PY
            self.py = sink
            return 0
        try:
            w = sink
        except (TypeError, ValueError, BufferError) as e:
            raise TypeError("sink must be None, a writable uint64 buffer, "
                            "an object with a kd_sink capsule, or a callable(word, mask)") from e
        _check_aligned(w, "sink")
        if <size_t>w.shape[0] < nwords:
            raise ValueError(f"sink buffer has {w.shape[0]} words, needs {nwords}")
        self.kind = SINK_WORDS
        self.wv = w
        self.words = &w[0] if w.shape[0] else NULL
        self.nwords = w.shape[0]
        return 0


cdef inline void _sink_protect(_Sink s, uint32_t slot, size_t i, uint64_t mask) noexcept nogil:
    if s.kind == SINK_WORDS:
        # Masked write-protect: one atomic and-not of the mask into the W bits.
        kd_fetch_andnot_u64(&s.words[i], mask)
    elif s.kind == SINK_C:
        s.c.protect(s.c.ctx, slot, <uint64_t>i * 64, mask)


cdef void _put_back(uint64_t *w, const uint64_t *taken, size_t n) noexcept nogil:
    """Error path: or the bits a failed call took back into the words."""
    cdef size_t i
    for i in range(n):
        if taken[i]:
            # fetch-or, like a vCPU's mark-dirty: bits set meanwhile are kept.
            kd_fetch_or_u64(&w[i], taken[i])


cdef inline size_t _harvest_word(uint64_t *w, uint64_t *snap, size_t j, _Sink s,
                                 uint32_t slot) noexcept nogil:
    # xchg: the one access that decides what this harvest owns; a bit
    # set after it belongs to the next harvest.  Pairs with the vCPU's
    # fetch-or in mark-dirty.
    cdef uint64_t mask = kd_xchg_u64(&w[j], 0)
    snap[j] = mask
    if mask:
        _sink_protect(s, slot, j, mask)
        return <size_t>kd_popcount64(mask)
    return 0


cdef size_t _harvest(uint64_t *w, uint64_t *snap, size_t n, bint zeroed,
                     _Sink s, uint32_t slot) noexcept nogil:
    # 16 words at a time: one branch per block, the block's dirty words
    # visited through its non-zero mask (src/_scan.h).
    cdef size_t i = 0, pages = 0
    cdef unsigned bm
    if not zeroed:
        # A reused snapshot (the caller's private buffer): one memset first,
        # the fastest way to make its clean words 0 (faster than a store or a
        # read per word in the scan below, measured).
        memset(snap, 0, n * sizeof(uint64_t))
    while i + 16 <= n:
        bm = kd_nonzero_mask16(&w[i])
        while bm:
            pages += _harvest_word(w, snap, i + <size_t>kd_ctz32(bm), s, slot)
            bm &= bm - 1
        i += 16
    while i < n:
        if kd_load_relaxed_u64(&w[i]):
            pages += _harvest_word(w, snap, i, s, slot)
        i += 1
    return pages


def harvest(uint64_t[::1] words not None, uint64_t[::1] snapshot not None,
            sink=None, *, bint zeroed=False, unsigned int slot=0):
    """Exchange every non-zero word with 0 into ``snapshot``; return the dirty page count.

    Each ``(word_index, mask)`` harvested is handed to ``sink``: a writable
    uint64 buffer of write bits (the mask is and-not'ed into it), an object
    with a ``_kd_sink`` capsule (called as ``protect(slot, word*64, mask)``),
    or a Python callable ``sink(word_index, mask)``.  With ``zeroed=True`` the
    snapshot is known to be all zeros and only dirty words are written;
    without it the snapshot may hold anything (a buffer reused from call to
    call) and ends up equal to the harvested words.
    If the sink raises (KeyboardInterrupt included), every bit taken is put
    back into ``words`` before the exception propagates (the snapshot's
    content is then unspecified).
    """
    cdef size_t n = words.shape[0], i, pages = 0
    cdef uint64_t mask
    cdef _Sink s = _Sink(_SINK_TOKEN)
    _check_aligned(words, "words")
    _check_aligned(snapshot, "snapshot")
    if <size_t>snapshot.shape[0] != n:
        raise ValueError(f"snapshot has {snapshot.shape[0]} words, words has {n}")
    s.resolve(sink, n)
    if n == 0:
        return 0
    if s.kind != SINK_PY:
        with nogil:
            pages = _harvest(&words[0], &snapshot[0], n, zeroed, s, slot)
        return pages
    i = 0
    try:
        while i < n:
            mask = kd_xchg_u64(&words[i], 0) if kd_load_relaxed_u64(&words[i]) else 0
            # Every word, also with zeroed (then it was 0 already): the error
            # path puts back exactly snapshot[:i + 1].
            snapshot[i] = mask
            if mask:
                pages += kd_popcount64(mask)
                s.py(i, mask)
            i += 1
    except BaseException:
        _put_back(&words[0], &snapshot[0], i + 1 if i < n else n)
        raise
    return pages


def clear_masked(uint64_t[::1] words not None, const uint64_t[::1] masks not None,
                 size_t first_word=0, uint64_t[::1] out=None, sink=None,
                 *, unsigned int slot=0):
    """Atomically clear ``masks[i]`` from ``words[first_word + i]``.

    Only bits that really were set count: they are written to ``out`` (if
    given), handed to ``sink`` (as in :func:`harvest`) and their number is returned.
    If a Python sink raises, every bit cleared is set again before the
    exception propagates (``out`` is then unspecified).
    """
    cdef size_t n = masks.shape[0], i, pages = 0
    cdef uint64_t m, cleared
    cdef _Sink s = _Sink(_SINK_TOKEN)
    _check_aligned(words, "words")
    _check_aligned(masks, "masks")
    if out is not None:
        _check_aligned(out, "out")
    if first_word > <size_t>words.shape[0] or n > <size_t>words.shape[0] - first_word:
        raise ValueError(f"masks[{n}] at word {first_word} runs past {words.shape[0]} words")
    if out is not None and <size_t>out.shape[0] < n:
        raise ValueError(f"out has {out.shape[0]} words, needs {n}")
    s.resolve(sink, words.shape[0])
    if s.kind == SINK_WORDS and s.nwords < first_word + n:
        raise ValueError("sink buffer is shorter than the range cleared")
    if n == 0:
        return 0
    if s.kind != SINK_PY:
        with nogil:
            for i in range(n):
                m = masks[i]
                # fetch-and-not returns the old word: only its bits in m were
                # really cleared (pairs with the vCPU's fetch-or).
                cleared = kd_fetch_andnot_u64(&words[first_word + i], m) & m if m else 0
                if out is not None:
                    out[i] = cleared
                if cleared:
                    pages += kd_popcount64(cleared)
                    _sink_protect(s, slot, first_word + i, cleared)
        return pages
    # What each word gave up, for the error path (allocated before any bit is taken).
    cdef uint64_t[::1] took = out if out is not None else np.zeros(n, np.uint64)
    i = 0
    try:
        while i < n:
            m = masks[i]
            cleared = kd_fetch_andnot_u64(&words[first_word + i], m) & m if m else 0
            took[i] = cleared
            if cleared:
                pages += kd_popcount64(cleared)
                s.py(first_word + i, cleared)
            i += 1
    except BaseException:
        _put_back(&words[first_word], &took[0], i + 1 if i < n else n)
        raise
    return pages


cdef size_t _popcount(const uint64_t *w, size_t n) noexcept nogil:
    cdef size_t i = 0, total = 0
    while True:
        i = kd_next_nonzero(w, i, n)
        if i >= n:
            return total
        # Relaxed: a concurrent setter may race us; we count what we see.
        total += kd_popcount64(kd_load_relaxed_u64(&w[i]))
        i += 1


def popcount(const uint64_t[::1] words not None):
    """Number of set bits."""
    cdef size_t n = words.shape[0], total = 0
    _check_aligned(words, "words")
    if n == 0:
        return 0
    with nogil:
        total = _popcount(&words[0], n)
    return total


cdef void _copy_live(const uint64_t *w, uint64_t *out, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        # Relaxed: vCPUs may be setting bits (fetch-or); a bit set after this
        # read is simply not in the copy.  A plain memcpy would be a data race.
        out[i] = kd_load_relaxed_u64(&w[i])


def copy_live(const uint64_t[::1] words not None, out=None):
    """A copy of bitmap words that vCPUs may be writing (each read with a relaxed atomic load).

    For reading a live bitmap without taking bits (e.g. KVM_GET_DIRTY_LOG with
    manual protect): numpy's copy would race the vCPUs' atomic fetch-or.
    With ``out`` (a caller-owned uint64 array of at least len(words) words)
    the copy goes there and ``out[:len(words)]`` is returned.
    """
    cdef size_t n = words.shape[0]
    cdef uint64_t[::1] ov
    _check_aligned(words, "words")
    if out is not None:
        ov = _out_words(out)
        if <size_t>ov.shape[0] < n:
            raise ValueError(f"out has {ov.shape[0]} words, needs {n}")
        if n:
            with nogil:
                _copy_live(&words[0], &ov[0], n)
        return out[:n]
    out = np.empty(n, np.uint64)
    if n:
        ov = out
        with nogil:
            _copy_live(&words[0], &ov[0], n)
    return out


cdef struct GfnBuf:
    uint64_t *p
    size_t n, cap
    bint fixed          # p is the caller's out buffer: never grown, never freed


cdef inline int _buf_push_word(GfnBuf *b, uint64_t base, size_t word, uint64_t m) noexcept nogil:
    """Append base + word*64 + each set bit of m; -1 if out of memory (or room, fixed)."""
    cdef size_t need, cap
    cdef uint64_t *p
    cdef uint64_t *start
    cdef uint64_t first
    if b.cap - b.n < 64:
        # Maybe short of room: count first (with room for a whole word, no count).
        need = b.n + <size_t>kd_popcount64(m)
        if need > b.cap:
            if b.fixed:
                return -1
            cap = b.cap * 2 if b.cap * 2 > need else need + 1024
            p = <uint64_t *>realloc(b.p, cap * sizeof(uint64_t))
            if p == NULL:
                return -1
            b.p = p
            b.cap = cap
    # A local cursor: stores through it cannot alias b, so nothing is reloaded per bit.
    p = b.p + b.n
    start = p
    first = base + (<uint64_t>word << 6)
    while m:
        p[0] = first + <uint64_t>kd_ctz64(m)
        p += 1
        m &= m - 1
    b.n += <size_t>(p - start)
    return 0


cdef object _buf_to_array(GfnBuf *b):
    """Hand the buffer to numpy without a copy (it is freed with the array).

    b keeps owning the buffer until nothing can fail any more, so that a
    MemoryError here leaves it to the caller's error path (which may have to
    put its pages back into a bitmap).
    """
    cdef cvarray a
    cdef uint64_t *p
    if b.n == 0:
        out = np.zeros(0, dtype=np.uint64)
        free(b.p)
        b.p = NULL
        return out
    p = <uint64_t *>realloc(b.p, b.n * sizeof(uint64_t))   # give back the slack
    if p != NULL:
        b.p = p
        b.cap = b.n
    a = cvarray(shape=(b.n,), itemsize=sizeof(uint64_t), format="Q", mode="c",
                allocate_buffer=False)
    a.data = <char *>b.p          # not freed by a (allocate_buffer=False) ...
    out = np.asarray(a)
    a.callback_free_data = free   # ... until numpy holds it: now it owns the buffer
    b.p = NULL
    return out


cdef void _put_back_gfns(uint64_t *w, uint64_t base, const GfnBuf *b) noexcept nogil:
    """Error path of harvest_gfns: or every listed page back into its word.

    The list is ascending, so each word's bits are gathered into one fetch-or.
    """
    cdef size_t i = 0, word
    cdef uint64_t mask, rel
    while i < b.n:
        rel = b.p[i] - base
        word = <size_t>(rel >> 6)
        mask = 0
        while i < b.n and <size_t>((b.p[i] - base) >> 6) == word:
            mask |= (<uint64_t>1) << ((b.p[i] - base) & 63)
            i += 1
        kd_fetch_or_u64(&w[word], mask)


cdef inline void _buf_init(GfnBuf *b, size_t nwords) noexcept nogil:
    # Start at one entry per word (lazily faulted pages): sparse maps never grow.
    b.p = NULL
    b.n = 0
    b.cap = 0
    b.fixed = False
    if nwords:
        b.p = <uint64_t *>malloc(nwords * sizeof(uint64_t))
        if b.p != NULL:
            b.cap = nwords


cdef inline int _list_word(uint64_t *w, size_t i, uint64_t base, GfnBuf *b, bint take,
                           _Sink s, uint32_t slot) noexcept nogil:
    cdef uint64_t mask
    if take:
        # xchg pairs with the vCPU's fetch-or, as in _harvest.
        mask = kd_xchg_u64(&w[i], 0)
        if mask:
            _sink_protect(s, slot, i, mask)
    else:
        # Relaxed: the words may be live; a bit set after this read is not listed.
        mask = kd_load_relaxed_u64(&w[i])
    if mask and _buf_push_word(b, base, i, mask):
        if take:
            kd_fetch_or_u64(&w[i], mask)     # keep what we could not list
        return -1
    return 0


cdef int _list_gfns(uint64_t *w, size_t n, uint64_t base, GfnBuf *b, bint take,
                    _Sink s, uint32_t slot) noexcept nogil:
    """Append the page of every set bit to b; with ``take`` also exchange each
    non-zero word with 0 and hand it to the sink (a harvest).  -1 if out of memory.

    16 words at a time, the block's dirty words visited through its non-zero
    mask (one data-dependent branch per block, src/_scan.h)."""
    cdef size_t i = 0
    cdef unsigned bm
    while i + 16 <= n:
        bm = kd_nonzero_mask16(&w[i])
        while bm:
            if _list_word(w, i + <size_t>kd_ctz32(bm), base, b, take, s, slot):
                return -1
            bm &= bm - 1
        i += 16
    while i < n:
        if kd_load_relaxed_u64(&w[i]) and _list_word(w, i, base, b, take, s, slot):
            return -1
        i += 1
    return 0


cdef object _validate_out = None


cdef object _out_words(object out):
    """A caller-owned uint64 output array, checked by kvmdirty.validate.out_words."""
    global _validate_out
    if _validate_out is None:
        # Imported on first use: kvmdirty.validate is above this module.
        from kvmdirty.validate import out_words
        _validate_out = out_words
    return _validate_out(out, "out")


cdef inline void _buf_fixed(GfnBuf *b, uint64_t[::1] ov) noexcept:
    b.p = &ov[0] if ov.shape[0] else NULL
    b.n = 0
    b.cap = ov.shape[0]
    b.fixed = True


cdef object _too_short(size_t cap, size_t need):
    return ValueError(f"out has room for {cap} pages, {need} are set")


def to_gfns(const uint64_t[::1] words not None, uint64_t base=0, out=None):
    """The set bits as a uint64 numpy array of page numbers (``base`` + bit index), ascending.

    One pass: zero words are skipped by the hint scan, the rest expanded with
    count-trailing-zeros into a growing buffer.  With ``out`` (a caller-owned
    uint64 array, reused from call to call) the pages are written there and
    the view ``out[:count]`` is returned: nothing is allocated.  If they do
    not fit, ValueError (``words`` is only read; ``out`` is then unspecified).
    """
    cdef size_t n = words.shape[0]
    cdef GfnBuf b
    cdef int err = 0
    cdef uint64_t[::1] ov
    cdef _Sink none = _Sink(_SINK_TOKEN)
    _check_aligned(words, "words")
    if out is not None:
        ov = _out_words(out)
        _buf_fixed(&b, ov)
        if n:
            with nogil:
                err = _list_gfns(<uint64_t *>&words[0], n, base, &b, False, none, 0)
        if err:
            raise _too_short(b.cap, popcount(words))
        return out[:b.n]
    _buf_init(&b, n)
    try:
        if n:
            with nogil:
                # Not written through: take=False only reads.
                err = _list_gfns(<uint64_t *>&words[0], n, base, &b, False, none, 0)
        if err:
            raise MemoryError()
        return _buf_to_array(&b)
    finally:
        free(b.p)                 # NULL once numpy owns it


def harvest_gfns(uint64_t[::1] words not None, sink=None, uint64_t base=0,
                 *, unsigned int slot=0, out=None):
    """Harvest and expand in one pass: exchange each non-zero word with 0, protect, list its pages.

    The same as :func:`harvest` followed by :func:`to_gfns` on the snapshot,
    without materialising the snapshot.  Returns a uint64 array of
    ``base`` + page index, ascending; with ``out`` (a caller-owned uint64
    array, reused) the view ``out[:count]`` of it.

    On any failure (MemoryError growing the list, pages that do not fit in
    ``out`` (ValueError), a raising Python sink, KeyboardInterrupt) every
    page taken is put back into ``words`` first.
    """
    cdef size_t n = words.shape[0], i
    cdef uint64_t mask
    cdef GfnBuf b
    cdef int err = 0
    cdef uint64_t[::1] ov
    cdef _Sink s = _Sink(_SINK_TOKEN)
    _check_aligned(words, "words")
    s.resolve(sink, n)
    if out is not None:
        ov = _out_words(out)
        _buf_fixed(&b, ov)
    else:
        _buf_init(&b, n)
    try:
        if s.kind == SINK_PY:
            for i in range(n):
                mask = kd_xchg_u64(&words[i], 0) if kd_load_relaxed_u64(&words[i]) else 0
                if mask:
                    # Listed before the sink sees it: from here on the error
                    # path finds it in b.
                    if _buf_push_word(&b, base, i, mask):
                        kd_fetch_or_u64(&words[i], mask)
                        err = -1
                        break
                    s.py(i, mask)
        elif n:
            with nogil:
                # On -1 the word that did not fit is already back in words.
                err = _list_gfns(&words[0], n, base, &b, True, s, slot)
        if err:
            if b.fixed:
                raise _too_short(b.cap, b.n + popcount(words))
            raise MemoryError()
        if b.fixed:
            return out[:b.n]
        return _buf_to_array(&b)
    except BaseException:
        if b.p != NULL and b.n:
            with nogil:
                _put_back_gfns(&words[0], base, &b)
        raise
    finally:
        if not b.fixed:
            free(b.p)             # NULL once numpy owns it


def set_bit(uint64_t[::1] words not None, uint64_t nr):
    """Atomically set bit ``nr``; return whether it was already set."""
    _check_aligned(words, "words")
    if nr >= <uint64_t>words.shape[0] * 64:
        raise IndexError(f"bit {nr} out of range for {words.shape[0]} words")
    cdef uint64_t bit = (<uint64_t>1) << (nr & 63)
    return (kd_fetch_or_u64(&words[nr >> 6], bit) & bit) != 0


def test_bit(const uint64_t[::1] words not None, uint64_t nr):
    """Whether bit ``nr`` is set (load-acquire)."""
    if nr >= <uint64_t>words.shape[0] * 64:
        raise IndexError(f"bit {nr} out of range for {words.shape[0]} words")
    _check_aligned(words, "words")
    return (kd_load_acquire_u64(&words[nr >> 6]) >> (nr & 63)) & 1 == 1


def set_bits(uint64_t[::1] words not None, const uint64_t[::1] nrs not None):
    """Atomically set every bit in ``nrs``; return how many were newly set."""
    cdef size_t n = nrs.shape[0], i, fresh = 0
    cdef uint64_t limit = <uint64_t>words.shape[0] * 64, nr, bit
    _check_aligned(words, "words")
    _check_aligned(nrs, "nrs")
    for i in range(n):
        if nrs[i] >= limit:
            raise IndexError(f"bit {nrs[i]} out of range for {words.shape[0]} words")
    with nogil:
        for i in range(n):
            nr = nrs[i]
            bit = (<uint64_t>1) << (nr & 63)
            if not (kd_fetch_or_u64(&words[nr >> 6], bit) & bit):
                fresh += 1
    return fresh


cdef class DirtyBitmap:
    """One bit per page of a memslot, KVM layout; thread-safe atomic operations.

    ``words`` is a zero-copy numpy view of the live bitmap.
    """
    cdef readonly uint64_t npages
    cdef object _arr
    cdef uint64_t[::1] _w

    def __cinit__(self, npages):
        npages = int(npages)
        if npages < 0 or npages > (1 << 40):
            raise ValueError(f"npages must be in [0, 2**40], got {npages}")
        self.npages = npages
        self._arr = np.zeros(nwords_for(npages), dtype=np.uint64)
        self._w = self._arr

    @property
    def words(self):
        """The live words (numpy uint64 view, shared with this bitmap)."""
        return self._arr

    @property
    def nwords(self):
        return self._w.shape[0]

    def __len__(self):
        return self.npages

    def _page(self, gfn):
        gfn = int(gfn)
        if gfn < 0 or gfn >= self.npages:
            raise IndexError(f"page {gfn} out of range [0, {self.npages})")
        return gfn

    def set(self, gfn):
        """Mark page ``gfn`` dirty; return whether it already was."""
        return set_bit(self._w, self._page(gfn))

    def test(self, gfn):
        return test_bit(self._w, self._page(gfn))

    def set_many(self, gfns):
        """Mark every page in ``gfns`` dirty; return how many were newly set."""
        a = np.asarray(gfns)
        if a.ndim != 1:
            raise ValueError("gfns must be one-dimensional")
        if a.size and a.dtype.kind not in "ui":
            raise TypeError(f"gfns must be integers, got dtype {a.dtype}")
        if a.dtype.kind == "i" and a.size and int(a.min()) < 0:
            raise IndexError(f"page {int(a.min())} out of range [0, {self.npages})")
        a = np.ascontiguousarray(a, dtype=np.uint64)
        if a.size and int(a.max()) >= self.npages:
            raise IndexError(f"page {int(a.max())} out of range [0, {self.npages})")
        return set_bits(self._w, a)

    def harvest(self, sink=None, *, unsigned int slot=0, out=None):
        """Take every dirty bit (xchg to 0); return the snapshot as a new uint64 array.

        With ``out`` (a caller-owned uint64 array of at least ``nwords``
        words, reused from call to call) the snapshot is written there and
        ``out[:nwords]`` is returned.
        """
        cdef uint64_t[::1] sv
        cdef size_t n = self._w.shape[0]
        cdef _Sink s
        if out is not None:
            sv = _out_words(out)
            if <size_t>sv.shape[0] < n:
                raise ValueError(f"out has {sv.shape[0]} words, needs {n}")
            snap = out[:n]
            s = _Sink(_SINK_TOKEN)
            s.resolve(sink, n)
            if s.kind != SINK_PY:
                # The compiled loop cannot fail: nothing to put back.
                if n:
                    with nogil:
                        _harvest(&self._w[0], &sv[0], n, False, s, slot)
                return snap
            snap.fill(0)          # a Python sink may fail: put back exactly what was taken
        else:
            snap = np.zeros(n, dtype=np.uint64)
        try:
            harvest(self._w, snap, sink, zeroed=True, slot=slot)
        except BaseException:
            # A failure inside harvest already put its bits back; this also
            # covers one after it (boxing its count): snap is ours alone, and
            # or-ing a bit back twice is harmless.
            sv = snap
            if sv.shape[0]:
                _put_back(&self._w[0], &sv[0], sv.shape[0])
            raise
        return snap

    def clear(self, first_page, masks, sink=None, *, unsigned int slot=0):
        """Clear ``masks`` (uint64 words) from word ``first_page // 64`` on; return pages cleared."""
        first_page = int(first_page)
        if first_page < 0 or first_page % 64:
            raise ValueError("first_page must be a non-negative multiple of 64")
        m = np.ascontiguousarray(masks, dtype=np.uint64)
        return clear_masked(self._w, m, first_page // 64, None, sink, slot=slot)

    def to_gfns(self, base=0, out=None):
        """The dirty pages, ascending (see the module's to_gfns; ``out`` as there)."""
        return to_gfns(self._w, base, out)

    def popcount(self):
        return popcount(self._w)

    def __repr__(self):
        return f"DirtyBitmap(npages={self.npages}, dirty={self.popcount()})"
