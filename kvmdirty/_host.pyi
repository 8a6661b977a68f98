"""Stubs for kvmdirty._host (src/_host.pyx): userfaultfd-wp + PAGEMAP_SCAN and the host store loop."""
from typing import Any, Tuple

import numpy as np
from numpy.typing import NDArray

PAGE_SHIFT: int
PAGE_SIZE: int
UFFD_USER_MODE_ONLY: int
UFFD_API: int
UFFDIO_REGISTER_MODE_WP: int
UFFDIO_WRITEPROTECT_MODE_WP: int
UFFD_FEATURE_WP_UNPOPULATED: int
UFFD_FEATURE_WP_ASYNC: int
UFFDIO_WRITEPROTECT_BIT: int
PAGE_IS_WPALLOWED: int
PAGE_IS_WRITTEN: int
PAGE_IS_FILE: int
PAGE_IS_PRESENT: int
PAGE_IS_SWAPPED: int
PAGE_IS_PFNZERO: int
PAGE_IS_HUGE: int
PAGE_IS_SOFT_DIRTY: int
PM_SCAN_WP_MATCHING: int
PM_SCAN_CHECK_WPASYNC: int

def no_huge_pages(addr: int, length: int) -> None: ...

class Uffd:
    features: int
    user_mode_only: bool
    def __init__(self, features: int, *, user_mode_only: bool = ...) -> None: ...
    def register_wp(self, addr: int, length: int) -> int: ...
    def unregister(self, addr: int, length: int) -> None: ...
    def writeprotect(self, addr: int, length: int, protect: bool = ...) -> None: ...
    def writeprotect_bits(self, base: int, words: Any, first_page: int = ...) -> int: ...
    def fileno(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...

class Pagemap:
    def __init__(self) -> None: ...
    @property
    def buffer_range(self) -> Tuple[int, int]: ...
    def scan_bits(self, start: int, end: int, words: Any, *, flags: int, category_mask: int,
                  anyof_mask: int = ..., inverted: int = ...) -> Tuple[int, int]: ...
    def scan_regions(self, start: int, end: int, *, flags: int, category_mask: int,
                     anyof_mask: int = ..., inverted: int = ...) -> Tuple[NDArray[np.uint64], int]: ...
    def close(self) -> None: ...

def store_loop(bases: Any, npages: Any, addrs: Any, writable: Any, gfns: Any, values: Any,
               pos: int, budget: int) -> Tuple[int, int]: ...
