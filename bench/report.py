"""Benchmark records and reports: JSON, CSV, Markdown, the terminal table, ``--compare``.

JSON layout (``bench.json``)::

    {"schema": 2, "run": {...run-level facts...}, "records": [record, ...]}

One **record** per measurement (one op/target x implementation x shape), flat, so the
CSV (``bench.csv``) has the same columns. Fields (:data:`RECORD_FIELDS`; ``None``
where a value does not exist, e.g. no timing for a skipped row, no datasheet on CPU):

=====================  ===========================================================================
field                  meaning
=====================  ===========================================================================
schema                 record schema version (2: ``compute_relevant`` added, roofline fields null
                       where the device lacks a roof the row needs)
run_id                 identifier of the run (UTC timestamp) the record belongs to
op                     target: an op of ``mhc_kernels.specs.SPECS`` or ``mhc_site`` (pre+post fwd+bwd)
pass                   ``fwd`` (inference, no grad), ``bwd`` (backward op) or ``fwd+bwd``
fused                  true for the fused paths: ``mhc_pre``, ``post_pre``, ``mhc_site``
impl                   ``reference`` / ``triton`` / ``tilelang`` (a backend) or ``eager`` / ``compile``
impl_kind              ``backend`` or ``baseline`` (the PyTorch transcription of the contract)
T, n, C                tokens, streams, hidden width
dtype                  residual dtype: ``bf16``, ``fp16`` or ``fp32``
status                 ``ok``, ``skipped`` (cannot serve / does not fit) or ``error``
note                   why a row is skipped or failed (empty when ok)
bytes                  minimum bytes moved, from ``SPECS[op].bytes`` (site: sum of its four ops)
flops                  FLOPs, from ``SPECS[op].flops``
intensity              flops / bytes (FLOP per byte)
compute_relevant       intensity >= ``runner.COMPUTE_INTENSITY`` (4 FLOP/B): the FLOPs bear on the time; the
                       tables show TFLOP/s only then (``tflops`` stays in the data for every row)
median_us              median latency of one call, microseconds
p20_us, p80_us         20th and 80th percentile latency, microseconds
repeats                number of timed calls
gbps                   bytes / median time, decimal GB/s
tflops                 flops / median time, TFLOP/s
pct_measured_bw        gbps as % of the bandwidth ceiling (measured copy bandwidth; see ceiling_source)
pct_datasheet_bw       gbps as % of the datasheet bandwidth (GPU only)
roofline_us            roofline time: max(bytes / ceiling bandwidth, flops / peak FLOP/s); None without a
                       bandwidth ceiling, or for a compute-relevant row without a compute roof (CPU, unknown GPU)
roofline_ratio         median time / roofline time (1.0 = at the roof); None where roofline_us is
speedup_vs_eager       eager transcription median / this median
speedup_vs_compile     torch.compile'd transcription median / this median
device                 device name (GPU name, or the CPU model)
device_type            ``cuda`` or ``cpu``
versions               {python, torch, cuda, triton, tilelang, mhc_kernels} (CSV: ``k=v;...``)
timing_method          how the latency was measured
ceiling_gbps           the bandwidth ceiling used for pct_measured_bw and roofline_us
ceiling_source         where ceiling_gbps came from
datasheet_bw_gbps      datasheet bandwidth (None when unknown)
peak_tflops            compute roof used for roofline_us (None when unknown, e.g. CPU)
peak_tflops_source     where peak_tflops came from (or why it is unknown)
=====================  ===========================================================================
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import json
import math
import platform
from pathlib import Path
from typing import Optional

import torch

from mhc_kernels.specs import dtype_name

from .runner import BASELINES, COMPUTE_INTENSITY, FUSED, TARGETS, Measurement, compute_relevant, derive

SCHEMA = 2
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
RECORD_FIELDS: dict[str, tuple] = {
    "schema": (int,), "run_id": (str,), "op": (str,), "pass": (str,), "fused": (bool,), "impl": (str,),
    "impl_kind": (str,), "T": (int,), "n": (int,), "C": (int,), "dtype": (str,), "status": (str,),
    "note": (str,), "bytes": (int,), "flops": _NUM, "intensity": _OPT_NUM, "compute_relevant": (bool,),
    "median_us": _OPT_NUM,
    "p20_us": _OPT_NUM, "p80_us": _OPT_NUM, "repeats": (int, type(None)), "gbps": _OPT_NUM,
    "tflops": _OPT_NUM, "pct_measured_bw": _OPT_NUM, "pct_datasheet_bw": _OPT_NUM, "roofline_us": _OPT_NUM,
    "roofline_ratio": _OPT_NUM, "speedup_vs_eager": _OPT_NUM, "speedup_vs_compile": _OPT_NUM,
    "device": (str,), "device_type": (str,), "versions": (dict,), "timing_method": (str,),
    "ceiling_gbps": _OPT_NUM, "ceiling_source": (str,), "datasheet_bw_gbps": _OPT_NUM,
    "peak_tflops": _OPT_NUM, "peak_tflops_source": (str,),
}
STATUSES = ("ok", "skipped", "error")
KEY = ("op", "pass", "impl", "T", "n", "C", "dtype")


def validate_record(r: dict) -> list[str]:
    """Problems with one record (empty list = valid)."""
    probs = []
    for k, types in RECORD_FIELDS.items():
        if k not in r:
            probs.append(f"missing field '{k}'")
        elif isinstance(r[k], bool) and bool not in types:
            probs.append(f"field '{k}' is a bool")
        elif not isinstance(r[k], types):
            probs.append(f"field '{k}' has type {type(r[k]).__name__}")
    extra = set(r) - set(RECORD_FIELDS)
    if extra:
        probs.append(f"unknown fields {sorted(extra)}")
    if probs:
        return probs
    if r["status"] not in STATUSES:
        probs.append(f"status {r['status']!r}")
    if r["status"] == "ok":
        for k in ("median_us", "p20_us", "p80_us", "gbps", "repeats"):
            if r[k] is None:
                probs.append(f"ok record without '{k}'")
        if not probs and not (r["p20_us"] <= r["median_us"] <= r["p80_us"]):
            probs.append("percentiles out of order")
    if r["impl_kind"] not in ("backend", "baseline"):
        probs.append(f"impl_kind {r['impl_kind']!r}")
    return probs


def versions() -> dict:
    def v(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    import mhc_kernels

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": v("triton"), "tilelang": v("tilelang"), "mhc_kernels": mhc_kernels.__version__}


def run_info(dm, cfg, timing_method: str, argv: Optional[list] = None) -> dict:
    """Run-level facts stored once at the top of the JSON (and repeated per record where required)."""
    peak, peak_src = dm.compute_ceiling("fp32")
    return {
        "run_id": _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "command": "mhc-kernels bench " + " ".join(argv or []),
        "device": dm.to_dict(),
        "versions": versions(),
        "timing_method": timing_method,
        "ceiling_gbps": dm.ceiling_gbps,
        "ceiling_source": dm.ceiling_source,
        "peak_tflops": peak,
        "peak_tflops_source": peak_src + ("; the mixing math of the contract is float32" if peak else ""),
        "config": {"targets": list(cfg.targets), "backends": list(cfg.backends), "baselines": list(cfg.baselines),
                   "tokens": list(cfg.tokens), "n": list(cfg.ns), "hidden": list(cfg.hiddens),
                   "dtype": dtype_name(cfg.dtype), "device": str(cfg.device)},
    }


def build_records(measurements: list[Measurement], run: dict) -> list[dict]:
    dm = run["device"]
    base_times: dict = {}
    for m in measurements:
        if m.impl in BASELINES and m.timing is not None:
            base_times[(m.target, m.T, m.n, m.C, m.dtype, m.impl)] = m.timing.median_s
    recs = []
    for m in measurements:
        bt = {b: base_times.get((m.target, m.T, m.n, m.C, m.dtype, b)) for b in BASELINES if b != m.impl}
        d = derive(m, bt, run["ceiling_gbps"], dm.get("datasheet_bw_gbps"), run["peak_tflops"])
        rec = {
            "schema": SCHEMA, "run_id": run["run_id"], "op": m.target, "pass": TARGETS[m.target].pass_,
            "fused": m.target in FUSED, "impl": m.impl, "impl_kind": "baseline" if m.impl in BASELINES else "backend",
            "T": m.T, "n": m.n, "C": m.C, "dtype": dtype_name(m.dtype), "status": m.status, "note": m.note,
            "bytes": int(m.bytes), "flops": float(m.flops), "intensity": d["intensity"],
            "compute_relevant": d["compute_relevant"],
            "median_us": d["median_us"], "p20_us": d["p20_us"], "p80_us": d["p80_us"],
            "repeats": m.timing.repeats if m.timing else None,
            "gbps": d["gbps"], "tflops": d["tflops"], "pct_measured_bw": d["pct_measured_bw"],
            "pct_datasheet_bw": d["pct_datasheet_bw"], "roofline_us": d["roofline_us"],
            "roofline_ratio": d["roofline_ratio"], "speedup_vs_eager": d["speedup_vs_eager"],
            "speedup_vs_compile": d["speedup_vs_compile"],
            "device": dm["name"], "device_type": dm["device_type"], "versions": run["versions"],
            "timing_method": run["timing_method"] if m.timing else "",
            "ceiling_gbps": run["ceiling_gbps"], "ceiling_source": run["ceiling_source"],
            "datasheet_bw_gbps": dm.get("datasheet_bw_gbps"), "peak_tflops": run["peak_tflops"],
            "peak_tflops_source": run["peak_tflops_source"],
        }
        recs.append(rec)
    return recs


# -- files ----------------------------------------------------------------------------------------
def write_json(path: Path, run: dict, records: list[dict]) -> None:
    Path(path).write_text(json.dumps({"schema": SCHEMA, "run": run, "records": records}, indent=1) + "\n")


def load_json(path) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "records" not in data:
        raise ValueError(f"{path}: not a mhc-kernels bench JSON (no 'records')")
    return data.get("run", {}), data["records"]


def write_csv(path: Path, records: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(RECORD_FIELDS))
        w.writeheader()
        for r in records:
            row = dict(r)
            row["versions"] = ";".join(f"{k}={v}" for k, v in r["versions"].items())
            w.writerow(row)


# -- formatting -------------------------------------------------------------------------------------
# One unit per column, named in the header (µs, GB/s, %, TFLOP/s, FLOP/B; the speedup columns' cells carry
# their "x"): every cell is a plain number in that unit, thousands grouped with ",", or NA where the value
# does not exist or is not meaningful for the row (runner.compute_relevant, runner.roof_known).
NA = "\u2014"  # an em dash


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x)))


def fmt(x, spec: str = ".1f", none: str = NA) -> str:
    return none if _missing(x) else format(x, spec)


def fmt_us(x) -> str:
    """Microseconds, always (the column header carries the unit): 0.1 µs resolution below 100 µs, whole
    microseconds from there, thousands grouped (a 156 ms call reads ``156,000``)."""
    if _missing(x):
        return NA
    return f"{x:.1f}" if abs(x) < 100 else f"{x:,.0f}"


def fmt_sig(x, digits: int = 3) -> str:
    """``digits`` significant digits in fixed point, never an exponent: 0.0671, 25.6, 172, 3,350."""
    if _missing(x):
        return NA
    if x == 0:
        return "0"
    dec = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    if dec and abs(round(x, dec)) >= 10 ** (digits - dec):  # 9.996 rounds up a decade: 10.0, not 10.00
        dec -= 1
    return f"{x:,.{dec}f}"


def fmt_x(x) -> str:
    """A speedup: three significant digits and an ``x`` (1.00x, 0.250x, 12.3x)."""
    return NA if _missing(x) else f"{fmt_sig(x)}x"


def shown_tflops(r: dict) -> Optional[float]:
    """A record's TFLOP/s where the tables show it: only where its FLOPs are compute-relevant
    (runner.compute_relevant), else None."""
    relevant = r.get("compute_relevant")
    if relevant is None:  # a record from before schema 2
        relevant = compute_relevant(r["flops"], r["bytes"])
    return r["tflops"] if relevant else None


class Scaled:
    """A column whose unit is picked for its values: the first of ``units`` ((header, factor) from the
    largest unit down) in which the column's largest value reaches 1, else the last; one unit per column."""

    def __init__(self, units: tuple, value):
        self.units, self.value = units, value

    def unit(self, records: list[dict]) -> tuple[str, float]:
        vals = [abs(v) for v in map(self.value, records) if not _missing(v)]
        top = max(vals, default=0.0)
        return next((u for u in self.units if top * u[1] >= 1), self.units[-1])

    def cells(self, records: list[dict]) -> tuple[str, list[str]]:
        header, factor = self.unit(records)
        return header, [NA if _missing(v) else fmt_sig(v * factor) for v in map(self.value, records)]


FLOPS_UNITS = (("TFLOP/s", 1.0), ("GFLOP/s", 1e3), ("MFLOP/s", 1e6))


def _range_us(r: dict) -> str:
    return NA if _missing(r["p20_us"]) else f"{fmt_us(r['p20_us'])}\u2013{fmt_us(r['p80_us'])}"


COLUMN_NOTE = (f"µs: median latency, p20\u2013p80: its 20th to 80th percentile; GB/s and FLOP/B from the spec "
               f"minimum bytes; FLOP/s (unit in the header, picked for the column's largest value) only where "
               f"FLOP/B >= {COMPUTE_INTENSITY:g}, where the FLOPs bear on the time; /roof: median over the roofline "
               f"time, only where the device has every roof the row needs (without a compute roof, e.g. on CPU, not "
               f"for rows with FLOP/s); {NA}: not measured or not meaningful")


def ceiling_lines(run: dict) -> list[str]:
    dm = run["device"]
    lines = [f"Device: {dm['name']} ({dm['device_type']})"]
    if run.get("ceiling_gbps"):
        lines.append(f"Bandwidth ceiling for '% BW': {run['ceiling_gbps']:.1f} GB/s ({run['ceiling_source']})")
    else:
        lines.append("Bandwidth ceiling: none (not measured, device unknown)")
    if dm.get("datasheet_bw_gbps"):
        lines.append(f"Datasheet bandwidth: {dm['datasheet_bw_gbps']:.0f} GB/s ({dm['datasheet_source']})")
    if dm.get("theoretical_bw_gbps"):
        lines.append(f"From device properties: {dm['theoretical_bw_gbps']:.0f} GB/s ({dm['theoretical_bw_source']})")
    if run.get("peak_tflops"):
        lines.append(f"Compute roof: {run['peak_tflops']:.1f} TFLOP/s ({run['peak_tflops_source']})")
    else:
        lines.append(f"Compute roof: {run.get('peak_tflops_source') or 'unknown'}")
    lines.append(f"Timing: {run['timing_method']}")
    for note in dm.get("notes", []):
        lines.append(f"Note: {note}")
    return lines


def record_notes(records: list[dict]) -> list[str]:
    """Caveats that follow from the numbers themselves."""
    over = sorted({r["op"] for r in records if (r.get("pct_measured_bw") or 0) > 100})
    if over:
        return [f"Above 100% of the copy ceiling ({', '.join(over)}): the working set fit in a cache; "
                f"use larger T for DRAM-bound numbers"]
    return []


# (header, record -> cell)
_COLUMNS = (
    ("op", lambda r: r["op"]),
    ("impl", lambda r: r["impl"]),
    ("T", lambda r: str(r["T"])),
    ("n", lambda r: str(r["n"])),
    ("C", lambda r: str(r["C"])),
    ("µs", lambda r: fmt_us(r["median_us"])),
    ("p20\u2013p80 µs", _range_us),
    ("GB/s", lambda r: fmt_sig(r["gbps"])),
    ("% BW", lambda r: fmt_sig(r["pct_measured_bw"])),
    ("% datasheet", lambda r: fmt_sig(r["pct_datasheet_bw"])),
    (None, Scaled(FLOPS_UNITS, shown_tflops)),
    ("FLOP/B", lambda r: fmt_sig(r["intensity"])),
    ("vs eager", lambda r: fmt_x(r["speedup_vs_eager"])),
    ("vs compile", lambda r: fmt_x(r["speedup_vs_compile"])),
    ("/roof", lambda r: fmt_sig(r["roofline_ratio"])),
)


def _render(records: list[dict], columns, fixed: int) -> tuple[list, list]:
    """(header, rows) of ``records`` over ``columns``; a column past the first ``fixed`` that is NA in every
    row is dropped."""
    header, cols = [], []
    for h, f in columns:
        if isinstance(f, Scaled):
            h, col = f.cells(records)
        else:
            col = [f(r) for r in records]
        if len(header) < fixed or any(c != NA for c in col):
            header.append(h)
            cols.append(col)
    return header, [list(row) for row in zip(*cols)] if cols and records else []


def table(records: list[dict]) -> tuple[list, list]:
    """(header, rows) of the ok records, dropping columns that are empty everywhere."""
    return _render([r for r in records if r["status"] == "ok"], _COLUMNS, 5)


def print_table(console, run: dict, records: list[dict]) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"mHC benchmarks on {run['device']['name']} ({run['config']['dtype']}); "
                    f"% BW = of {fmt(run.get('ceiling_gbps'), '.1f')} GB/s", show_lines=False)
    header, rows = table(records)
    for c in header:
        t.add_column(c, justify="left" if c in ("op", "impl") else "right", no_wrap=True)
    for row in rows:
        t.add_row(*row, style="dim" if row[1] in BASELINES else None)
    console.print(t)
    for line in [COLUMN_NOTE] + ceiling_lines(run) + record_notes(records):
        console.print(f"[dim]{escape(line)}[/]")
    bad = [r for r in records if r["status"] != "ok"]
    if bad:
        console.print(f"[yellow]{len(bad)} measurement(s) skipped or failed (see the Markdown report):[/]")
        for r in bad[:8]:
            console.print(f"  {r['op']} {r['impl']} T={r['T']} n={r['n']} C={r['C']}: {r['status']}: "
                          f"{escape(r['note'])}")


# -- compare ----------------------------------------------------------------------------------------------
def compare(old: list[dict], new: list[dict]) -> list[dict]:
    """Per-row change for every (op, pass, impl, T, n, C, dtype) measured ok in both runs."""
    idx = {tuple(r[k] for k in KEY): r for r in old if r.get("status") == "ok"}
    out = []
    for r in new:
        if r["status"] != "ok":
            continue
        o = idx.get(tuple(r[k] for k in KEY))
        if o is None:
            continue
        out.append({**{k: r[k] for k in KEY}, "old_us": o["median_us"], "new_us": r["median_us"],
                    "old_gbps": o["gbps"], "new_gbps": r["gbps"],
                    "change_pct": 100.0 * (r["median_us"] / o["median_us"] - 1.0) if o["median_us"] else None,
                    "speedup": (o["median_us"] / r["median_us"]) if r["median_us"] else None})
    return out


def print_compare(console, rows: list[dict], old_path: str) -> None:
    from rich.table import Table

    t = Table(title=f"change against {old_path} (time: negative = faster)")
    for c in ("op", "impl", "T", "n", "C", "old µs", "new µs", "change %", "old GB/s", "new GB/s"):
        t.add_column(c, justify="left" if c in ("op", "impl") else "right", no_wrap=True)
    for r in rows:
        ch = r["change_pct"]
        col = "green" if ch is not None and ch < -5 else "red" if ch is not None and ch > 5 else ""
        t.add_row(r["op"], r["impl"], str(r["T"]), str(r["n"]), str(r["C"]), fmt_us(r["old_us"]),
                  fmt_us(r["new_us"]), f"[{col}]{fmt(ch, '+.1f')}[/]" if col else fmt(ch, "+.1f"),
                  fmt_sig(r["old_gbps"]), fmt_sig(r["new_gbps"]))
    console.print(t)
    if not rows:
        console.print("[yellow]no measurement in common with the old run[/]")


# -- Markdown ---------------------------------------------------------------------------------------------
def _md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def headline(records: list[dict]) -> list[dict]:
    """Per op: the best backend row at the largest T measured (ties: largest n, C)."""
    best: dict = {}
    for r in records:
        if r["status"] != "ok" or r["impl_kind"] != "backend":
            continue
        key = r["op"]
        cur = best.get(key)
        rank = (r["T"], r["n"] * r["C"], r["gbps"] or 0)
        if cur is None or rank > (cur["T"], cur["n"] * cur["C"], cur["gbps"] or 0):
            best[key] = r
    return [best[k] for k in TARGETS if k in best]


_HEAD_COLUMNS = (
    ("op", lambda r: r["op"]),
    ("pass", lambda r: r["pass"]),
    ("backend", lambda r: r["impl"]),
    ("T x n x C", lambda r: f"{r['T']}x{r['n']}x{r['C']}"),
    ("µs", lambda r: fmt_us(r["median_us"])),
    ("GB/s", lambda r: fmt_sig(r["gbps"])),
    ("% BW (ceiling)", lambda r: fmt_sig(r["pct_measured_bw"])),
    ("% datasheet", lambda r: fmt_sig(r["pct_datasheet_bw"])),
    (None, Scaled(FLOPS_UNITS, shown_tflops)),
    ("/roof", lambda r: fmt_sig(r["roofline_ratio"])),
    ("vs eager", lambda r: fmt_x(r["speedup_vs_eager"])),
    ("vs compile", lambda r: fmt_x(r["speedup_vs_compile"])),
)


def write_markdown(path: Path, run: dict, records: list[dict], plots: dict, plot_note: str = "",
                   compare_rows: Optional[list] = None, files: Optional[dict] = None) -> None:
    cfg = run["config"]
    v = run["versions"]
    lines = [f"# mHC kernel benchmark: {run['device']['name']}", "",
             f"Run `{run['run_id']}`: `{run['command'].strip()}`", ""]
    lines += [f"- {ln}" for ln in ceiling_lines(run) + record_notes(records)]
    lines += ["- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
              f"- Sweep: ops {', '.join(cfg['targets'])}; backends {', '.join(cfg['backends']) or '-'}; "
              f"baselines {', '.join(cfg['baselines']) or '-'}; T {cfg['tokens']}; n {cfg['n']}; "
              f"C {cfg['hidden']}; dtype {cfg['dtype']}",
              "- Bytes and FLOPs are the op specs' minimums (`mhc_kernels.specs`): every input read once, every "
              "output written once. GB/s is decimal. `% BW` is of the bandwidth ceiling above.",
              f"- Columns: {COLUMN_NOTE}. `bench.json` keeps `tflops` for every row, with `compute_relevant`.", ""]
    if files:
        lines += ["Data: " + ", ".join(f"[{k}]({p})" for k, p in files.items()), ""]
    head = headline(records)
    if head:
        lines += ["## Headline: best backend per op at the largest shape", ""]
        header, rows = _render(head, _HEAD_COLUMNS, 4)
        lines += [_md_table(header, rows), ""]
    lines += ["## Plots", ""]
    if plots:
        for title, rel in plots.items():
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    else:
        lines += [plot_note or "No plots.", ""]
    if compare_rows is not None:
        lines += ["## Change against the previous run", ""]
        rows = [(r["op"], r["impl"], r["T"], r["n"], r["C"], fmt_us(r["old_us"]), fmt_us(r["new_us"]),
                 fmt(r["change_pct"], "+.1f")) for r in compare_rows]
        lines += [_md_table(("op", "impl", "T", "n", "C", "old µs", "new µs", "change %"), rows) if rows
                  else "No measurement in common.", ""]
    lines += ["## All measurements", ""]
    header, rows = table(records)
    lines += [_md_table(header, rows), ""]
    bad = [r for r in records if r["status"] != "ok"]
    if bad:
        lines += ["## Skipped or failed", ""]
        lines += [_md_table(("op", "impl", "T", "n", "C", "status", "why"),
                            [(r["op"], r["impl"], r["T"], r["n"], r["C"], r["status"],
                              r["note"].replace("|", "\\|")) for r in bad]), ""]
    Path(path).write_text("\n".join(lines))
