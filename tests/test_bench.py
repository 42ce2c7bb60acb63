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
    assert runner.target_cost(op, T, N, C, dtype, present)[0] == counted  # what the benchmarks use
    # the spec itself: ``dtype`` is the residual's, or the mixes' for ops without a residual
    spec_dtype = dtype if SPECS[op].has_act else torch.float32
    assert SPECS[op].bytes(T, N, C, spec_dtype, present, **bind(SPECS[op], args).sizes) == counted


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
    spec = SPECS[op].flops(T, N, C, 20, **c.sizes)
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
    """One unit per column: a 156 ms call reads 156000 under the µs header, never '156ms'."""
    assert [report.fmt_us(x) for x in (0.25, 42.0, 950.4, 156_000.0, None)] == ["0.2", "42.0", "950", "156000", "-"]
