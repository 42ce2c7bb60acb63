"""Roofline and bandwidth-vs-tokens plots (PNG). Needs matplotlib: ``pip install 'mhc-kernels[report]'``.

* :func:`roofline` -- log-log arithmetic intensity (FLOP/B) vs achieved throughput
  (FLOP/s), the bandwidth roof(s) (the ceiling used, and the datasheet one when it
  differs) and, where known, the compute roofs; one point per op/implementation/shape.
* :func:`bandwidth_vs_tokens` -- one figure per op: achieved GB/s vs T (log x), one
  line per implementation and (n, C), with the bandwidth ceiling drawn.

matplotlib is imported only inside these functions, with the non-interactive Agg backend.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

INSTALL_HINT = "pip install 'mhc-kernels[report]'  (or: pip install matplotlib)"


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = "osD^v<>pPX*h"


def roofline(records: list[dict], run: dict, path: Path) -> Path:
    plt = _plt()
    ok = [r for r in records if r["status"] == "ok" and r["intensity"] and r["tflops"]]
    fig, ax = plt.subplots(figsize=(9, 6))
    impls = sorted({r["impl"] for r in ok})
    ops = sorted({r["op"] for r in ok})
    cmap = plt.get_cmap("tab20")
    xs = [r["intensity"] for r in ok] or [0.1, 10]
    lo, hi = min(xs) / 3, max(max(xs) * 3, 10)
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    dm = run["device"]
    roofs = []
    if run.get("ceiling_gbps"):
        roofs.append((run["ceiling_gbps"], f"bandwidth ceiling {run['ceiling_gbps']:.0f} GB/s", "-"))
    if dm.get("datasheet_bw_gbps") and dm["datasheet_bw_gbps"] != run.get("ceiling_gbps"):
        roofs.append((dm["datasheet_bw_gbps"], f"datasheet {dm['datasheet_bw_gbps']:.0f} GB/s", "--"))
    peaks = {k: v for k, v in (dm.get("datasheet_tflops") or {}).items() if v}
    top = max(peaks.values()) * 1e12 if peaks else None
    for bw, label, ls in roofs:
        ys = [x * bw * 1e9 for x in grid]
        if top:
            ys = [min(y, top) for y in ys]
        ax.plot(grid, ys, ls, color="black", lw=1.2, label=label)
    for prec, tf in peaks.items():
        ax.axhline(tf * 1e12, color="gray", lw=0.8, ls=":", label=f"{prec} peak {tf:.0f} TFLOP/s")
    for i, op in enumerate(ops):
        for j, impl in enumerate(impls):
            pts = [r for r in ok if r["op"] == op and r["impl"] == impl]
            if not pts:
                continue
            ax.scatter([r["intensity"] for r in pts], [r["tflops"] * 1e12 for r in pts], s=18,
                       color=cmap(i % 20), marker=_MARKERS[j % len(_MARKERS)], alpha=0.8,
                       label=f"{op} / {impl}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, spec minimum bytes)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(f"Roofline: {dm['name']} ({run['config']['dtype']})")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def bandwidth_vs_tokens(records: list[dict], run: dict, op: str, path: Path) -> Path:
    plt = _plt()
    ok = [r for r in records if r["status"] == "ok" and r["op"] == op and r["gbps"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict = {}
    for r in ok:
        series.setdefault((r["impl"], r["n"], r["C"]), []).append((r["T"], r["gbps"]))
    impls = sorted({k[0] for k in series})
    shapes = sorted({(k[1], k[2]) for k in series})
    cmap = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    for (impl, n, C), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[impls.index(impl) % len(styles)],
                marker=_MARKERS[impls.index(impl) % len(_MARKERS)], ms=4,
                color=cmap(shapes.index((n, C)) % 10), label=f"{impl} n={n} C={C}")
    if run.get("ceiling_gbps"):
        ax.axhline(run["ceiling_gbps"], color="black", lw=1, label=f"ceiling {run['ceiling_gbps']:.0f} GB/s")
    ds = run["device"].get("datasheet_bw_gbps")
    if ds and ds != run.get("ceiling_gbps"):
        ax.axhline(ds, color="black", lw=1, ls="--", label=f"datasheet {ds:.0f} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens T")
    ax.set_ylabel("achieved GB/s (spec minimum bytes)")
    ax.set_title(f"{op}: bandwidth vs tokens on {run['device']['name']}")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_plots(records: list[dict], run: dict, out_dir: Path) -> dict:
    """All plots into ``out_dir``; returns ``{title: file name relative to out_dir}``."""
    out_dir = Path(out_dir)
    made = {}
    if any(r["status"] == "ok" for r in records):
        roofline(records, run, out_dir / "roofline.png")
        made["Roofline"] = "roofline.png"
    for op in dict.fromkeys(r["op"] for r in records if r["status"] == "ok"):
        name = f"bandwidth_{op}.png"
        bandwidth_vs_tokens(records, run, op, out_dir / name)
        made[f"{op}: GB/s vs tokens"] = name
    return made
