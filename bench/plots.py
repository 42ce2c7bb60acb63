"""Roofline and bandwidth-vs-tokens plots (PNG). Needs matplotlib: ``pip install 'mhc-kernels[report]'``.

* :func:`roofline` -- log-log arithmetic intensity (FLOP/B) vs achieved throughput
  (FLOP/s), the bandwidth roof(s) (the ceiling used, and the datasheet one when it
  differs) and, where known, the compute roofs; one point per op/implementation/shape:
  one colour per op (:func:`op_colours`), one marker per implementation
  (:func:`impl_markers`; baselines hollow), marker size by T (:func:`t_sizes`), the
  points of one (op, implementation, n, C) joined in T order. The op legend sits right
  of the axes, the roofs/implementations/T legend below them.
* :func:`bandwidth_vs_tokens` -- one figure per op: achieved GB/s vs T (log x), one
  line per implementation (marker as in the roofline) and (n, C) (colour), with the
  bandwidth ceiling drawn; the GB/s axis is logarithmic when the plotted values span
  more than :data:`LOG_SPAN` (:func:`log_axis`).

The mapping functions are plain Python (no matplotlib); matplotlib is imported only
inside the drawing functions, with the non-interactive Agg backend.
"""

from __future__ import annotations

import colorsys
import importlib.util
import math
from pathlib import Path
from typing import Iterable

from .runner import BASELINES, TARGETS

INSTALL_HINT = "pip install 'mhc-kernels[report]'  (or: pip install matplotlib)"

# A value axis is logarithmic when its largest value exceeds its smallest positive one by more than this.
LOG_SPAN = 20.0

# Distinct colours, the most distinguishable first: matplotlib's tab10, the dark then the middle shades of
# tab20b's five hues, then tab20's light shades; past these, hues spread by the golden ratio.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
    "#6b6ecf", "#b5cf6b", "#e7ba52", "#d6616b", "#ce6dbd",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)
# Fixed per implementation, so a backend keeps its marker across runs and plots; baselines are drawn hollow.
IMPL_MARKERS = {"reference": "o", "triton": "s", "tilelang": "D", "eager": "^", "compile": "v"}
_SPARE_MARKERS = "PX*hp<>8H"
T_SIZE_RANGE = (14.0, 140.0)  # marker area (pt^2) of the smallest and the largest T


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- mappings (no matplotlib) ------------------------------------------------------------------------
def _colour(i: int) -> str:
    if i < len(PALETTE):
        return PALETTE[i]
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.8)
    return "#%02x%02x%02x" % (round(r * 255), round(g * 255), round(b * 255))


def distinct_colours(keys: Iterable) -> dict:
    """One colour per key, in the order given (first seen first), no two alike."""
    out: dict = {}
    for k in keys:
        if k not in out:
            out[k] = _colour(len(out))
    return out


def op_order(ops: Iterable[str]) -> list[str]:
    """The ops in the benchmark's order (forward, backward, the site; :data:`runner.TARGETS`), others after."""
    ops = set(ops)
    return [t for t in TARGETS if t in ops] + sorted(ops - set(TARGETS))


def op_colours(ops: Iterable[str]) -> dict:
    """One distinct colour per op, assigned in :func:`op_order` (so a run of all ops colours alike each time)."""
    return distinct_colours(op_order(ops))


def impl_markers(impls: Iterable[str]) -> dict:
    """One distinct marker per implementation: fixed ones for the known backends and baselines."""
    impls = set(impls)
    known = [i for i in IMPL_MARKERS if i in impls]
    out = {i: IMPL_MARKERS[i] for i in known}
    for i, impl in enumerate(sorted(impls - set(known))):
        out[impl] = _SPARE_MARKERS[i % len(_SPARE_MARKERS)]
    return out


def t_sizes(tokens: Iterable[int]) -> dict:
    """Marker area per token count: growing with T, evenly spaced by rank (a T sweep is geometric)."""
    ts = sorted(set(tokens))
    lo, hi = T_SIZE_RANGE
    if len(ts) == 1:
        return {ts[0]: (lo + hi) / 3}
    return {t: lo + (hi - lo) * i / (len(ts) - 1) for i, t in enumerate(ts)}


def log_axis(values: Iterable[float], span: float = LOG_SPAN) -> bool:
    """Whether an axis over ``values`` should be logarithmic: the positive values span more than ``span``x."""
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return bool(vals) and max(vals) / min(vals) > span


def _ceilings(run: dict) -> list[tuple[float, str, str]]:
    """(GB/s, label, line style) of the bandwidth roofs to draw."""
    out = []
    if run.get("ceiling_gbps"):
        out.append((run["ceiling_gbps"], f"bandwidth ceiling {run['ceiling_gbps']:.0f} GB/s", "-"))
    ds = run["device"].get("datasheet_bw_gbps")
    if ds and ds != run.get("ceiling_gbps"):
        out.append((ds, f"datasheet {ds:.0f} GB/s", "--"))
    return out


def bandwidth_yscale(records: list[dict], run: dict, op: str) -> str:
    """``"log"`` or ``"linear"`` for the GB/s axis of :func:`bandwidth_vs_tokens`: over the plotted values,
    the bandwidth ceilings included (they set the axis range too)."""
    vals = [r["gbps"] for r in records if r["status"] == "ok" and r["op"] == op and r["gbps"]]
    return "log" if log_axis(vals + [c[0] for c in _ceilings(run)]) else "linear"


def _fmt_t(t: int) -> str:
    return f"{t // 1024}K" if t >= 1024 and t % 1024 == 0 else str(t)


# -- figures -----------------------------------------------------------------------------------------
def roofline(records: list[dict], run: dict, path: Path) -> Path:
    plt = _plt()
    from matplotlib.lines import Line2D

    ok = [r for r in records if r["status"] == "ok" and r["intensity"] and r["tflops"]]
    fig, ax = plt.subplots(figsize=(9, 6.5))
    colours = op_colours(r["op"] for r in ok)
    markers = impl_markers(r["impl"] for r in ok)
    sizes = t_sizes(r["T"] for r in ok)
    xs = [r["intensity"] for r in ok] or [0.1, 10]
    lo, hi = min(xs) / 3, max(max(xs) * 3, 10)
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    dm = run["device"]
    peaks = {k: v for k, v in (dm.get("datasheet_tflops") or {}).items() if v}
    top = max(peaks.values()) * 1e12 if peaks else None
    key_handles = []
    for bw, label, ls in _ceilings(run):
        ys = [x * bw * 1e9 for x in grid]
        if top:
            ys = [min(y, top) for y in ys]
        key_handles += ax.plot(grid, ys, ls, color="black", lw=1.2, label=label)
    for prec, tf in peaks.items():
        key_handles.append(ax.axhline(tf * 1e12, color="gray", lw=0.8, ls=":", label=f"{prec} peak {tf:.0f} TFLOP/s"))
    series: dict = {}
    for r in ok:
        series.setdefault((r["op"], r["impl"], r["n"], r["C"]), []).append(r)
    for (op, impl, _n, _C), pts in series.items():
        pts.sort(key=lambda r: r["T"])
        x = [r["intensity"] for r in pts]
        y = [r["tflops"] * 1e12 for r in pts]
        c = colours[op]
        if len(pts) > 1:
            ax.plot(x, y, "-", color=c, lw=0.6, alpha=0.35, zorder=1)
        hollow = impl in BASELINES
        ax.scatter(x, y, s=[sizes[r["T"]] for r in pts], marker=markers[impl], zorder=2, alpha=0.85,
                   facecolors="none" if hollow else c, edgecolors=c, linewidths=1.0 if hollow else 0.4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, spec minimum bytes)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(f"Roofline: {dm['name']} ({run['config']['dtype']})")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    op_handles = [Line2D([], [], ls="", marker="o", ms=6, color=c, label=op) for op, c in colours.items()]
    no_flops = op_order({r["op"] for r in records if r["status"] == "ok"} - set(colours))
    if no_flops:  # zero FLOPs (expand) has no place on a log FLOP/s axis
        op_handles.append(Line2D([], [], ls="", label=f"not drawn (0 FLOPs): {', '.join(no_flops)}"))
    impl_handles = [Line2D([], [], ls="", marker=m, ms=6, color="dimgray",
                           markerfacecolor="none" if i in BASELINES else "dimgray",
                           label=f"{i} (baseline)" if i in BASELINES else i) for i, m in markers.items()]
    shown_t = list(sizes)
    if len(shown_t) > 8:
        shown_t = [shown_t[round(i * (len(shown_t) - 1) / 7)] for i in range(8)]
    t_handles = [Line2D([], [], ls="", marker="o", color="lightgray", markeredgecolor="dimgray",
                        ms=math.sqrt(sizes[t]), label=f"T={_fmt_t(t)}") for t in shown_t]
    extra = []
    if op_handles:
        ops_legend = ax.legend(handles=op_handles, title="op", fontsize=7, title_fontsize=8, loc="upper left",
                               bbox_to_anchor=(1.01, 1.0), ncol=1 if len(op_handles) <= 26 else 2, frameon=False)
        ax.add_artist(ops_legend)
        extra.append(ops_legend)
    key = key_handles + impl_handles + t_handles
    if key:
        extra.append(ax.legend(handles=key, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1),
                               ncol=min(len(key), 5), frameon=False, columnspacing=1.2))
    fig.savefig(path, dpi=110, bbox_inches="tight", bbox_extra_artists=extra)
    plt.close(fig)
    return Path(path)


def bandwidth_vs_tokens(records: list[dict], run: dict, op: str, path: Path) -> Path:
    plt = _plt()
    ok = [r for r in records if r["status"] == "ok" and r["op"] == op and r["gbps"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict = {}
    for r in ok:
        series.setdefault((r["impl"], r["n"], r["C"]), []).append((r["T"], r["gbps"]))
    markers = impl_markers(k[0] for k in series)
    colours = distinct_colours(sorted({(k[1], k[2]) for k in series}))
    order = list(markers)
    for (impl, n, C), pts in sorted(series.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1:])):
        pts.sort()
        c = colours[(n, C)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if impl in BASELINES else "-",
                marker=markers[impl], ms=5, color=c, markerfacecolor="none" if impl in BASELINES else c,
                label=f"{impl} n={n} C={C}")
    for bw, label, ls in _ceilings(run):
        ax.axhline(bw, color="black", lw=1, ls=ls, label=label)
    ax.set_xscale("log", base=2)
    ts = sorted({r["T"] for r in ok})
    if ts:
        ax.set_xticks(ts, [_fmt_t(t) for t in ts])
        ax.minorticks_off()
    yscale = bandwidth_yscale(records, run, op)
    ax.set_yscale(yscale)
    if yscale == "linear":
        ax.set_ylim(bottom=0)
    ax.set_xlabel("tokens T")
    ax.set_ylabel("achieved GB/s (spec minimum bytes)" + (", log scale" if yscale == "log" else ""))
    ax.set_title(f"{op}: bandwidth vs tokens on {run['device']['name']}")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
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
