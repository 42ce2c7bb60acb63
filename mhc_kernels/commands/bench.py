"""``mhc-kernels bench``: latency, bandwidth and roofline report of every op, backend and baseline.

Writes ``bench.json`` (one record per measurement; fields in
:mod:`mhc_kernels.bench.report`), ``bench.csv``, ``report.md`` and, with matplotlib
installed (``pip install 'mhc-kernels[report]'``), ``roofline.png`` and one
``bandwidth_<op>.png`` per op into ``--out``. ``--quick`` is a sub-minute run
against the eager baseline (on CPU the reference backend, on CUDA every available
backend); ``--compare OLD.json`` prints the per-row change against an earlier run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mhc_kernels import registry
from mhc_kernels.commands import device_for
from mhc_kernels.specs import DTYPES_BY_NAME

DEFAULT_TOKENS = (1, 16, 256, 1024, 4096, 16384, 65536)
DEFAULT_N = (2, 4, 8)
DEFAULT_HIDDEN = (1280, 4096, 7168)
QUICK = dict(tokens=(1, 1024), n=(4,), hidden=(1280,), baselines=("eager",), budget=0.08, min_repeats=3,
             max_repeats=30, warmup=1, copy_bytes=128 << 20)
OP_GROUPS = ("all", "fwd", "bwd", "fused", "single_pass")


def _split(values, cast=str) -> list:
    out = []
    for v in values or ():
        out += [cast(x) for x in str(v).split(",") if x.strip()]
    return out


def resolve_ops(names) -> list:
    from mhc_kernels.bench.runner import FUSED, SINGLE_PASS, TARGETS

    names = _split(names) or ["all"]
    out = []
    for nm in names:
        if nm == "all":
            out += list(TARGETS)
        elif nm in ("fwd", "bwd"):
            out += [t for t, tg in TARGETS.items() if tg.pass_ == nm]
        elif nm == "fused":
            out += list(FUSED)
        elif nm == "single_pass":
            out += list(SINGLE_PASS)
        elif nm in TARGETS:
            out.append(nm)
        else:
            raise SystemExit(f"mhc-kernels bench: unknown op '{nm}'; choose from {', '.join(OP_GROUPS)} or "
                             f"{', '.join(TARGETS)}")
    return list(dict.fromkeys(out))


def default_backends(device: torch.device) -> tuple[list, list]:
    """Available backends on ``device`` and notes on the ones left out."""
    chosen, notes = [], []
    for name, st in registry.available_backends(device).items():
        if not st.available:
            notes.append(f"{name}: {st.reason}")
        elif name in ("triton", "tilelang") and device.type != "cuda":
            how = "the interpreter" if name == "triton" else "the CPU-thread emulator"
            notes.append(f"{name}: left out on CPU (it would run under {how}, which times nothing "
                         f"meaningful); pass --backends {name} to force it")
        else:
            chosen.append(name)
    return chosen, notes


def run(args) -> int:
    from mhc_kernels.bench import device as devmod
    from mhc_kernels.bench import plots, report, runner, timing

    con = Console()
    if not con.is_terminal:  # a log or a pipe: do not squeeze the table into 80 columns
        con = Console(width=max(con.width, 150))
    t_start = time.perf_counter()
    dev = device_for("bench", args.device)
    quick = args.quick
    notes = []
    threads = args.threads if args.threads is not None else (1 if quick and dev.type == "cpu" else None)
    if threads is not None and dev.type == "cpu":
        torch.set_num_threads(threads)
        if args.threads is None:
            notes.append("--quick on CPU runs single-threaded (stable on a shared machine; the copy-bandwidth "
                         "ceiling is measured the same way); --threads N changes it")
    if dev.type == "cpu":
        alloc_note = devmod.cpu_allocator_note()
        if alloc_note:
            notes.append(alloc_note)
    ops = resolve_ops(args.ops)
    tokens = _split(args.tokens, int) or list(QUICK["tokens"] if quick else DEFAULT_TOKENS)
    ns = _split(args.n, int) or list(QUICK["n"] if quick else DEFAULT_N)
    hiddens = _split(args.hidden, int) or list(QUICK["hidden"] if quick else DEFAULT_HIDDEN)
    if args.backends:
        backends = _split(args.backends)
        for b in backends:
            if b not in registry.BACKENDS:
                raise SystemExit(f"mhc-kernels bench: unknown backend '{b}'; "
                                 f"choose from {', '.join(registry.BACKENDS)}")
    elif quick and dev.type == "cpu":
        backends = ["reference"]  # the only CPU backend outside the Triton interpreter
    else:
        backends, left_out = default_backends(dev)
        notes += left_out
    if args.baselines is not None:
        baselines = [b for b in _split(args.baselines) if b != "none"]
        for b in baselines:
            if b not in runner.BASELINES:
                raise SystemExit(f"mhc-kernels bench: unknown baseline '{b}'; choose from "
                                 f"{', '.join(runner.BASELINES)} or none")
    else:
        baselines = list(QUICK["baselines"] if quick else runner.BASELINES)
    if quick and "compile" not in baselines:
        notes.append("--quick leaves out the torch.compile baseline (compiling takes longer than the whole run); "
                     "add --baselines eager,compile to include it")
    if getattr(args, "decode", False):
        return _run_decode(con, args, dev, backends, notes)
    cfg = runner.SweepConfig(
        targets=ops, backends=backends, baselines=baselines, tokens=tokens, ns=ns, hiddens=hiddens,
        dtype=DTYPES_BY_NAME[args.dtype], device=str(dev),
        budget_s=args.budget if args.budget is not None else (QUICK["budget"] if quick else 0.3),
        min_repeats=QUICK["min_repeats"] if quick else 5, max_repeats=QUICK["max_repeats"] if quick else 100,
        warmup=QUICK["warmup"] if quick else 3, batch_invariant=bool(getattr(args, "batch_invariant", False)),
        fp8=bool(getattr(args, "fp8", False)))

    with con.status(f"measuring the copy bandwidth of {dev} ..."):
        dm = devmod.describe_device(dev, measure=True, copy_bytes=QUICK["copy_bytes"] if quick else None)
    dm.notes.extend(notes)
    argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else []
    run_info = report.run_info(dm, cfg, timing.method_name(dev), argv)

    old = None
    if args.compare:
        _old_run, old = report.load_json(args.compare)

    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=con, transient=True) as prog:
        task = prog.add_task("benchmarking", total=cfg.total())
        measurements = runner.run_sweep(cfg, lambda desc: prog.update(task, advance=1, description=desc))
    records = report.build_records(measurements, run_info)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "bench.json", run_info, records)
    report.write_csv(out / "bench.csv", records)
    made, plot_note = {}, ""
    if args.no_plots:
        plot_note = "Plots were turned off (--no-plots)."
    elif plots.available():
        try:
            made = plots.write_plots(records, run_info, out)
        except Exception as e:  # noqa: BLE001 -- a plotting failure must not lose the data
            plot_note = f"Plotting failed: {type(e).__name__}: {e}"
    else:
        plot_note = f"No plots: matplotlib is not installed. To get them: `{plots.INSTALL_HINT}`."
    cmp_rows = report.compare(old, records) if old is not None else None
    report.write_markdown(out / "report.md", run_info, records, made, plot_note, cmp_rows,
                          files={"JSON": "bench.json", "CSV": "bench.csv"})

    report.print_table(con, run_info, records)
    if cmp_rows is not None:
        report.print_compare(con, cmp_rows, args.compare)
    written = ["bench.json", "bench.csv", "report.md"] + list(made.values())
    con.print(f"wrote {', '.join(str(out / w) for w in written)}")
    if plot_note and not made:
        con.print(f"[yellow]{escape(plot_note)}[/]")
    con.print(f"[dim]{len(records)} measurements in {time.perf_counter() - t_start:.1f} s[/]")
    # a failing backend fails the command; a failing baseline (e.g. no compiler for torch.compile) only warns
    return 0 if all(r["status"] != "error" or r["impl_kind"] == "baseline" for r in records) else 1


def _run_decode(con, args, dev, backends, notes) -> int:
    """``bench --decode``: the decode table (bench/decode.py) and ``decode.json``."""
    import json

    from rich.table import Table

    from mhc_kernels.bench import decode

    tokens = _split(args.tokens, int) or list(decode.DECODE_TOKENS)
    n = (_split(args.n, int) or [decode.DECODE_N])[0]
    C = (_split(args.hidden, int) or [decode.DECODE_C])[0]
    with con.status("timing decode boundaries ..."):
        rows = decode.run_decode(backends, tokens, n, C, DTYPES_BY_NAME[args.dtype], dev)
    tab = Table(title=f"decode: µs per boundary on {dev} (n={n}, C={C}, {args.dtype}, with the sublayer norm)")
    for col, just in (("op", "left"), ("backend", "left"), ("T", "right"), ("eager µs", "right"),
                      ("CUDA graph µs", "right"), ("note", "left")):
        tab.add_column(col, justify=just)
    for r in rows:
        tab.add_row(r.op, r.backend, str(r.T), "—" if r.eager_us is None else f"{r.eager_us:,.1f}",
                    "—" if r.graph_us is None else f"{r.graph_us:,.1f}", escape(r.note))
    con.print(tab)
    for note in notes:
        con.print(f"[dim]Note: {escape(note)}[/]")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps({"device": str(dev), "n": n, "C": C, "dtype": args.dtype,
                                                 "rows": [r.to_dict() for r in rows]}, indent=1))
    con.print(f"wrote {out / 'decode.json'}")
    return 0 if all(r.eager_us is not None for r in rows) else 1
