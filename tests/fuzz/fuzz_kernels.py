"""atheris (libFuzzer) harness: raw bytes -> word kernels, DirtyRing/collect and the VM ioctls.

Run directly for a coverage-guided session (time-bounded by libFuzzer flags):

    python tests/fuzz/fuzz_kernels.py -max_total_time=60 -rss_limit_mb=4096
    python tests/fuzz/fuzz_kernels.py -runs=20000 corpus_dir/

Any exception other than the documented ones (or a crash) is a finding;
libFuzzer writes the input to crash-<sha1> in the current directory.
tests/fuzz/test_atheris.py runs it for a few seconds in CI when atheris is
installed, and skips otherwise.
"""
import errno
import sys

import atheris

with atheris.instrument_imports():
    import numpy as np
    import kvmdirty
    from kvmdirty import KvmError, _bitmap
    try:
        from kvmdirty import _ring
    except ImportError:
        _ring = None

DOCUMENTED = (KvmError, TypeError, ValueError, IndexError, OverflowError, BufferError)


def _words(fdp, n):
    raw = fdp.ConsumeBytes(8 * n)
    raw += b"\0" * (8 * n - len(raw))
    a = np.frombuffer(bytearray(raw), dtype=np.uint64)
    return a


def one_input(data):
    fdp = atheris.FuzzedDataProvider(data)
    what = fdp.ConsumeIntInRange(0, 5)
    try:
        if what == 0:
            w = _words(fdp, fdp.ConsumeIntInRange(0, 64))
            before = w.copy()
            snap = np.zeros(len(w), np.uint64)
            pages = _bitmap.harvest(w, snap, None)
            assert pages == int(np.unpackbits(before.view(np.uint8)).sum())
            assert np.array_equal(snap, before) and not w.any()
        elif what == 1:
            w = _words(fdp, fdp.ConsumeIntInRange(0, 64))
            m = _words(fdp, fdp.ConsumeIntInRange(0, 64))
            _bitmap.clear_masked(w, m, fdp.ConsumeIntInRange(0, 80))
        elif what == 2:
            w = _words(fdp, fdp.ConsumeIntInRange(0, 64))
            base = fdp.ConsumeInt(9)
            _bitmap.to_gfns(w, base)
            _bitmap.set_bits(w, _words(fdp, 4))
        elif what == 3 and _ring is not None:
            n = 1 << fdp.ConsumeIntInRange(0, 6)
            raw = bytearray(fdp.ConsumeBytes(16 * n).ljust(16 * n, b"\0"))
            buf = np.frombuffer(raw, dtype=_ring.ENTRY_DTYPE)
            _ring.collect(buf, fdp.ConsumeInt(5), fdp.ConsumeIntInRange(0, 100))
        elif what == 4 and _ring is not None:
            r = _ring.DirtyRing(128)
            for _ in range(fdp.ConsumeIntInRange(0, 50)):
                op = fdp.ConsumeIntInRange(0, 3)
                if op == 0:
                    r.push(fdp.ConsumeIntInRange(0, 2**32 - 1), fdp.ConsumeIntInRange(0, 2**64 - 1))
                elif op == 1:
                    r.collect(fdp.ConsumeIntInRange(0, 200))
                elif op == 2:
                    r.gfns.view(np.uint8)[fdp.ConsumeIntInRange(0, 2047)] = fdp.ConsumeIntInRange(0, 255)
                else:
                    r.reset(None)
                assert 0 <= r.used <= r.entries
        else:
            vm = kvmdirty.VM()
            vm.set_user_memory_region(fdp.ConsumeIntInRange(0, 3), fdp.ConsumeIntInRange(0, 64) << 12,
                                      fdp.ConsumeIntInRange(0, 300) << 12, fdp.ConsumeIntInRange(0, 3))
            v = vm.create_vcpu(fdp.ConsumeIntInRange(0, 3))
            v.run(np.frombuffer(bytearray(fdp.ConsumeBytes(64)), np.uint8).astype(np.uint64), 1)
            vm.get_dirty_log(fdp.ConsumeIntInRange(0, 3))
            vm.clear_dirty_log(fdp.ConsumeIntInRange(0, 3), fdp.ConsumeIntInRange(0, 128),
                               fdp.ConsumeIntInRange(0, 300), _words(fdp, 5))
    except RuntimeError as e:
        # RingFullError is a documented RuntimeError of DirtyRing.push.
        if type(e).__name__ != "RingFullError":
            raise
    except KvmError as e:
        assert e.errno in (errno.EINVAL, errno.ENOENT, errno.ENXIO, errno.EEXIST, errno.EFAULT), e
    except DOCUMENTED:
        pass


def main(argv=None):
    atheris.Setup(sys.argv if argv is None else argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
