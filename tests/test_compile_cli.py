"""Ahead-of-time compilation of the Triton kernels (``triton_src/aot.py``) and ``mhc-kernels compile``.

No GPU is needed: ``triton.compile`` builds PTX and cubins for real targets and the machine's
``ptxas -v`` reports registers, spills and shared memory. In this (interpreted) test session
the builds run in one child process per call, so the module-scoped fixtures compile each
kernel set once.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'mhc-kernels[triton]')")

from mhc_kernels import cli, ptxas  # noqa: E402
from mhc_kernels.commands import compile as compile_cmd  # noqa: E402
from mhc_kernels.triton_src import aot, mix  # noqa: E402

needs_ptxas = pytest.mark.skipif(ptxas.ptxas_path() is None, reason="ptxas (CUDA toolkit) is not on PATH")
RECORD_KEYS = {"backend", "kernel", "arch", "config", "registers", "spills", "smem_bytes", "seconds", "ok", "error"}
N, C = 4, 1280


@pytest.fixture(scope="module")
def sm90_records():
    return aot.compile_all("sm_90a", N, C, torch.bfloat16)


@pytest.fixture(scope="module", params=["sm_80", "sm_100a"])
def mix_records(request):
    return aot.compile_specs(mix.aot_specs(N, C, torch.bfloat16), request.param)


def _assert_clean(records, arch):
    assert records
    for r in records:
        assert set(r) == RECORD_KEYS, r
        assert r["backend"] == "triton" and r["arch"] == arch
        assert r["ok"], f"{r['kernel']}: {r['error']}"
        assert r["spills"] == 0, f"{r['kernel']} spills {r['spills']} bytes at {arch}"
        assert 0 < r["registers"] <= 255
        assert 0 <= r["smem_bytes"] <= ptxas.SMEM_LIMIT_BYTES[arch]


@needs_ptxas
def test_compile_all_sm90a_no_spills(sm90_records):
    _assert_clean(sm90_records, "sm_90a")
    names = {r["kernel"] for r in sm90_records}
    assert {"pre_apply_mix_fwd", "pre_apply_mix_bwd", "post_fwd", "post_bwd", "expand_fwd", "expand_bwd"} <= names
    assert len(names) == len(sm90_records), "kernel names must be unique"


@needs_ptxas
def test_mix_kernels_other_arches(mix_records):
    arch = mix_records[0]["arch"]
    _assert_clean(mix_records, arch)
    assert len(mix_records) == len(mix.aot_specs(N, C, torch.bfloat16))


@needs_ptxas
def test_cli_compile_writes_json(tmp_path):
    out, emit = tmp_path / "out.json", tmp_path / "emit"
    proc = subprocess.run([sys.executable, "-m", "mhc_kernels", "compile", "--backend", "triton", "--arch", "sm_90a",
                           "--n", str(N), "--hidden", str(C), "--json", str(out), "--emit-dir", str(emit)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert records and all(set(r) == RECORD_KEYS for r in records)
    assert all(r["ok"] and r["spills"] == 0 for r in records)
    assert "post_bwd" in proc.stdout and "registers" in proc.stdout
    files = os.listdir(emit / "triton")
    assert "post_fwd.sm_90a.ptx" in files and "post_fwd.sm_90a.cubin" in files


def _rec(**kw):
    r = dict(backend="triton", kernel="k", arch="sm_90a", config="", registers=32, spills=0, smem_bytes=0,
             seconds=0.1, ok=True, error=None)
    r.update(kw)
    return r


def test_exit_code_on_failures_and_spills():
    assert compile_cmd.exit_code([_rec(), _rec(kernel="k2")]) == 0
    assert compile_cmd.exit_code([_rec(), _rec(spills=8)]) == 1
    assert compile_cmd.exit_code([_rec(ok=False, error="CompilationError: boom", registers=None, spills=None)]) == 1
    assert compile_cmd.exit_code([]) == 1  # nothing compiled is a failure too
    lines = compile_cmd.failures([_rec(kernel="a", spills=8), _rec(kernel="b", ok=False, error="boom")])
    assert "a" in lines[0] and "spills 8" in lines[0]
    assert "b" in lines[1] and "boom" in lines[1]


def test_cli_exit_code_follows_records(monkeypatch, capsys, tmp_path):
    """The command itself (with a stubbed backend) exits 1 on a spill and writes the records."""
    import types

    fake = types.SimpleNamespace(compile_all=lambda arch, n, C, dtype, emit: [_rec(arch=arch, spills=16)])
    monkeypatch.setattr(compile_cmd, "_load_aot", lambda backend: (fake, None))
    monkeypatch.setattr(ptxas, "ptxas_path", lambda: "/usr/bin/true")
    out = tmp_path / "r.json"
    args = cli.build_parser().parse_args(["compile", "--backend", "triton", "--arch", "sm_80", "--arch", "sm_100a",
                                          "--json", str(out)])
    assert compile_cmd.run(args) == 1
    assert [r["arch"] for r in json.loads(out.read_text())] == ["sm_80", "sm_100a"]
    assert "spills 16" in capsys.readouterr().out


def test_missing_ptxas_is_reported(monkeypatch, capsys):
    monkeypatch.setattr(ptxas, "ptxas_path", lambda: None)
    args = cli.build_parser().parse_args(["compile", "--backend", "triton"])
    assert compile_cmd.run(args) != 0
    assert "ptxas was not found on PATH" in capsys.readouterr().out
    with pytest.raises(ptxas.PtxasUnavailable, match="ptxas was not found"):
        aot.compile_spec(mix.aot_specs(N, C, torch.bfloat16)[0], "sm_90a")


def test_missing_backend_module_is_reported(monkeypatch, capsys):
    real = compile_cmd._load_aot

    def load(backend):
        return (None, f"{backend}: AOT compile not available yet") if backend == "tilelang" else real(backend)

    monkeypatch.setattr(compile_cmd, "_load_aot", load)
    monkeypatch.setattr(ptxas, "ptxas_path", lambda: "/usr/bin/true")
    monkeypatch.setattr(compile_cmd.shutil, "which", lambda name: f"/usr/bin/{name}")
    args = cli.build_parser().parse_args(["compile", "--backend", "tilelang"])
    assert compile_cmd.run(args) == 1
    assert "tilelang: AOT compile not available yet" in capsys.readouterr().out


def test_cli_defaults():
    args = cli.build_parser().parse_args(["compile"])
    assert (args.backend, args.arch, args.n, args.hidden, args.dtype) == ("all", None, 4, 4096, "bf16")
    assert args.json is None and args.emit_dir is None


def test_missing_sibling_module_is_skipped_not_hidden():
    present = {"mix", "common"}
    name = "mhc_kernels.triton_src.norm_fn"
    gone = ModuleNotFoundError(f"No module named '{name}'", name=name)
    assert aot._missing_sibling(gone, present) == "norm_fn"
    from_import = ImportError("cannot import name 'sinkhorn' from 'mhc_kernels.triton_src' (/x/__init__.py)")
    assert aot._missing_sibling(from_import, present) == "sinkhorn"
    # a third-party package that is missing, or a sibling that exists but fails, is a real error
    assert aot._missing_sibling(ModuleNotFoundError("No module named 'foo'", name="foo"), present) is None
    broken = ModuleNotFoundError("x", name="mhc_kernels.triton_src.mix")
    assert aot._missing_sibling(broken, present) is None


REPRESENTATIVE = [(arch, c) for arch in ("sm_80", "sm_90a", "sm_100a") for c in (1280, 4096, 7168)
                  if (arch, c) != ("sm_90a", C)]  # sm_90a at C=1280: test_compile_all_sm90a_no_spills


@needs_ptxas
@pytest.mark.slow
@pytest.mark.parametrize("arch,hidden", REPRESENTATIVE, ids=[f"{a}-C{c}" for a, c in REPRESENTATIVE])
def test_every_triton_kernel_compiles_clean_at_representative_shapes(arch, hidden):
    """Issue contract: every kernel, n=4, C in {1280, 4096, 7168}, sm_80/90a/100a, no spills, smem in limit."""
    records = aot.compile_all(arch, N, hidden, torch.bfloat16)
    _assert_clean(records, arch)
    assert {r["kernel"] for r in records} == {s.name for s in aot.collect_specs(N, hidden, torch.bfloat16)}


# -- TileLang: the run time's kernel keys, and --fill-cache -----------------------------------------------
needs_tilelang = pytest.mark.skipif(
    importlib.util.find_spec("tilelang") is None or shutil.which(os.environ.get("CXX", "g++")) is None,
    reason="needs tilelang and a host C++ compiler (the emulator)")


@needs_tilelang
def test_fill_cache_leaves_check_nothing_to_compile(tmp_path, monkeypatch):
    """``compile --fill-cache --for check --arch emulated`` builds what ``check`` then launches: the emulator's
    cache gains no entry during the check (the mix kernels are keyed C=1 float32 at run time, post by its own
    layout; both were missed by the old one-config-per-kernel compile)."""
    from mhc_kernels.tilelang_src import common, emulate

    monkeypatch.setenv("MHC_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("MHC_TILELANG_EMULATE", "1")

    def entries():
        return sorted(p.name for p in (tmp_path / "tilelang_emu").glob("*.so"))

    def cold():  # the next lookups go to the disk cache, as in a new process
        common._compiled.cache_clear()
        emulate._build_library.cache_clear()

    ops = ["split_mixes", "post"]
    cold()
    assert cli.main(["compile", "--fill-cache", "--for", "check", "--arch", "emulated", "--ops", *ops]) == 0
    filled = entries()
    assert len(filled) >= 4
    cold()
    try:
        assert cli.main(["check", "--device", "cpu", "--backends", "tilelang", "--ops", *ops]) == 0
        assert entries() == filled, "check compiled kernels that --fill-cache did not build"
    finally:
        cold()


@needs_tilelang
def test_recorded_keys_follow_the_token_count_and_the_sm_count():
    """The recorded keys are the run time's: norm_fn's split count depends on T and on the SM count, the mix
    kernels are keyed C=1 float32, every optional-weight variant is there; nothing is compiled."""
    from mhc_kernels.tilelang_src import runtime_keys

    def split(keys):
        return {dict(k.config)["split_K"] for k in keys if k.kernel == "mhc_pre_project"}

    few, _ = runtime_keys.record_shapes([(1, 4, 4096, torch.bfloat16)], 132, ops=["mhc_pre", "split_mixes"])
    many, _ = runtime_keys.record_shapes([(4096, 4, 4096, torch.bfloat16)], 132, ops=["mhc_pre", "split_mixes"])
    small_gpu, _ = runtime_keys.record_shapes([(1, 4, 4096, torch.bfloat16)], 16, ops=["mhc_pre"])
    assert split(few) != split(many) and split(few) != split(small_gpu)
    mix = [k for k in few if k.kernel.startswith("split_mixes")]
    assert mix and all(k.C == 1 and k.dtype == "float32" for k in mix)
    assert {"mhc_pre_tail", "mhc_pre_norm_tail"} <= {k.kernel for k in few}   # without and with the out-norm weight
    assert len(set(few)) == len(few)


def test_fill_cache_dry_run_counts_the_plan(tmp_path, capsys):
    pytest.importorskip("tilelang", reason="tilelang is not installed")
    from mhc_kernels.tilelang_src import runtime_keys

    out = tmp_path / "keys.json"
    assert cli.main(["compile", "--fill-cache", "--for", "check", "--dry-run", "--keys-out", str(out)]) == 0
    keys = runtime_keys.load(str(out))
    assert len(keys) > 20 and "dry run, nothing built" in capsys.readouterr().out
    assert {"mhc_pre_tail", "post_project", "sinkhorn_bwd"} <= {k.kernel for k in keys}


def test_the_selftest_plan_records_the_serving_stages_kernels(monkeypatch):
    """``--for selftest`` replays the serving stage too (its decode token counts and the FP8 / batch-invariant
    boundary at T=16384 ask for tails and splits that check, bench --quick and the smoke shapes never build);
    the other parts are switched off here to keep it short."""
    pytest.importorskip("tilelang", reason="tilelang is not installed")
    from mhc_kernels.tilelang_src import runtime_keys

    for part in ("replay_check", "replay_bench_quick", "replay_shapes"):
        monkeypatch.setattr(runtime_keys, part, lambda *a, **k: [])
    keys, _ = runtime_keys.record_plan("selftest", runtime_keys.ARCH_SMS["sm_90a"])
    assert {"post_project", "post_pre_sp_project"} <= {k.kernel for k in keys}
    tails = [dict(k.consts) for k in keys if k.kernel in ("mhc_pre_norm_tail", "mhc_pre_tail", "mhc_pre_sp_tail")]
    assert any(c.get("fp8_group") == 128 for c in tails), "the boundary with the FP8 copy (C=7168: groups of 128)"
    assert {k.C for k in keys} >= {4096, 7168}, "the decode boundaries (C=4096) and the bandwidth size (C=7168)"


def test_compile_refuses_the_emulated_arch_without_fill_cache(capsys):
    assert cli.main(["compile", "--backend", "tilelang", "--arch", "emulated"]) == 2
    assert "--fill-cache only" in capsys.readouterr().out
