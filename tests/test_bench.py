"""The benchmark tooling: spec cost formulas against the real tensors, the device model,
timing, records, and the ``mhc-kernels bench`` command end to end (no assertions about speed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mhc_kernels as mk  # noqa: F401  (registers the ops)
from mhc_kernels import ops, registry
from mhc_kernels.bench import device as devmod
from mhc_kernels.bench import plots, report, runner, timing
from mhc_kernels.reference import cases
from mhc_kernels.specs import BACKWARD_OPS, FORWARD_OPS, SPECS
from mhc_kernels.validation import bind

ROOT = Path(__file__).resolve().parents[1]
ALL_OPS = list(FORWARD_OPS) + list(BACKWARD_OPS)
T, N, C = 5, 3, 40  # small and awkward


# -- bytes: spec formula vs the tensors actually read and written ---------------------------------
def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _inputs(op: str, dtype, norm_weight: bool, grad_residual: bool = False) -> dict:
    if op.endswith("_bwd"):
        pool = runner.backward_pool(op[:-4], T, N, C, dtype, "cpu", norm_weight=norm_weight)
        a = runner.backward_args(op, pool)
        if grad_residual:
            a["grad_residual"] = torch.randn(T, N, C).to(dtype)
        return a
    return cases.make_inputs(op, (T,), N, C, dtype, "cpu", norm_weight=norm_weight)


def _variants():
    for op in ALL_OPS:
        has_nw = any(a.name == "norm_weight" for a in SPECS[op].tensor_args)
        for dtype in (torch.bfloat16, torch.float32):
            yield op, dtype, False, False
            if has_nw and dtype == torch.bfloat16:
                yield op, dtype, True, False
        if op == "mhc_pre_bwd":
            yield op, torch.bfloat16, False, True


@pytest.mark.parametrize("op,dtype,nw,gr", list(_variants()),
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, bool) else str(int(v)))
def test_spec_bytes_equal_tensors_read_and_written(op, dtype, nw, gr):
    d = _inputs(op, dtype, nw, gr)
    args = [d[a] for a in SPECS[op].arg_names]
    with torch.no_grad(), registry.use_backend("reference"):
        outs = ops.BODIES[op](*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    counted = _nbytes(args) + _nbytes(outs)
    present = tuple(a.name for a in SPECS[op].tensor_args if a.optional and d.get(a.name) is not None)
    c = cases.fp8_width(C) if op == "quantize_fp8" else C   # its case rounds C up to whole FP8 groups
    if op != "quantize_fp8":   # (its case takes groups of 32 at an odd C, the cost model 128 at this width)
        assert runner.target_cost(op, T, N, c, dtype, present)[0] == counted  # what the benchmarks use
    # the spec itself: ``dtype`` is the residual's, or the mixes' for ops without a residual
    spec_dtype = dtype if SPECS[op].has_act else torch.float32
    assert SPECS[op].bytes(T, N, c, spec_dtype, present, **bind(SPECS[op], args).sizes) == counted


def test_site_cost_is_the_sum_of_its_ops():
    dt = torch.bfloat16
    nbytes, flops = runner.target_cost(runner.SITE, T, N, C, dt)
    assert nbytes == (SPECS["mhc_pre"].bytes(T, N, C, dt) + SPECS["post"].bytes(T, N, C, dt)
                      + SPECS["post_bwd"].bytes(T, N, C, dt)
                      + SPECS["mhc_pre_bwd"].bytes(T, N, C, dt, ("grad_residual",)))
    assert flops == sum(SPECS[o].flops(T, N, C) for o in ("mhc_pre", "post", "post_bwd", "mhc_pre_bwd"))


# -- FLOPs: spec formula vs the arithmetic the reference kernel actually performs -----------------------
_A = torch.ops.aten
_MM = {_A.mm.default, _A.bmm.default}
_FREE = {"view", "_unsafe_view", "reshape", "expand", "unsqueeze", "squeeze", "transpose", "t", "permute", "slice",
         "select", "as_strided", "clone", "_to_copy", "copy_", "copy", "empty", "empty_like", "zeros", "zeros_like",
         "new_empty", "new_zeros", "cat", "stack", "repeat", "detach", "alias", "split", "unbind", "empty_strided",
         "fill_", "index", "narrow", "lift_fresh"}
# softmax = max, subtract, exp, sum, divide (~4-5/elt); sigmoid ~4; addcmul a multiply-add (2);
# vector_norm square+sum (2)
_WEIGHT = {"addcmul": 2, "addcmul_": 2, "_softmax": 4, "linalg_vector_norm": 2, "sigmoid": 4}


class _FlopCount(TorchDispatchMode):
    """Matmuls 2*M*N*K; every other floating op weight x (largest operand numel); views/copies free."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if func in _MM:
            self.flops += 2 * args[0].numel() * args[1].shape[-1]
        elif name not in _FREE:
            o = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(o, torch.Tensor) and o.is_floating_point():
                big = max([o.numel()] + [a.numel() for a in args if isinstance(a, torch.Tensor)])
                self.flops += _WEIGHT.get(name, 1) * big
        return out


@pytest.mark.parametrize("op", ALL_OPS)
def test_spec_flops_match_counted_arithmetic(op):
    d = _inputs(op, torch.float32, False)
    c = bind(SPECS[op], [d[a] for a in SPECS[op].arg_names])
    kernel = registry.get_kernel(op, "reference")
    with torch.no_grad(), _FlopCount() as cnt:
        kernel.fn(*c.args)
    spec = SPECS[op].flops(T, N, c.C or C, 20, **c.sizes)   # quantize_fp8's case rounds C up to whole groups
    if cnt.flops == 0:
        assert spec == 0
    else:
        assert 0.8 <= spec / cnt.flops <= 1.25, (spec, cnt.flops)


# -- device model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "H100 80GB HBM3"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H100", "H100"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA H20", "H20"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM4 80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100 SXM4 40GB"),
    ("NVIDIA A100-PCIE-40GB", "A100 PCIE 40GB"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
    ("NVIDIA B200", "B200"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090"),
])
def test_peak_lookup_longest_prefix(name, key):
    e = devmod.lookup_peaks(name)
    assert e is not None and e.key == key
    assert e.bw_gbps > 0 and all(e.tflops[p] > 0 for p in devmod.PEAK_DTYPES)


def test_peak_lookup_values_and_word_boundary():
    assert devmod.lookup_peaks("NVIDIA H200").bw_gbps == 4800  # not the H20's 4000
    assert devmod.lookup_peaks("NVIDIA H20").bw_gbps == 4000
    assert devmod.lookup_peaks("NVIDIA H100 80GB HBM3").tflops["bf16"] == pytest.approx(989.4)
    assert devmod.lookup_peaks("NVIDIA H1000") is None
    assert devmod.lookup_peaks("AMD Instinct MI300X") is None


def test_unknown_gpu_is_measured_only_never_a_crash():
    props = types.SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)  # H100 SXM-like
    dm = devmod.datasheet_model("cuda", "NVIDIA Quantum X9000", props)
    assert dm.datasheet_bw_gbps is None and dm.datasheet_tflops == {}
    assert any("not in the datasheet table" in n for n in dm.notes)
    assert dm.theoretical_bw_gbps == pytest.approx(3352.3, rel=1e-3)
    assert dm.compute_ceiling("fp32")[0] is None
    assert dm.ceiling_gbps is None and dm.ceiling_source == "none"
    dm.measured_bw_gbps, dm.measured_bw_source = 2900.0, "test"
    assert dm.ceiling_gbps == 2900.0 and dm.ceiling_source.startswith("measured")


def test_known_gpu_cross_check_notes_a_mismatch():
    ok = devmod.datasheet_model("cuda", "NVIDIA H100 80GB HBM3",
                                types.SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120))
    assert ok.datasheet_bw_gbps == 3350 and not any("check the variant" in n for n in ok.notes)
    bad = devmod.datasheet_model("cuda", "NVIDIA H100 80GB HBM3",
                                 types.SimpleNamespace(memory_clock_rate=1_593_000, memory_bus_width=5120))
    assert any("check the variant" in n for n in bad.notes)
    # no clock/bus width exposed (older torch): no cross-check, no error
    assert devmod.datasheet_model("cuda", "NVIDIA H100 PCIe", types.SimpleNamespace()).theoretical_bw_gbps is None


def test_cpu_device_model_measures_host_copy_bandwidth():
    dm = devmod.describe_device("cpu", copy_bytes=8 << 20, repeats=3)
    assert dm.device_type == "cpu" and dm.measured_bw_gbps > 0
    assert dm.ceiling_source.startswith("measured: host memory copy")
    assert dm.compute_ceiling("bf16")[0] is None
    json.dumps(dm.to_dict())


def test_timing_summary():
    t = timing.time_fn(lambda: torch.ones(1000).sum(), "cpu", warmup=1, min_repeats=5, max_repeats=20,
                       budget_s=0.01)
    assert 5 <= t.repeats <= 20 and t.p20_s <= t.median_s <= t.p80_s and "wall clock" in t.method
    assert timing.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert timing.percentile([1.0, 2.0], 20) == pytest.approx(1.2)


# -- records -----------------------------------------------------------------------------------------
def test_records_validate_and_reject_bad_ones():
    cfg = runner.SweepConfig(targets=["post", "post_bwd"], backends=["reference"], baselines=["eager"],
                             tokens=[3], ns=[2], hiddens=[16], budget_s=0.001, min_repeats=3, max_repeats=3,
                             warmup=1)
    dm = devmod.describe_device("cpu", copy_bytes=4 << 20, repeats=2)
    run = report.run_info(dm, cfg, timing.method_name(torch.device("cpu")))
    recs = report.build_records(runner.run_sweep(cfg), run)
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs)
    for r in recs:
        assert report.validate_record(r) == [], r
    ref = next(r for r in recs if r["impl"] == "reference" and r["op"] == "post")
    assert ref["speedup_vs_eager"] > 0 and ref["bytes"] == SPECS["post"].bytes(3, 2, 16, torch.bfloat16)
    bad = dict(ref)
    del bad["gbps"]
    assert report.validate_record(bad)
    assert report.validate_record(dict(ref, status="fine"))
    assert report.validate_record(dict(ref, surprise=1))


def test_batch_invariant_rows_time_the_forward_ops_in_the_mode(monkeypatch):
    """--batch-invariant adds a '<backend>+bi' row per forward op, timed inside mk.batch_invariant(); a
    backward op's is a skipped row that says why."""
    from mhc_kernels import invariance

    seen = []
    real = runner.ops.BODIES["mhc_pre"]
    monkeypatch.setitem(runner.ops.BODIES, "mhc_pre",
                        lambda *a: (seen.append(invariance.batch_invariant_enabled()), real(*a))[1])
    cfg = runner.SweepConfig(targets=["mhc_pre", "mhc_pre_bwd"], backends=["reference"], baselines=[], tokens=[3],
                             ns=[2], hiddens=[16], budget_s=0.001, min_repeats=3, max_repeats=3, warmup=1,
                             batch_invariant=True)
    rows = {(m.target, m.impl): m for m in runner.run_sweep(cfg)}
    assert set(rows) == {("mhc_pre", "reference"), ("mhc_pre", "reference+bi"), ("mhc_pre_bwd", "reference"),
                         ("mhc_pre_bwd", "reference+bi")}
    assert rows[("mhc_pre", "reference+bi")].status == "ok"
    assert rows[("mhc_pre_bwd", "reference+bi")].status == "skipped"
    assert "forward ops only" in rows[("mhc_pre_bwd", "reference+bi")].note
    assert True in seen and False in seen      # the +bi row ran in the mode, the plain row did not


def test_fp8_rows_time_the_boundary_writing_the_copy_and_count_its_bytes(monkeypatch):
    """--fp8 adds a '<backend>+fp8' row per boundary op, run with fp8_group (128 where C allows it) and costed with
    the codes and scales; an op without the copy gets a skipped row that says why."""
    seen = []
    real = runner.ops.BODIES["post_pre_sp"]
    monkeypatch.setitem(runner.ops.BODIES, "post_pre_sp", lambda *a: (seen.append(a[-1]), real(*a))[1])
    cfg = runner.SweepConfig(targets=["post_pre_sp", "post"], backends=["reference"], baselines=[], tokens=[3],
                             ns=[2], hiddens=[256], budget_s=0.001, min_repeats=3, max_repeats=3, warmup=1, fp8=True)
    rows = {(m.target, m.impl): m for m in runner.run_sweep(cfg)}
    plain, fp8 = rows[("post_pre_sp", "reference")], rows[("post_pre_sp", "reference+fp8")]
    assert plain.status == fp8.status == "ok"
    assert fp8.bytes - plain.bytes == 3 * 256 + 3 * 2 * 4          # T*C codes + T*C/128 float32 scales
    assert set(fp8.present) - set(plain.present) == {"fp8_codes", "fp8_scales"}
    assert 128 in seen and 0 in seen
    assert rows[("post", "reference+fp8")].status == "skipped"
    assert "boundary ops only" in rows[("post", "reference+fp8")].note


def test_unservable_backend_is_a_skipped_row():
    cfg = runner.SweepConfig(targets=["post"], backends=["tilelang"], baselines=[], tokens=[2], ns=[2],
                             hiddens=[16], budget_s=0.001, min_repeats=3, max_repeats=3, warmup=1)
    (m,) = runner.run_sweep(cfg)
    assert m.status == "skipped" and m.timing is None and m.note


def test_compare_rows():
    base = {"op": "post", "pass": "fwd", "impl": "reference", "T": 4, "n": 4, "C": 64, "dtype": "bf16",
            "status": "ok", "median_us": 100.0, "gbps": 1.0}
    rows = report.compare([base], [dict(base, median_us=50.0, gbps=2.0), dict(base, T=8)])
    assert len(rows) == 1 and rows[0]["change_pct"] == pytest.approx(-50.0) and rows[0]["speedup"] == 2.0


# -- the command ----------------------------------------------------------------------------------------
def _bench(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mhc_kernels", "bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_quick")
    p = _bench(["--quick", "--out", str(out)], cwd=out)
    assert p.returncode == 0, p.stdout + p.stderr
    return out, p


@pytest.mark.slow
def test_quick_writes_json_csv_markdown_and_plots(quick_run):
    out, p = quick_run
    data = json.loads((out / "bench.json").read_text())
    assert data["schema"] == report.SCHEMA and data["records"]
    for r in data["records"]:
        assert report.validate_record(r) == [], r
        assert r["device_type"] == "cpu" and r["ceiling_source"].startswith("measured")
    ok = [r for r in data["records"] if r["status"] == "ok"]
    assert {r["impl"] for r in ok} == {"reference", "eager"}
    assert {r["op"] for r in ok} == set(runner.TARGETS)
    assert all(r["gbps"] > 0 and r["pct_measured_bw"] > 0 for r in ok)
    csv_lines = (out / "bench.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(report.RECORD_FIELDS) and len(csv_lines) == len(data["records"]) + 1
    md = (out / "report.md").read_text()
    assert "Bandwidth ceiling" in md and "measured: host memory copy" in md and "mhc_site" in md
    if plots.available():
        assert (out / "roofline.png").stat().st_size > 1000
        assert (out / "bandwidth_mhc_site.png").exists()
        assert "](roofline.png)" in md
    else:
        assert not list(out.glob("*.png")) and "pip install" in md
    assert "GB/s" in p.stdout and "mhc_site" in p.stdout


@pytest.mark.slow
def test_compare_against_a_previous_run(quick_run, tmp_path):
    out, _ = quick_run
    p = _bench(["--quick", "--ops", "post,mhc_site", "--tokens", "1", "--no-plots", "--out", str(tmp_path),
                "--compare", str(out / "bench.json")], cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "change against" in p.stdout and "mhc_site" in p.stdout
    assert "## Change against the previous run" in (tmp_path / "report.md").read_text()


def _in_process(tmp_path, monkeypatch, have_plots: bool):
    from mhc_kernels import cli

    monkeypatch.setattr(plots, "available", lambda: have_plots)
    rc = cli.main(["bench", "--ops", "pre_apply_mix", "--tokens", "1", "8", "--hidden", "32", "--n", "2",
                   "--backends", "reference", "--baselines", "eager", "--budget", "0.001", "--out", str(tmp_path)])
    assert rc == 0
    return (tmp_path / "report.md").read_text()


def test_without_matplotlib_still_writes_data_and_says_how_to_get_plots(tmp_path, monkeypatch):
    md = _in_process(tmp_path, monkeypatch, have_plots=False)
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.csv").exists()
    assert not list(tmp_path.glob("*.png"))
    assert plots.INSTALL_HINT in md


def test_plots_with_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    md = _in_process(tmp_path, monkeypatch, have_plots=True)
    assert (tmp_path / "roofline.png").stat().st_size > 1000
    assert (tmp_path / "bandwidth_pre_apply_mix.png").stat().st_size > 1000
    assert "![Roofline](roofline.png)" in md


@pytest.mark.slow
def test_compile_baseline_times_a_backward_op(tmp_path):
    """The torch.compile baseline replays one forward's graph for backward ops (retain_graph=True); the
    second token count recompiles with dynamic shapes, where donated buffers used to break it."""
    p = _bench(["--ops", "post_bwd", "--tokens", "4", "8", "--hidden", "16", "--n", "2", "--backends", "reference",
                "--baselines", "compile", "--budget", "0.001", "--no-plots", "--out", str(tmp_path)], cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    recs = json.loads((tmp_path / "bench.json").read_text())["records"]
    assert {(r["impl"], r["status"]) for r in recs} == {("reference", "ok"), ("compile", "ok")}, \
        [(r["impl"], r["status"], r["note"]) for r in recs]


def test_cpu_allocator_note_only_without_allocator_settings():
    note = devmod.cpu_allocator_note({})
    assert note and "MALLOC_MMAP_THRESHOLD_=" in note and "jemalloc" in note
    assert devmod.cpu_allocator_note(dict(devmod.ALLOCATOR_ENV)) is None
    assert devmod.cpu_allocator_note({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None


def test_default_backends_on_cpu_leave_out_interpreted_and_emulated_kernels(monkeypatch):
    """Timing the Triton interpreter or the TileLang CPU-thread emulator would mean nothing: on CPU only the
    reference is benchmarked by default, and the notes say why the others are left out."""
    import shutil

    from mhc_kernels.commands.bench import default_backends

    monkeypatch.setenv("MHC_TILELANG_EMULATE", "1")
    chosen, notes = default_backends(torch.device("cpu"))
    assert chosen == ["reference"]
    if shutil.which("g++") and importlib.util.find_spec("tilelang"):
        assert any(n.startswith("tilelang: left out on CPU") and "emulator" in n for n in notes), notes


def test_single_pass_group_times_the_single_pass_ops_against_their_floor(tmp_path):
    """``bench --ops single_pass``: the five single-pass ops, GB/s from the spec bytes -- for post_pre_sp the
    (2n+2)*C elements per token floor plus the mixes and fn."""
    from mhc_kernels.bench.runner import SINGLE_PASS
    from mhc_kernels.commands.bench import resolve_ops

    assert resolve_ops(["single_pass"]) == list(SINGLE_PASS)
    p = _bench(["--ops", "single_pass", "--tokens", "4", "--hidden", "16", "--n", "2", "--backends", "reference",
                "--baselines", "eager", "--budget", "0.001", "--no-plots", "--out", str(tmp_path)], cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    recs = json.loads((tmp_path / "bench.json").read_text())["records"]
    assert {r["op"] for r in recs} == set(SINGLE_PASS)
    assert all(r["status"] == "ok" for r in recs), [(r["op"], r["impl"], r["note"]) for r in recs]
    from mhc_kernels.specs import DTYPES_BY_NAME

    T, n, C = 4, 2, 16
    spec = SPECS["post_pre_sp"]
    pp = next(r for r in recs if r["op"] == "post_pre_sp" and r["impl"] == "reference")
    assert pp["bytes"] == spec.bytes(T, n, C, DTYPES_BY_NAME[pp["dtype"]])
    # the activation part is the floor: bf16 -> fp32 adds 2 bytes per activation element, (2n+2)*C per token
    act_elems = (spec.bytes(T, n, C, torch.float32) - spec.bytes(T, n, C, torch.bfloat16)) // 2
    assert act_elems == (2 * n + 2) * C * T


def test_latency_cells_are_microseconds_at_every_magnitude():
    """One unit per column: a 156 ms call reads 156,000 under the µs header, never '156ms'."""
    assert [report.fmt_us(x) for x in (0.25, 42.0, 950.4, 156_000.0, None)] == \
        ["0.2", "42.0", "950", "156,000", report.NA]


# -- the tables and plots: units, meaningful columns, colours and markers ---------------------------------------
def _fake_run(ceiling=15.0, gpu=False):
    """Run facts of a CPU (no compute roof) or an H200 (datasheet roofs), with a made-up copy ceiling."""
    dm = devmod.datasheet_model("cuda", "NVIDIA H200") if gpu else devmod.datasheet_model("cpu", "test cpu")
    dm.measured_bw_gbps, dm.measured_bw_source = ceiling, "test"
    cfg = runner.SweepConfig(targets=["post"], backends=["reference"], baselines=["eager"], tokens=[1], ns=[4],
                             hiddens=[64])
    return report.run_info(dm, cfg, "test clock")


def _fake_records(rows, run):
    """Records of (op, impl, T, median seconds) rows, n=4 C=1280 bf16, costs from the specs (no timing run)."""
    ms = []
    for op, impl, T, sec in rows:
        nbytes, flops = runner.target_cost(op, T, 4, 1280, torch.bfloat16)
        tm = timing.Timing(sec, sec * 0.9, sec * 1.2, 10, 1, "test clock")
        ms.append(runner.Measurement(op, impl, T, 4, 1280, torch.bfloat16, nbytes, flops, (), tm))
    return report.build_records(ms, run)


# every magnitude a CPU or GPU run produces: 0.4 µs to 0.16 s, 128 B sinkhorn calls to 64K-token ones
_SPREAD = [("sinkhorn", "reference", 1, 3.1e-4), ("sinkhorn", "eager", 1, 4e-7), ("post", "reference", 1024, 0.156),
           ("post", "eager", 1024, 2.2e-5), ("norm_fn", "reference", 65536, 0.0123), ("norm_fn", "eager", 1, 9.5e-6),
           ("expand", "reference", 4096, 1.5e-3), ("mhc_site", "reference", 1024, 0.0583),
           ("mhc_site", "eager", 1024, 0.118)]
_PLAIN = r"[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?"


def _cell_value(header: str, cell: str):
    """The number a cell shows, in the header's unit; None for NA. Fails on anything else (a unit in the cell, a
    missing marker other than NA): ranges (p20-p80) are two plain numbers joined by an en dash, speedups a plain
    number and 'x'."""
    import re

    if cell == report.NA:
        return None
    if header.startswith("p20"):
        parts = cell.split("\u2013")
        assert len(parts) == 2 and all(re.fullmatch(_PLAIN, c) for c in parts), (header, cell)
        return tuple(float(c.replace(",", "")) for c in parts)
    if header.startswith("vs "):
        assert re.fullmatch(_PLAIN + "x", cell), (header, cell)
        return float(cell[:-1].replace(",", ""))
    assert re.fullmatch(_PLAIN, cell), (header, cell)
    return float(cell.replace(",", ""))


def _md_tables(md: str) -> list[tuple[list, list]]:
    tables, cur = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if cur is None:
                cur = (cells, [])
                tables.append(cur)
            elif not line.startswith("|---"):
                cur[1].append(cells)
        else:
            cur = None
    return tables


_TEXT_COLUMNS = {"op", "impl", "pass", "backend", "T x n x C", "T", "n", "C"}


def test_tables_have_one_unit_per_column_and_keep_every_value(tmp_path):
    """Every cell of the rendered tables (terminal table, the Markdown headline, all-measurements and compare
    tables) is NA or a plain number in its header's unit -- µs columns included, at every magnitude -- and reads
    back as the record's value to its rounding: a tiny GB/s is not '0.00', a 156 ms call not '156ms'."""
    run = _fake_run()
    recs = _fake_records(_SPREAD, run)
    header, rows = report.table(recs)
    assert "µs" in header and all(h in header for h in ("GB/s", "% BW", "FLOP/B", "/roof"))
    ok = [r for r in recs if r["status"] == "ok"]
    field = {"µs": "median_us", "GB/s": "gbps", "% BW": "pct_measured_bw", "FLOP/B": "intensity",
             "/roof": "roofline_ratio", "vs eager": "speedup_vs_eager"}
    for j, h in enumerate(header):
        if h in _TEXT_COLUMNS:
            continue
        for r, row in zip(ok, rows):
            v = _cell_value(h, row[j])
            if h.startswith("p20"):
                assert v is None or (v[0] == pytest.approx(r["p20_us"], rel=5e-3, abs=0.05)
                                     and v[1] == pytest.approx(r["p80_us"], rel=5e-3, abs=0.05)), (h, row[j])
            elif h.endswith("FLOP/s") and v is not None:  # TFLOP/s, GFLOP/s or MFLOP/s: the column's unit
                scale = {"TFLOP/s": 1.0, "GFLOP/s": 1e3, "MFLOP/s": 1e6}[h]
                assert r["compute_relevant"] and v == pytest.approx(r["tflops"] * scale, rel=5e-3), (h, row[j])
            elif h in field and v is not None:
                tol = 0.05 if h == "µs" else 0
                assert v == pytest.approx(r[field[h]], rel=5e-3, abs=tol), (h, row[j], r[field[h]])
    old = [dict(r, median_us=r["median_us"] * 1.5, gbps=r["gbps"] / 1.5) for r in recs]
    report.write_markdown(tmp_path / "report.md", run, recs, {}, "no plots", report.compare(old, recs))
    tables = _md_tables((tmp_path / "report.md").read_text())
    assert len(tables) == 3  # headline, change against the previous run, all measurements
    for hdr, body in tables:
        for j, h in enumerate(hdr):
            if h not in _TEXT_COLUMNS:
                for row in body:
                    _cell_value(h, row[j])


def _column(header, rows, name):
    return [row[header.index(name)] for row in rows]


def test_flops_and_roof_only_where_meaningful():
    """FLOP/s only for compute-relevant rows (FLOP/B >= runner.COMPUTE_INTENSITY); /roof only where the device has
    every roof the row needs: on CPU (no compute roof) not for compute-relevant rows, without any ceiling nowhere.
    bench.json keeps tflops for every row, and nulls the roofline fields where they would mislead."""
    assert runner.compute_relevant(4.0 * 100, 100) and not runner.compute_relevant(3.99 * 100, 100)
    assert not runner.compute_relevant(0.0, 0)
    rows = [("post", "reference", 1024, 5e-3), ("expand", "reference", 1024, 5e-4),
            ("norm_fn", "reference", 1024, 4e-3), ("sinkhorn", "reference", 1024, 1.7e-3)]
    cpu = _fake_records(rows, _fake_run())
    by_op = {r["op"]: r for r in cpu}
    assert [by_op[o]["compute_relevant"] for o in ("post", "expand", "norm_fn", "sinkhorn")] == \
        [False, False, True, True]
    assert all(isinstance(r["tflops"], float) for r in cpu)  # the data keeps the number
    assert by_op["norm_fn"]["roofline_ratio"] is None and by_op["norm_fn"]["roofline_us"] is None
    assert by_op["post"]["roofline_ratio"] > 0
    for r in cpu:
        assert report.validate_record(r) == [], r
    header, body = report.table(cpu)
    flops_col = next(h for h in header if h.endswith("FLOP/s"))
    assert flops_col == "GFLOP/s"  # CPU-sized FLOP/s: the unit picked for the column
    assert _column(header, body, flops_col)[:2] == [report.NA, report.NA]  # post, expand
    assert all(c != report.NA for c in _column(header, body, flops_col)[2:])  # norm_fn, sinkhorn
    roof = _column(header, body, "/roof")
    assert roof[0] != report.NA and roof[1] != report.NA and roof[2:] == [report.NA, report.NA]
    # an H200: a compute roof, so every row has its /roof
    gpu = _fake_records([(o, i, T, s / 100) for o, i, T, s in rows], _fake_run(4000.0, gpu=True))
    header, body = report.table(gpu)
    assert all(c != report.NA for c in _column(header, body, "/roof"))
    assert all(r["roofline_ratio"] > 0 for r in gpu)
    # no bandwidth ceiling at all: no roofline anywhere, the column is dropped
    header, body = report.table(_fake_records(rows, _fake_run(None)))
    assert "/roof" not in header


def test_plot_mappings_one_colour_per_op_one_marker_per_backend_size_by_tokens():
    ops = list(runner.TARGETS) + ["some_new_op"]
    colours = plots.op_colours(reversed(ops))
    assert list(colours) == ops  # the benchmark's op order, whatever order the records come in
    assert len(set(colours.values())) == len(ops)
    assert plots.op_colours(["post", "norm_fn"]) == {"norm_fn": plots.PALETTE[0], "post": plots.PALETTE[1]}
    impls = ["eager", "reference", "tilelang", "triton", "compile", "other_backend"]
    markers = plots.impl_markers(impls * 2)
    assert set(markers) == set(impls) and len(set(markers.values())) == len(impls)
    assert plots.impl_markers(["triton"])["triton"] == plots.impl_markers(impls)["triton"]  # fixed per backend
    sizes = plots.t_sizes([65536, 1, 16, 1, 4096])
    assert list(sorted(sizes)) == [1, 16, 4096, 65536]
    assert [sizes[t] for t in sorted(sizes)] == sorted(sizes.values()) and len(set(sizes.values())) == 4


def test_bandwidth_axis_is_logarithmic_when_values_span_decades():
    assert plots.log_axis([1.0, 25.0]) and plots.log_axis([0.07, 3.0, 15.0])
    assert not plots.log_axis([1.0, 20.0]) and not plots.log_axis([2.0, 9.0, 0.0, None])
    assert not plots.log_axis([])
    run = _fake_run(15.0)
    recs = _fake_records([("post", "reference", 1, 8e-6), ("post", "reference", 1024, 2.4e-3),
                          ("sinkhorn", "reference", 1, 3e-4), ("sinkhorn", "reference", 1024, 2e-3)], run)
    by = {(r["op"], r["T"]): r["gbps"] for r in recs}
    assert 15.0 / 20 < by[("post", 1)] < by[("post", 1024)] < 15.0  # within 20x of the ceiling: linear
    assert plots.bandwidth_yscale(recs, run, "post") == "linear"
    assert plots.bandwidth_yscale(recs, run, "sinkhorn") == "log"  # 0.0004 .. 15 GB/s


def test_roofline_and_bandwidth_plots_draw_fake_gpu_records(tmp_path):
    pytest.importorskip("matplotlib")
    run = _fake_run(4000.0, gpu=True)
    recs = _fake_records([(o, i, T, 1e-5 * T ** 0.5) for o in ("norm_fn", "post", "expand", "mhc_site")
                          for i in ("reference", "eager") for T in (1, 64, 4096)], run)
    made = plots.write_plots(recs, run, tmp_path)
    assert made["Roofline"] == "roofline.png" and len(made) == 5
    assert all((tmp_path / f).stat().st_size > 1000 for f in made.values())
