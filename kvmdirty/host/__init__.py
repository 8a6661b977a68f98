"""The host kernel's own dirty tracking (userfaultfd-wp + PAGEMAP_SCAN), its backend and tools.

tracker   register a buffer, harvest written pages into KVM-style bitmap words
"""
from .tracker import HostTrackingUnsupported, Tracker, host_unusable, require_host

__all__ = ["HostTrackingUnsupported", "Tracker", "host_unusable", "require_host"]
