"""The host kernel's own dirty tracking (userfaultfd-wp + PAGEMAP_SCAN), its backend and tools.

tracker         register a buffer, harvest written pages into KVM-style bitmap words
backend         HostVM / HostVcpu: open_vm("host")
record          `kvmdirty record`: trace the pages a real workload writes
workloads_real  built-in real workloads (sqlite, numpy, heap, zlib) and --python
trace           the trace format (npz / CSV) and timed replay
dirtyrate       QEMU's dirty-rate estimators against the truth
costs           measure_host_costs(): WP fault and harvest costs on this machine
command         the record / dirtyrate CLI subcommands

See docs/host.md.
"""
from .tracker import HostTrackingUnsupported, Tracker, host_unusable, require_host

__all__ = ["HostTrackingUnsupported", "Tracker", "host_unusable", "require_host"]
