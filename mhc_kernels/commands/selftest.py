"""``mhc-kernels selftest``: the acceptance run of a new machine (first of all a new GPU node), in a time budget.

Stages, cheapest first; each runs in a child process with its own time cap (the smaller of the cap and what
is left of ``--time-budget``), so a hang or a crash in one stage is reported and the next still runs:

1. ``env``: Python, torch (and its CUDA), triton, tilelang, numpy, the devices (GPU name, driver, SM clock
   from ``nvidia-smi`` when there is one), which backends are available and why not;
2. ``check:<backend>``: ``mhc-kernels check`` of every available backend on the device (every op forward and
   backward against the float64 oracle), one stage per backend, every case's err/tol recorded;
3. ``tests``: the short GPU test tier, ``pytest -m gpu_smoke`` (only from a checkout with ``tests/``, only on
   CUDA);
4. ``bench``: ``mhc-kernels bench --quick`` (its records are kept);
5. ``serving`` (CUDA only, the kernel backends): the serving goals' numbers -- ``bench --decode`` (µs per
   boundary at T <= 64, eager and replayed from a CUDA graph) and the boundary ops at :data:`SERVING`'s
   size with the FP8 copy and in batch-invariant mode (``bench --fp8 --batch-invariant``), as % of the
   measured copy bandwidth.

A stage is ``passed``, ``failed``, ``timed out`` (killed at its cap: never reported as passed) or ``not run``
(no time left, no CUDA device for it, no tests directory). Writes ``selftest.json`` (machine-readable: every
stage's status, seconds and detail, every check case, the benchmark records) and ``selftest.md`` to
``--out``. Exit status: 1 when a numeric check, test or benchmark failed, 3 when nothing failed but a stage
timed out or did not run for lack of time, else 0 -- the ``serving`` stage is extra: it gets what time is left,
and its running out of time leaves the verdict as it is (a failure in it still counts). Works offline and
without tilelang (its stage then says TileLang was not checked, with the reason).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

CAPS = {"env": 60, "check": 150, "tests": 240, "bench": 120, "serving": 120}  # seconds per stage (check: per backend)
# the serving stage's boundary measurements: the size of the bandwidth goal (T >= 16384, n=4, C=7168)
SERVING = {"ops": ("post_pre", "post_pre_sp"), "tokens": 16384, "n": 4, "hidden": 7168}
SERVING_BACKENDS = ("triton", "tilelang")   # the kernel backends (the reference is no serving path)
EXTRA_STAGES = ("serving",)   # measured with what time is left: out of time, they leave the verdict as it is
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stage:
    name: str
    status: str = "not run"      # passed | failed | timed out | not run
    seconds: float = 0.0
    detail: str = ""
    data: dict = field(default_factory=dict)


def _child(code: str, cap: float, *argv: str, cwd: Optional[Path] = None):
    """Run ``python -c code argv...`` with a time cap -> (returncode or None when killed, stdout, stderr,
    seconds)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=cap,
                           cwd=cwd)
        return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out, "", time.perf_counter() - t0


_ENV_CODE = r"""
import importlib.metadata as md, json, platform, shutil, subprocess, torch
def v(d):
    try: return md.version(d)
    except md.PackageNotFoundError: return None
import mhc_kernels as mk
from mhc_kernels.commands.info import devices
out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "triton": v("triton"), "tilelang": v("tilelang"), "numpy": v("numpy"), "mhc_kernels": mk.__version__,
       "devices": devices(), "nvidia_smi": None,
       "backends": {d: {b: (s.available, s.reason) for b, s in mk.available_backends(d).items()}
                    for d in (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))}}
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    out["nvidia_smi"] = q.stdout.strip()
print(json.dumps(out))
"""

_CHECK_CODE = r"""
import json, sys, torch
from dataclasses import asdict
from mhc_kernels.commands.check import run_checks
summaries, unavailable, _ = run_checks(torch.device(sys.argv[1]), [sys.argv[2]])
print(json.dumps({"unavailable": unavailable,
                  "cases": [asdict(o) for s in summaries for o in s.outcomes]}))
"""


def _last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _cap(name: str, deadline: float) -> float:
    return min(CAPS[name.split(":")[0]], deadline - time.monotonic())


def _killed(stage: Stage, cap: float, out: str) -> Stage:
    stage.status = "timed out"
    stage.detail = f"killed at its {cap:.0f} s cap (not passed); last output: {out.strip()[-300:]}"
    return stage


def _no_time(st: Stage, cap: float, need: float) -> bool:
    """Whether fewer than ``need`` seconds are left for the stage (then marked not run, with the reason)."""
    if cap < need:
        st.detail = "no time left in the budget"
    return cap < need


def _json_stage(st: Stage, cap: float, code: str, *argv: str) -> Optional[dict]:
    """Run a stage's child (``code`` prints one JSON line) -> its JSON, or None with ``st`` marked timed out
    or failed (the child's last stderr line)."""
    rc, out, err, st.seconds = _child(code, cap, *argv)
    if rc is None:
        _killed(st, cap, out)
        return None
    data = _last_json(out)
    if rc != 0 or data is None:
        st.status, st.detail = "failed", (err.strip().splitlines() or ["no output"])[-1][:300]
        return None
    return data


def stage_env(deadline: float) -> Stage:
    st, cap = Stage("env"), _cap("env", deadline)
    data = _json_stage(st, cap, _ENV_CODE)
    if data is None:
        return st
    st.status, st.data = "passed", data
    st.detail = (f"python {data['python']}, torch {data['torch']} (CUDA {data['torch_cuda']}), triton "
                 f"{data['triton']}, tilelang {data['tilelang']}, numpy {data['numpy']}"
                 + (f"; GPU {data['nvidia_smi']}" if data.get("nvidia_smi") else ""))
    return st


def stage_check(device: str, backend: str, deadline: float) -> Stage:
    st, cap = Stage(f"check:{backend}"), _cap("check", deadline)
    if _no_time(st, cap, 5):
        return st
    data = _json_stage(st, cap, _CHECK_CODE, device, backend)
    if data is None:
        return st
    if data["unavailable"]:
        st.detail = f"{backend} was not checked: {data['unavailable'][backend]}"
        return st
    st.data = {"cases": data["cases"]}
    failed = [c for c in data["cases"] if c["status"] == "FAIL"]
    ran = [c for c in data["cases"] if c["status"] != "skipped"]
    worst = max((c["worst_ratio"] for c in ran), default=0.0)
    st.status = "failed" if failed else "passed"
    st.detail = (f"{len(ran) - len(failed)}/{len(data['cases'])} cases passed, {len(failed)} failed, "
                 f"{len(data['cases']) - len(ran)} skipped; worst err/tol {worst:.3g}"
                 + (f"; first failure: {failed[0]['op']} {failed[0]['case']}: {failed[0]['detail'][:200]}"
                    if failed else ""))
    return st


def stage_tests(device: str, deadline: float, out_dir: Path) -> Stage:
    st, cap = Stage("tests"), _cap("tests", deadline)
    tests = ROOT / "tests"
    if device != "cuda":
        st.detail = "no CUDA device: the GPU test tier (pytest -m gpu_smoke) needs one"
        return st
    if not tests.is_dir():
        st.detail = f"no tests directory at {tests} (run selftest from a checkout to include the GPU tests)"
        return st
    if _no_time(st, cap, 20):
        return st
    junit = out_dir / "gpu_smoke.xml"
    code = ("import sys, pytest; sys.exit(pytest.main(['-q', '-m', 'gpu_smoke', '-p', 'no:cacheprovider', '-rfE', "
            f"'--junitxml={junit}', {str(tests)!r}]))")
    rc, out, err, st.seconds = _child(code, cap, cwd=ROOT)
    if rc is None:
        return _killed(st, cap, out)
    summary = (out.strip().splitlines() or ["no output"])[-1]
    st.status = "passed" if rc == 0 else "not run" if rc == 5 else "failed"
    st.detail = summary[:300] + (" (no gpu_smoke tests collected)" if rc == 5 else "")
    st.data = {"junit": str(junit), "returncode": rc}
    return st


def stage_bench(device: str, deadline: float, out_dir: Path) -> Stage:
    st, cap = Stage("bench"), _cap("bench", deadline)
    if _no_time(st, cap, 15):
        return st
    bdir = out_dir / "bench"
    code = ("import sys; from mhc_kernels.cli import main; sys.exit(main(['bench', '--quick', '--no-plots', "
            f"'--device', {device!r}, '--out', {str(bdir)!r}]))")
    rc, out, err, st.seconds = _child(code, cap)
    if rc is None:
        return _killed(st, cap, out)
    path = bdir / "bench.json"
    if not path.exists():
        st.status, st.detail = "failed", (err.strip().splitlines() or ["no output"])[-1][:300]
        return st
    data = json.loads(path.read_text())
    st.data = {"records": data.get("records", []), "run": data.get("run", {})}
    ok = [r for r in st.data["records"] if r.get("status") == "ok"]
    st.status = "passed" if rc == 0 else "failed"
    st.detail = f"{len(ok)}/{len(st.data['records'])} measurements; {bdir}"
    return st


def stage_serving(device: str, backends: list, deadline: float, out_dir: Path) -> Stage:
    st, cap = Stage("serving"), _cap("serving", deadline)
    if device != "cuda":
        st.detail = "no CUDA device: the serving numbers (decode under a CUDA graph, the FP8 copy's and batch " \
                    "invariance's cost) need one"
        return st
    if not backends:
        st.detail = f"no kernel backend available ({', '.join(SERVING_BACKENDS)})"
        return st
    if _no_time(st, cap, 20):
        return st
    ddir, bdir = out_dir / "decode", out_dir / "serving"
    common = ["--no-plots", "--device", device, "--backends", *backends]
    decode = ["bench", "--decode", *common, "--out", str(ddir)]
    boundary = ["bench", "--ops", *SERVING["ops"], "--tokens", str(SERVING["tokens"]), "--n", str(SERVING["n"]),
                "--hidden", str(SERVING["hidden"]), "--baselines", "none", "--fp8", "--batch-invariant", *common,
                "--out", str(bdir)]
    code = (f"import sys; from mhc_kernels.cli import main; rc = main({decode!r}); rc = main({boundary!r}) or rc; "
            "sys.exit(rc)")
    rc, out, err, st.seconds = _child(code, cap)
    if rc is None:
        return _killed(st, cap, out)
    rows = json.loads((ddir / "decode.json").read_text())["rows"] if (ddir / "decode.json").exists() else []
    records = json.loads((bdir / "bench.json").read_text())["records"] if (bdir / "bench.json").exists() else []
    st.data = {"decode": rows, "records": records}
    if not rows and not records:
        st.status, st.detail = "failed", (err.strip().splitlines() or ["no output"])[-1][:300]
        return st
    st.status = "passed" if rc == 0 else "failed"
    graph = [r["graph_us"] for r in rows if r.get("T") == 1 and r.get("graph_us") is not None]
    pct = [r["pct_measured_bw"] for r in records if r.get("status") == "ok" and r.get("pct_measured_bw")]
    st.detail = (f"decode T=1 under a CUDA graph: {min(graph):.1f} µs (best backend)" if graph else
                 "decode: no CUDA-graph time") + \
        (f"; boundary at T={SERVING['tokens']}: up to {max(pct):.0f}% of copy BW" if pct else "") + \
        f"; {ddir}, {bdir}"
    return st


def tilelang_cache_entries() -> tuple[str, int]:
    """(TileLang's kernel cache directory, the number of kernels in it): a stage that adds many compiled cold
    (``mhc-kernels compile --fill-cache`` fills the cache beforehand; README)."""
    import glob
    import os

    root = os.environ.get("TILELANG_CACHE_DIR") or os.path.expanduser("~/.tilelang/cache")
    return root, len(glob.glob(os.path.join(glob.escape(root), "*", "*", "kernels", "*")))


def _counting_compiles(stage_fn):
    """Run ``stage_fn()`` -> its Stage, with the TileLang kernels it compiled (cache entries added) in its data."""
    root, before = tilelang_cache_entries()
    st = stage_fn()
    added = tilelang_cache_entries()[1] - before
    st.data["tilelang_compiled"] = added
    if added:
        st.detail = (st.detail + "; " if st.detail else "") + f"compiled {added} TileLang kernels into {root}"
    return st


def selftest(device: str, budget: float, out_dir: Path, skip=()) -> list[Stage]:
    """Run the stages within ``budget`` seconds -> their results (see the module docstring)."""
    deadline = time.monotonic() + budget
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = [stage_env(deadline)]
    root, entries = tilelang_cache_entries()
    stages[0].data["tilelang_cache"] = {"dir": root, "kernels": entries}
    stages[0].detail += f"; TileLang cache {root}: {entries} kernels"
    # the environment stage's backend table (absent when that stage ran out of time: then every backend is tried)
    available = (stages[0].data.get("backends") or {}).get(device) or {}
    for b in list(available) or ["reference", "triton", "tilelang"]:
        if "check" in skip:
            stages.append(Stage(f"check:{b}", detail="skipped (--skip check)"))
        elif b in available and not available[b][0]:
            stages.append(Stage(f"check:{b}", detail=f"{b} was not checked: {available[b][1]}"))
        else:
            stages.append(_counting_compiles(lambda b=b: stage_check(device, b, deadline)))
    stages.append(Stage("tests", detail="skipped (--skip tests)") if "tests" in skip
                  else _counting_compiles(lambda: stage_tests(device, deadline, out_dir)))
    stages.append(Stage("bench", detail="skipped (--skip bench)") if "bench" in skip
                  else _counting_compiles(lambda: stage_bench(device, deadline, out_dir)))
    # the kernel backends the environment stage found available (every one when it could not tell)
    served = [b for b in SERVING_BACKENDS if (available[b][0] if b in available else not available)]
    stages.append(Stage("serving", detail="skipped (--skip serving)") if "serving" in skip
                  else _counting_compiles(lambda: stage_serving(device, served, deadline, out_dir)))
    return stages


def exit_status(stages: list[Stage]) -> int:
    if any(s.status == "failed" for s in stages):
        return 1
    if any((s.status == "timed out" or "no time left" in s.detail) and s.name not in EXTRA_STAGES for s in stages):
        return 3
    return 0


def write_reports(stages: list[Stage], out_dir: Path, device: str, budget: float) -> None:
    rc = exit_status(stages)
    verdict = {0: "passed", 1: "FAILED", 3: "incomplete (a stage timed out or ran out of time)"}[rc]
    doc = {"device": device, "time_budget_s": budget, "verdict": verdict, "exit_status": rc,
           "host": platform.node(), "stages": [asdict(s) for s in stages]}
    (out_dir / "selftest.json").write_text(json.dumps(doc, indent=1, default=str))
    lines = [f"# mhc-kernels selftest on {device}: {verdict}", "", "| stage | status | seconds | detail |",
             "|---|---|---:|---|"]
    for s in stages:
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail.replace('|', '/')} |")
    bench = next((s for s in stages if s.name == "bench" and s.data.get("records")), None)
    if bench is not None:
        lines += ["", "## Bandwidth (bench --quick)", "", "| op | impl | T | µs | GB/s | % of copy BW |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [_bandwidth_row(r, r["T"]) for r in bench.data["records"] if r.get("status") == "ok"]
    serving = next((s for s in stages if s.name == "serving" and s.data), None)
    if serving is not None:
        lines += _serving_lines(serving.data)
    (out_dir / "selftest.md").write_text("\n".join(lines) + "\n")


def _serving_lines(data: dict) -> list[str]:
    """The serving stage's tables for ``selftest.md``: decode latency, then the boundary's bandwidth."""
    lines = []
    if data.get("decode"):
        lines += ["", "## Decode: µs per boundary (bench --decode)", "", "| op | backend | T | eager µs | "
                  "CUDA graph µs | note |", "|---|---|---:|---:|---:|---|"]
        for r in data["decode"]:
            eager, graph = (("—" if v is None else f"{v:.1f}") for v in (r.get("eager_us"), r.get("graph_us")))
            lines.append(f"| {r['op']} | {r['backend']} | {r['T']} | {eager} | {graph} | "
                         f"{str(r.get('note', '')).replace('|', '/')} |")
    if data.get("records"):
        lines += ["", f"## Boundary at T={SERVING['tokens']}, n={SERVING['n']}, C={SERVING['hidden']} "
                  "(bench --fp8 --batch-invariant)", "", "| op | impl | µs | GB/s | % of copy BW |",
                  "|---|---|---:|---:|---:|"]
        lines += [_bandwidth_row(r) for r in data["records"] if r.get("status") == "ok"]
    return lines


def _bandwidth_row(r: dict, *extra) -> str:
    """One benchmark record as a markdown row: op, impl, ``extra`` columns, µs, GB/s, % of copy bandwidth."""
    cells = [r["op"], r["impl"], *extra, f"{r['median_us']:.1f}", f"{r['gbps'] or 0:.3g}",
             f"{r['pct_measured_bw'] or 0:.3g}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def run(args) -> int:
    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("mhc-kernels selftest: no CUDA device (this torch has none available); run with --device cpu",
              file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    skip = set(args.skip or ())
    stages = selftest(device, float(args.time_budget), out_dir, skip)
    write_reports(stages, out_dir, device, float(args.time_budget))
    con = Console(width=160)
    tab = Table(title=f"mhc-kernels selftest on {device} (budget {args.time_budget:.0f} s)")
    for col in ("stage", "status", "s", "detail"):
        tab.add_column(col, overflow="fold")
    style = {"passed": "green", "failed": "bold red", "timed out": "red", "not run": "yellow"}
    for s in stages:
        tab.add_row(s.name, f"[{style[s.status]}]{s.status}[/]", f"{s.seconds:.1f}", escape(s.detail))
    con.print(tab)
    con.print(f"wrote {out_dir / 'selftest.json'}, {out_dir / 'selftest.md'}")
    return exit_status(stages)

