"""`kvmdirty info`: the host's KVM facts that matter for dirty tracking."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from . import _uapi

# (key, capability), asked on a VM fd: VM-level answers can differ from the
# system fd's (the dirty ring size, for one, is a per-VM answer upstream).
_CAPS = (
    ("dirty_ring_max_bytes", _uapi.CAP_DIRTY_LOG_RING),
    ("dirty_ring_acq_rel", _uapi.CAP_DIRTY_LOG_RING_ACQ_REL),
    ("manual_dirty_log_protect2", _uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2),
    ("nr_memslots", _uapi.CAP_NR_MEMSLOTS),
    ("max_vcpus", _uapi.CAP_MAX_VCPUS),
    ("nr_vcpus", _uapi.CAP_NR_VCPUS),
    ("multi_address_space", _uapi.CAP_MULTI_ADDRESS_SPACE),
)


def kvm_unusable(path: str = "/dev/kvm") -> Optional[str]:
    """Why the real-KVM backend cannot run here (a clear reason), or None when it can."""
    d = kvm_info(path)
    return None if d["available"] else d["reason"]


def kvm_info(path: str = "/dev/kvm") -> Dict[str, Any]:
    """The facts, or {"available": False, "reason": ...} when KVM is missing or unusable."""
    try:
        from . import _kvm
    except ImportError as e:
        return {"available": False, "reason": f"kvmdirty._kvm is not built ({e})"}
    try:
        kvm = _kvm.Kvm(path)
    except OSError as e:
        return {"available": False, "reason": f"cannot open {path}: {_why(e)}"}
    try:
        try:
            version = kvm.api_version()
        except OSError as e:
            return {"available": False, "reason": f"{path} is not a KVM device (KVM_GET_API_VERSION: {_why(e)})"}
        if version != _uapi.API_VERSION:
            return {"available": False,
                    "reason": f"{path} speaks KVM API {version}, this build expects {_uapi.API_VERSION}"}
        try:
            vm = kvm.create_vm()
        except OSError as e:
            return {"available": False, "reason": f"KVM_CREATE_VM fails: {_why(e)}"}
        try:
            d: Dict[str, Any] = {"available": True, "path": path, "api_version": version}
            for key, cap in _CAPS:
                d[key] = vm.check_extension(cap)
            d["dirty_ring_max_entries"] = d["dirty_ring_max_bytes"] // _uapi.SIZEOF_DIRTY_GFN
            d["manual_protect_flags"] = _manual_flags(d["manual_dirty_log_protect2"])
            d["vcpu_mmap_size"] = kvm.vcpu_mmap_size()
            d["dirty_ring_page_offset"] = _uapi.DIRTY_LOG_PAGE_OFFSET
            return d
        finally:
            vm.close()
    except OSError as e:
        return {"available": False, "reason": f"{path}: {e}"}
    finally:
        kvm.close()


def _why(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def _manual_flags(mask: int) -> str:
    names = []
    if mask & _uapi.DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        names.append("MANUAL_PROTECT_ENABLE")
    if mask & _uapi.DIRTY_LOG_INITIALLY_SET:
        names.append("INITIALLY_SET")
    return "|".join(names) or "none"


_LABELS = (
    ("path", "device"),
    ("api_version", "KVM API version"),
    ("dirty_ring_max_bytes", "dirty ring max bytes"),
    ("dirty_ring_max_entries", "dirty ring max entries"),
    ("dirty_ring_acq_rel", "dirty ring ACQ_REL"),
    ("manual_dirty_log_protect2", "MANUAL_DIRTY_LOG_PROTECT2"),
    ("manual_protect_flags", "manual protect flags"),
    ("nr_memslots", "memslots (NR_MEMSLOTS)"),
    ("max_vcpus", "MAX_VCPUS"),
    ("nr_vcpus", "NR_VCPUS (recommended)"),
    ("multi_address_space", "MULTI_ADDRESS_SPACE"),
    ("vcpu_mmap_size", "vCPU mmap size"),
    ("dirty_ring_page_offset", "dirty ring mmap page offset"),
)


def format_info(d: Dict[str, Any]) -> str:
    """Aligned `label: value` lines, or `unavailable: <reason>`."""
    if not d.get("available"):
        return f"unavailable: {d.get('reason', 'unknown reason')}"
    rows = [(label, d[key]) for key, label in _LABELS if key in d]
    width = max(len(label) for label, _ in rows)
    out = []
    for label, value in rows:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 20:
            value = f"{value} ({value >> 20} MiB)" if value % (1 << 20) == 0 else str(value)
        out.append(f"{label:<{width}}  {value}")
    return "\n".join(out)


def host_vm_options() -> Dict[str, int]:
    """Keyword arguments for vm.VM that make the simulator answer with this host's limits.

    Empty when /dev/kvm is unusable (the simulator's x86 defaults then apply).
    """
    d = kvm_info()
    if not d.get("available"):
        return {}
    max_vcpus = int(d.get("max_vcpus") or 0)
    out = {"address_spaces": max(1, int(d.get("multi_address_space") or 0))}
    if max_vcpus:
        out["max_vcpus"] = max_vcpus
        # KVM_MAX_VCPU_IDS = KVM_MAX_VCPUS * KVM_VCPU_ID_RATIO (4 on x86).
        out["max_vcpu_ids"] = max_vcpus * 4
    return out
