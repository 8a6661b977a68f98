"""`migrate --plot FILE.png`: one figure, a timeline per run (matplotlib, optional)."""
from __future__ import annotations

from typing import Sequence

from ..api import PAGE_SIZE


def plot_timelines(results: Sequence, path: str) -> None:
    """Dirty pages left and bytes sent vs virtual time, stop-and-copy marked, per run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OSError("--plot needs matplotlib: pip install 'kvmdirty[bench]' (or matplotlib)") from None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for r in results:
        label = r.design + (f" ({r.params['ring_entries']} entries)" if r.design == "ring" else "")
        if len(results) > 1 and len({(x.params["memory"], x.params["dirty_rate"], x.params["bandwidth"])
                                     for x in results}) > 1:
            p = r.params
            label += f", {p['memory'] >> 30} GiB, {p['dirty_rate'] / 1e6:g} MB/s, {p['bandwidth'] / 1e9:g} GB/s"
        t = [p.t for p in r.timeline]
        line, = top.plot(t, [p.dirty_pages * PAGE_SIZE / (1 << 30) for p in r.timeline], label=label)
        bottom.plot(t, [p.bytes_sent / (1 << 30) for p in r.timeline], color=line.get_color(), label=label)
        if r.stop_time is not None:
            for ax in (top, bottom):
                ax.axvspan(r.stop_time, r.total_time, color=line.get_color(), alpha=0.2)
                ax.axvline(r.stop_time, color=line.get_color(), ls="--", lw=0.8)
    top.set_ylabel("dirty memory left to send (GiB)")
    bottom.set_ylabel("bytes sent (GiB)")
    bottom.set_xlabel("virtual time (s); dashed line + band: stop-and-copy (downtime)")
    top.legend(fontsize=8)
    top.set_title("kvmdirty migrate: pre-copy timeline")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
