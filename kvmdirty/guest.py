"""The x86-64 guest program of the real-KVM backend, and its private memory.

The guest writes one 64-bit value to the first 8 bytes of every page of a
write plan (absolute guest frame numbers stored in guest memory), then halts:

    loop: mov rdx, [rsi]     ; rsi -> next gfn of the plan
          shl rdx, 12        ; gfn -> guest physical address
          mov [rdx], rax     ; THE write (rax = value)
          add rsi, 8
          dec rcx            ; rcx = writes left in this burst (one KVM_RUN)
          jnz loop
    done: hlt
          jmp done           ; running a halted guest again halts again

Guest instructions cost ~4 us on nested hosts, so the loop is kept to six
instructions per write and uses no stack.

Private memory. Code, page tables and the plans live in one memslot that is
never dirty-logged, so dirty bitmaps and ring entries only ever name the
user's slots:
    slot id   KvmVM.private_slot: NR_MEMSLOTS - 1 (32763 on x86), reserved
    GPA       PRIVATE_GPA = 3.5 GiB: inside the PCI hole that every guest
              layout of kvmdirty leaves below 4 GiB (see runner.ram_ranges:
              RAM below 4 GiB ends at 3 GiB or 3.5 GiB, as on QEMU's pc
              machine), below the IOAPIC (0xFEC00000) and the LAPIC
              (0xFEE00000) pages, so no guest RAM of any size can reach it.
              +0x000000 code (one page)
              +0x001000 PML4, +0x002000 PDPT, +0x003000 512 page directories
              +0x400000 plan areas: PLAN_AREA_BYTES per vCPU (vCPU k, in
                        creation order, owns area k: 8,192 gfns per chunk).
              Size private_size(n) for n vCPUs.
The page tables identity-map the first 512 GiB with 2 MiB pages, once:
whatever slots the user registers later are already mapped, and a write to a
gfn outside every slot reaches KVM as MMIO instead of faulting the guest. The
guest's MAXPHYADDR is the host's (KvmVM sets KVM_GET_SUPPORTED_CPUID), so the
guest can address min(512 GiB, 2**MAXPHYADDR) (KvmVM.guest_phys_limit).
"""
from __future__ import annotations

from typing import Dict

import numpy as np

GUEST_PHYS_LIMIT = 1 << 39                 # what the page tables map (one PDPT)
GUEST_GFN_LIMIT = GUEST_PHYS_LIMIT >> 12

# The start of the PCI hole of a 3.5 GiB-lowmem layout (and inside the hole
# of a 3 GiB one), and where the private region may end: the IOAPIC page.
PRIVATE_GPA = 0xE000_0000
PRIVATE_END_LIMIT = 0xFEC0_0000
CODE_OFFSET = 0x0
PML4_OFFSET = 0x1000
PDPT_OFFSET = 0x2000
PD_OFFSET = 0x3000
N_PD = GUEST_PHYS_LIMIT >> 30              # one page directory per GiB
PLAN_OFFSET = 0x400000
PLAN_AREA_BYTES = 64 << 10                 # one vCPU's plan chunk
PLAN_CAPACITY = PLAN_AREA_BYTES // 8
#: The most plan areas that fit between PRIVATE_GPA and the IOAPIC page.
MAX_PLAN_AREAS = (PRIVATE_END_LIMIT - PRIVATE_GPA - PLAN_OFFSET) // PLAN_AREA_BYTES

# Writes per KVM_RUN when a dirty ring is on: well below the ring's 64-entry
# reserve (see kvm.KvmVcpu._start_burst).
RING_BURST = 32



def private_size(areas: int) -> int:
    """Bytes of the private region holding `areas` plan areas."""
    if not 1 <= areas <= MAX_PLAN_AREAS:
        raise ValueError(f"plan areas must be in [1, {MAX_PLAN_AREAS}], got {areas}")
    return PLAN_OFFSET + areas * PLAN_AREA_BYTES


def plan_offset(area: int) -> int:
    """Byte offset of plan area `area` in the private region."""
    return PLAN_OFFSET + area * PLAN_AREA_BYTES


PRIVATE_GFN_FIRST = PRIVATE_GPA >> 12
PRIVATE_GFN_END = PRIVATE_END_LIMIT >> 12      # reserved whatever the region's size

# (offset, bytes, instruction): verified with objdump -D -b binary -mi386:x86-64
_PROGRAM = (
    (0x00, b"\x48\x8b\x16", "mov rdx, [rsi]"),
    (0x03, b"\x48\xc1\xe2\x0c", "shl rdx, 12"),
    (0x07, b"\x48\x89\x02", "mov [rdx], rax"),
    (0x0A, b"\x48\x83\xc6\x08", "add rsi, 8"),
    (0x0E, b"\x48\xff\xc9", "dec rcx"),
    (0x11, b"\x75\xed", "jnz 0x00"),       # rel8 -19: back to the loop top
    (0x13, b"\xf4", "hlt"),
    (0x14, b"\xeb\xfd", "jmp 0x13"),       # rel8 -3: back to hlt
)
CODE = b"".join(b for _, b, _ in _PROGRAM)
assert all(off == len(b"".join(b for _, b, _ in _PROGRAM[:i])) for i, (off, _, _) in enumerate(_PROGRAM))

# Offsets of the instructions the progress accounting needs.
_ADD_RSI = 0x0A
_DEC_RCX = 0x0E
HLT_OFFSET = 0x13

# Page-table entry bits. Accessed/Dirty are preset so that the CPU never
# writes the tables back (fewer emulated writes on nested hosts).
_P, _RW, _PS, _A, _D = 1 << 0, 1 << 1, 1 << 7, 1 << 5, 1 << 6
_TABLE = _P | _RW | _A
_LARGE = _P | _RW | _A | _D | _PS

# Control registers for 64-bit paging.
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10


def write_image(private: np.ndarray, base_gpa: int = PRIVATE_GPA) -> None:
    """Write code and identity page tables into the private region (a uint8 view)."""
    if private.dtype != np.uint8 or private.size < PLAN_OFFSET:
        raise ValueError("private region must be a uint8 array of at least PLAN_OFFSET bytes")
    private[CODE_OFFSET:CODE_OFFSET + len(CODE)] = np.frombuffer(CODE, np.uint8)
    words = private[:PLAN_OFFSET].view(np.uint64)
    words[PML4_OFFSET // 8] = (base_gpa + PDPT_OFFSET) | _TABLE
    pdpt = words[PDPT_OFFSET // 8:PDPT_OFFSET // 8 + N_PD]
    pdpt[:] = (base_gpa + PD_OFFSET + 4096 * np.arange(N_PD, dtype=np.uint64)) | _TABLE
    pds = words[PD_OFFSET // 8:PD_OFFSET // 8 + 512 * N_PD]
    pds[:] = (np.arange(512 * N_PD, dtype=np.uint64) << np.uint64(21)) | np.uint64(_LARGE)


def long_mode_sregs(cr3: int) -> Dict[str, object]:
    """KVM_SET_SREGS fields for flat 64-bit mode with paging rooted at cr3."""
    code = dict(base=0, limit=0xFFFFFFFF, selector=0x8, type=0xB, present=1, dpl=0,
                db=0, s=1, l=1, g=1, avl=0, unusable=0)
    data = dict(base=0, limit=0xFFFFFFFF, selector=0x10, type=0x3, present=1, dpl=0,
                db=1, s=1, l=0, g=1, avl=0, unusable=0)
    return dict(cs=code, ds=data, es=data, fs=data, gs=data, ss=data,
                cr0=CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
                cr3=cr3, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA)


def start_regs(base_gpa: int, first: int, count: int, value: int,
               area: int = 0) -> Dict[str, int]:
    """Registers that run the loop over entries [first, first + count) of plan area
    `area`, writing `value`."""
    if count <= 0:
        raise ValueError("the loop needs count >= 1 (dec rcx would wrap)")
    plan = base_gpa + plan_offset(area)
    return dict(rip=base_gpa + CODE_OFFSET, rsi=plan + 8 * first,
                rcx=count, rax=value, rdx=0, rflags=0x2, rsp=plan)


def writes_done(rip: int, rcx: int, count: int, base_gpa: int = PRIVATE_GPA) -> int:
    """Writes completed of a `count`-write chunk, from the vCPU's rip and rcx.

    rcx counts down after the store, so between the store and `dec rcx` one
    more write has happened than rcx says. KVM retires an MMIO write before it
    exits (rip is already past the store), so that write counts as done.
    """
    at = rip - (base_gpa + CODE_OFFSET)
    if at >= HLT_OFFSET:
        return count
    done = count - rcx
    if _ADD_RSI <= at <= _DEC_RCX:
        done += 1
    return done
