"""Child interpreters for tests, importing the kvmdirty under test.

The kvmdirty under test is the one this pytest imported: site-packages once
installed (CI), the checkout when built in place.  A child started inside a
checkout would find the bare source tree first (its working directory is
sys.path[0]), which has no compiled core; so children run in the directory
that holds the package under test, with it and tests/ (for helper modules
such as ring_model) on PYTHONPATH.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Dict, Sequence

import kvmdirty

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(kvmdirty.__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)            # the checkout: examples/, docs/


def env(**extra: str) -> Dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([PKG_PARENT, TESTS, e.get("PYTHONPATH", "")])
    e.update(extra)
    return e


def run(args: Sequence[str], *, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """``python ARGS`` in a child, output captured as text."""
    kw.setdefault("env", env())
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=PKG_PARENT, **kw)


def python(code: str, *, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """``python -c CODE`` (dedented) in a child."""
    return run(["-c", textwrap.dedent(code)], timeout=timeout, **kw)


def popen(args: Sequence[str], **kw) -> subprocess.Popen:
    """``python ARGS`` started in a child, pipes as text."""
    return subprocess.Popen([sys.executable, *args], env=env(), cwd=PKG_PARENT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
