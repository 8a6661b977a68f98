"""kvmdirty.host.Tracker against a set oracle: the host kernel reports exactly the pages written."""
from __future__ import annotations

import errno

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_util import requires_host

from kvmdirty import _bitmap, _host, _kvm
from kvmdirty.host import Tracker

pytestmark = requires_host

PAGE = 4096


def pages(words) -> set:
    return set(int(g) for g in _bitmap.to_gfns(np.ascontiguousarray(words, dtype=np.uint64)))


def write(mapping, page_list, value=1):
    mem = np.frombuffer(mapping, dtype=np.uint64)
    for p in page_list:
        mem[p * PAGE // 8] = value


@pytest.fixture
def tracked():
    m = _kvm.Mapping(200 * PAGE)           # 200 pages: not a multiple of 64
    t = Tracker(m)
    yield m, t
    t.close()
    m.close()


def test_harvest_reports_exactly_the_pages_written(tracked):
    m, t = tracked
    write(m, [0, 3, 63, 64, 199])
    assert pages(t.harvest()) == {0, 3, 63, 64, 199}
    assert t.harvest().shape == (4,)


def test_reprotect_in_the_same_call(tracked):
    m, t = tracked
    write(m, [5, 6])
    assert pages(t.harvest()) == {5, 6}
    assert pages(t.harvest()) == set()          # re-protected: nothing new
    write(m, [6, 100])                          # written between harvests
    assert pages(t.harvest()) == {6, 100}


def test_reads_are_not_writes(tracked):
    m, t = tracked
    mem = np.frombuffer(m, dtype=np.uint64)
    assert int(mem[::512].sum()) == 0           # reads every page, never-touched ones too
    assert pages(t.harvest()) == set()


def test_without_reprotect_pages_stay_reported_until_protected(tracked):
    m, t = tracked
    write(m, [1, 2, 130])
    assert pages(t.harvest(reprotect=False)) == {1, 2, 130}
    assert pages(t.harvest(reprotect=False)) == {1, 2, 130}
    mask = np.zeros(4, np.uint64)
    mask[0] = 1 << 2                            # protect page 2 only (KVM_CLEAR_DIRTY_LOG)
    assert t.protect(0, mask) == 1
    assert pages(t.harvest(reprotect=False)) == {1, 130}
    mask[:] = 0
    mask[0] = 1 << (130 - 128)
    assert t.protect(128, mask[:1]) == 1
    assert pages(t.harvest(reprotect=False)) == {1}
    write(m, [2])
    assert pages(t.harvest(reprotect=False)) == {1, 2}


def test_protect_ignores_bits_past_the_end(tracked):
    m, t = tracked
    write(m, [199])
    assert t.protect(192, np.array([~np.uint64(0)], np.uint64)) == 8
    assert pages(t.harvest()) == set()


def test_failed_harvest_keeps_what_it_took():
    """A scan that fails part-way (EPERM past an unregistered page) has already
    re-protected the pages it found: the next harvest must still report them."""
    m = _kvm.Mapping(128 * PAGE)
    t = Tracker(m)
    try:
        write(m, [3, 100])
        t._uffd.unregister(m.address + 64 * PAGE, 64 * PAGE)
        with pytest.raises(OSError) as e:
            t.harvest()
        assert e.value.errno == errno.EPERM
        t._uffd.register_wp(m.address + 64 * PAGE, 64 * PAGE)
        t._uffd.writeprotect(m.address + 64 * PAGE, 64 * PAGE)
        assert pages(t.harvest()) == {3}       # page 3 came from the failed call
        assert pages(t.harvest()) == set()
    finally:
        t.close()
        m.close()


def test_closed_tracker_raises_ebadf(tracked):
    m, t = tracked
    t.close()
    t.close()
    with pytest.raises(OSError) as e:
        t.harvest()
    assert e.value.errno == errno.EBADF


def test_bad_buffers_are_refused():
    with pytest.raises(TypeError):
        Tracker(bytes(PAGE))
    arr = np.zeros(PAGE // 8 + 1, np.uint64)
    with pytest.raises(ValueError):
        Tracker(arr)


def test_scan_regions_lists_registered_vmas(tracked):
    m, t = tracked
    pm = _host.Pagemap()
    try:
        regions, err = pm.scan_regions(m.address, m.address + m.size, flags=0,
                                       category_mask=_host.PAGE_IS_WPALLOWED)
        assert err == 0
        assert regions.tolist() == [[m.address, m.address + m.size]]
    finally:
        pm.close()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 199), max_size=40), min_size=1, max_size=6))
def test_rounds_against_a_set_oracle(rounds):
    m = _kvm.Mapping(200 * PAGE)
    t = Tracker(m)
    try:
        for i, written in enumerate(rounds, 1):
            write(m, written, i)
            assert pages(t.harvest()) == set(written)
    finally:
        t.close()
        m.close()


def test_close_racing_scans_and_ioctls_never_crashes():
    """close() in one thread while others scan / protect: each call succeeds or raises EBADF."""
    import threading
    for _ in range(20):
        m = _kvm.Mapping(512 * PAGE)
        t = Tracker(m)
        pm = _host.Pagemap()
        errors = []
        start = threading.Event()

        def hammer(fn):
            start.wait()
            for _ in range(200):
                try:
                    fn()
                except OSError as e:
                    if e.errno != errno.EBADF:
                        errors.append(e)
                    return

        words = np.zeros(8, np.uint64)
        fns = [lambda: pm.scan_bits(m.address, m.address + m.size, words, flags=0,
                                    category_mask=_host.PAGE_IS_WRITTEN),
               lambda: pm.scan_regions(m.address, m.address + m.size, flags=0,
                                       category_mask=_host.PAGE_IS_WPALLOWED),
               t.harvest, t.protect]
        threads = [threading.Thread(target=hammer, args=(f,)) for f in fns]
        for th in threads:
            th.start()
        start.set()
        pm.close()
        t.close()
        for th in threads:
            th.join()
        assert not errors
        m.close()


class _RefusingUffd:
    """Stands in for _host.Uffd: refuses as a kernel or a policy would."""

    def __init__(self, err, have=0):
        self.err, self.have = err, have

    def __call__(self, features, user_mode_only=False):
        if features == 0:                      # the feature probe
            return type("U", (), {"features": self.have, "close": lambda s: None})()
        raise OSError(self.err, "refused")


@pytest.mark.parametrize("err,have,words", [
    (errno.EPERM, 0, "vm.unprivileged_userfaultfd"),
    (errno.ENOSYS, 0, "no userfaultfd"),
    (errno.EINVAL, _host.UFFD_FEATURE_WP_UNPOPULATED, "UFFD_FEATURE_WP_ASYNC"),
])
def test_refusals_become_one_clear_line(monkeypatch, err, have, words):
    from kvmdirty.host import tracker
    monkeypatch.setattr(tracker._host, "Uffd", _RefusingUffd(err, have))
    with pytest.raises(tracker.HostTrackingUnsupported) as e:
        tracker.open_uffd()
    assert e.value.errno == err and words in e.value.strerror and "\n" not in e.value.strerror
