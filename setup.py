"""Build the compiled core: every src/_*.pyx becomes kvmdirty._<name>.

Project-wide Cython directives live here and only here.
  KVMDIRTY_DEBUG=1     bounds/wraparound/initialized checks on, -O0 -g
  KVMDIRTY_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer
  KVMDIRTY_TSAN=1      ThreadSanitizer (run with libtsan preloaded: .ci/tsan.sh)
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("KVMDIRTY_DEBUG") == "1"
SANITIZE = os.environ.get("KVMDIRTY_SANITIZE") == "1"
TSAN = os.environ.get("KVMDIRTY_TSAN") == "1"
if SANITIZE and TSAN:
    raise SystemExit("KVMDIRTY_SANITIZE and KVMDIRTY_TSAN cannot be combined (ASan and TSan exclude each other)")

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

cflags = ["-O0", "-g"] if DEBUG else ["-O3"]
cflags += ["-Wno-unused-function", "-Wno-unreachable-code"]
ldflags = []
if SANITIZE:
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    cflags += san + ["-g"]
    ldflags += san
if TSAN:
    # -O1: TSan's reports keep their line numbers; atomics are instrumented as such.
    tsan = ["-fsanitize=thread", "-fno-omit-frame-pointer"]
    cflags += tsan + ["-g", "-O1"]
    ldflags += tsan


def extension(pyx: str) -> Extension:
    name = os.path.splitext(os.path.basename(pyx))[0]
    return Extension(
        f"kvmdirty.{name}",
        [pyx],
        include_dirs=["src"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )


class ParallelBuildExt(build_ext):
    """Compile the extensions on every CPU unless `-j` says otherwise: `pip
    install` has no way to pass -j, and the modules are independent."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1


setup(
    cmdclass={"build_ext": ParallelBuildExt},
    ext_modules=cythonize(
        [extension(p) for p in sorted(glob.glob("src/_*.pyx"))],
        include_path=["src"],
        compiler_directives=DIRECTIVES,
        nthreads=os.cpu_count() or 1,
    ),
)
