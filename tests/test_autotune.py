"""Autotuning without a GPU: pruning, the tuner with an injected timer and stand-in kernels,
the atomic per-device store, resume and version invalidation, the runtime lookup, the CLI."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from mhc_kernels import registry, tuned
from mhc_kernels.autotune import engine, plan, space, sweep
from mhc_kernels.autotune import store as store_mod
from mhc_kernels.autotune.inputs import fabricate_call, make_call
from mhc_kernels.registry import Kernel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONS = {"torch": "2.13.0", "triton": "3.9.0", "tilelang": "0.1.15", "mhc_kernels": "0.1.0"}
CPU = {"name": "cpu", "capability": None, "sm_count": None}


@pytest.fixture(autouse=True)
def _config_dir(tmp_path, monkeypatch):
    """Every test reads and writes configs in its own directory, with fixed versions."""
    d = tmp_path / "configs"
    monkeypatch.setenv(tuned.CONFIG_DIR_ENV, str(d))
    monkeypatch.setattr(tuned, "current_versions", lambda: dict(VERSIONS))
    tuned.clear_cache()
    yield d
    tuned.clear_cache()


# -- stand-in kernels ------------------------------------------------------------
_REF = registry.get_kernel("pre_apply_mix", "reference")
SPACE = [{"BLOCK": 1}, {"BLOCK": 2}, {"BLOCK": 4, "wrong": True}, {"BLOCK": 8, "boom": True}]
DEFAULT = {"BLOCK": 1}


def _stand_in(residual, pre_mix, *, config):
    if config.get("boom"):
        raise RuntimeError("out of resources")
    out = _REF.fn(residual, pre_mix)
    return out * 1.05 if config.get("wrong") else out


def _kernel(**kw):
    return Kernel("pre_apply_mix", "triton", _stand_in, config_space=lambda call: [dict(c) for c in SPACE],
                  default_config=lambda call: dict(DEFAULT), **kw)


class FakeTimer:
    """µs by BLOCK: the wrong config is the 'fastest'."""

    method = "fake timer"

    def __init__(self, us=None):
        self.us = us or {1: 10.0, 2: 5.0, 4: 1.0, 8: 0.5}
        self.timed = []

    def __call__(self, fn, config):
        fn()
        self.timed.append(config["BLOCK"])
        u = self.us[config["BLOCK"]]
        return [u * 1.2, u, u * 0.9, u, u * 5]   # median = u


def _tuner(timer=None, **kw):
    return engine.Tuner(timer=timer or FakeTimer(), arch=90, **kw)


# -- pruning -----------------------------------------------------------------------
def test_prune_drops_configs_over_the_sm90_limits_duplicates_and_what_the_kernel_refuses():
    kib = 1024
    configs = [
        {"BLOCK_C": 64, "smem_bytes": 90 * kib, "num_warps": 4},
        {"BLOCK_C": 64, "smem_bytes": 200 * kib, "num_warps": 4},   # fits sm_90 (227 KiB), not sm_86 (99 KiB)
        {"BLOCK_C": 64, "smem_bytes": 240 * kib, "num_warps": 4},   # over sm_90's 227 KiB
        {"BLOCK_C": 64, "smem_bytes": 90 * kib, "num_warps": 4},    # duplicate
        {"BLOCK_C": 64, "num_warps": 64},                           # 2048 threads
        {"BLOCK_C": 64, "num_warps": 16, "regs_per_thread": 255},   # 255 x 512 > 64k registers
        {"BLOCK_C": 96, "num_warps": 4},                            # the kernel's check: 96 does not divide C
        {"BLOCK_C": 128, "num_warps": 2},                           # the kernel's check says no
    ]

    def check(call, cfg):
        if call.C % cfg["BLOCK_C"]:
            return f"BLOCK_C={cfg['BLOCK_C']} does not divide C={call.C}"
        return "hook says no" if cfg.get("num_warps") == 2 else None

    k = Kernel("post", "triton", _stand_in, config_space=lambda call: configs, check_config=check)
    call = fabricate_call("post", 64, 4, 256, torch.bfloat16)
    pr = space.prune(k, call, space.enumerate_space(k, call), arch=90)
    assert pr.kept == configs[:2]
    reasons = [why for _, why in pr.dropped]
    assert len(reasons) == 6
    assert "shared memory" in reasons[0] and "232448" in reasons[0]
    assert reasons[1] == "duplicate"
    assert "threads" in reasons[2] and "registers" in reasons[3]
    assert "does not divide C=256" in reasons[4] and reasons[5] == "hook says no"
    assert space.prune(k, call, configs, arch=86).kept == configs[:1]


def test_prune_drops_oversized_tiles_only_when_the_clamped_twin_exists():
    configs = [{"block_T": bt, "num_warps": 4} for bt in (1, 2, 4, 8)]
    k = Kernel("post", "triton", _stand_in, config_space=lambda call: configs)
    pr = space.prune(k, fabricate_call("post", 2, 4, 256, torch.bfloat16), configs)
    assert pr.kept == configs[:2]
    only_big = configs[3:]
    assert space.prune(k, fabricate_call("post", 2, 4, 256, torch.bfloat16), only_big).kept == only_big


def test_prune_judges_a_composites_tiles_part_by_part():
    """A composite's config is redundant when one part's tile, clamped to that part's problem, gives a config
    also in the space -- even while another part keeps an oversized default tile."""
    part = lambda: Kernel("pre_apply_mix", "triton", _stand_in, config_space=lambda call: [])  # noqa: E731
    k = Kernel("mhc_head", "triton", _stand_in, parts={"norm_fn": part(), "pre_apply_mix": part()})
    apply_default = {"block_T": 8}  # oversized at T=2, with no clamped twin in the space: kept as it is
    configs = [{"norm_fn": {"block_T": bt}, "pre_apply_mix": apply_default} for bt in (2, 4, 16)]
    pr = space.prune(k, fabricate_call("mhc_head", 2, 4, 256, torch.bfloat16), configs)
    assert pr.kept == configs[:1]
    assert [why for _, why in pr.dropped] == ["tile larger than the problem (same as a smaller tile)"] * 2


def test_dry_run_plan_uses_fabricated_calls_and_needs_no_data():
    call = fabricate_call("mhc_pre_bwd", 65536, 4, 7168, torch.bfloat16)
    assert call.T == 65536 and call.device.type == "cuda" and call.args[3].device.type == "meta"


# -- the tuner -----------------------------------------------------------------------
def test_tuner_picks_what_the_timer_favours_and_never_a_wrong_or_failing_config():
    timer = FakeTimer()
    res = _tuner(timer).tune(_kernel(), "pre_apply_mix", 16, 4, 32, torch.float32, "cpu")
    by_block = {c.config["BLOCK"]: c for c in res.candidates}
    assert by_block[4].status == "wrong" and "allowed" in by_block[4].reason
    assert by_block[8].status == "compile-error" and "out of resources" in by_block[8].reason
    assert 4 not in timer.timed and 8 not in timer.timed          # checked before timing
    assert res.best.config == {"BLOCK": 2} and res.best.us == 5.0   # median of the samples
    assert res.default_us == 10.0 and res.speedup == pytest.approx(2.0)
    nbytes = 16 * 4 * 32 * 4 + 16 * 4 * 4 + 16 * 32 * 4
    assert res.bytes == nbytes and res.gbps == pytest.approx(nbytes / 5e-6 / 1e9)
    assert res.timing == "fake timer"


def test_tuner_follows_the_timer_and_times_a_default_outside_the_space():
    timer = FakeTimer({1: 3.0, 2: 7.0, 4: 1.0, 8: 0.5, 16: 9.0})
    global DEFAULT
    old, DEFAULT = DEFAULT, {"BLOCK": 16}
    try:
        res = _tuner(timer).tune(_kernel(), "pre_apply_mix", 8, 2, 16, torch.bfloat16, "cpu")
    finally:
        DEFAULT = old
    assert res.best.config == {"BLOCK": 1}
    assert res.default_us == 9.0 and res.speedup == pytest.approx(3.0)


def test_correctness_check_uses_the_reference_at_float64_with_slack():
    call = make_call("post", 8, 4, 32, torch.bfloat16, "cpu")
    ref = registry.get_kernel("post", "reference")
    exp = engine.reference_outputs(ref, call)
    assert exp.outputs[0].dtype == torch.float64
    assert engine.check_outputs(ref.fn(*call.args), exp) is None
    assert "allowed" in engine.check_outputs(ref.fn(*call.args) * 1.03, exp)


@pytest.mark.parametrize("op", ["norm_fn_bwd", "mhc_pre_bwd", "sinkhorn_bwd", "expand_bwd"])
def test_inputs_for_backward_ops_bind_and_the_reference_passes_its_own_check(op):
    call = make_call(op, 5, 2, 8, torch.bfloat16, "cpu")
    ref = registry.get_kernel(op, "reference")
    assert call.T == 5 and engine.check_outputs(ref.fn(*call.args), engine.reference_outputs(ref, call)) is None


# -- the store ---------------------------------------------------------------------
def _filled_store(d, entries=((4, 16), (4, 64)), **kw):
    st = store_mod.ConfigStore.for_device(str(d), CPU)
    for n, T in entries:
        st.put("post", "triton", torch.bfloat16, n, 256, T, config={"BLOCK_T": T}, us=2.0, gbps=100.0, **kw)
    st.save()
    return st


def test_store_file_format(_config_dir):
    st = _filled_store(_config_dir)
    assert os.path.basename(st.path) == "cpu.json"
    data = json.loads(open(st.path).read())
    assert data["schema"] == tuned.SCHEMA_VERSION and data["device"] == CPU and data["versions"] == VERSIONS
    e = data["entries"]["post/triton/bf16/n4/C256/T16"]
    assert e["config"] == {"BLOCK_T": 16} and e["us"] == 2.0 and e["gbps"] == 100.0
    assert e["versions"] == {"mhc_kernels": "0.1.0", "triton": "3.9.0"}
    assert tuned.sanitize_device_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert tuned.sanitize_device_name(" NVIDIA GeForce RTX 4090/x ") == "NVIDIA_GeForce_RTX_4090_x"


def test_store_writes_atomically_and_a_crash_mid_write_keeps_the_old_file(_config_dir, monkeypatch):
    st = _filled_store(_config_dir)
    before = open(st.path).read()
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    st.put("post", "triton", torch.bfloat16, 8, 256, 16, config={"BLOCK_T": 1}, us=1.0, gbps=1.0)
    st.save()
    (tmp, dst), = replaced
    assert dst == st.path and os.path.dirname(tmp) == os.path.dirname(dst) and not os.path.exists(tmp)
    after = open(st.path).read()
    assert "n8" in after

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)       # dies after part of the JSON is written
    st.put("post", "triton", torch.bfloat16, 2, 256, 16, config={"BLOCK_T": 1}, us=1.0, gbps=1.0)
    with pytest.raises(OSError, match="disk full"):
        st.save()
    assert open(st.path).read() == after != before
    assert os.listdir(_config_dir) == ["cpu.json"]  # no temp file left behind


def test_resume_skips_finished_entries_and_a_version_change_invalidates_them(_config_dir, monkeypatch):
    kernel = _kernel()
    entries = [plan.Entry("pre_apply_mix", "triton", kernel, torch.float32, torch.float32, 4, 32, T,
                          tuned.entry_key("pre_apply_mix", "triton", torch.float32, 4, 32, T)) for T in (4, 16)]
    st = store_mod.ConfigStore.for_device(str(_config_dir), CPU)
    timer = FakeTimer()
    rep = sweep.run_sweep(entries, st, _tuner(timer), "cpu", resume=True)
    assert len(rep.results) == 2 and not rep.failures and not rep.skipped
    assert tuned.lookup("pre_apply_mix", "triton", "cpu", torch.float32, 4, 32, 16) == {"BLOCK": 2}

    st2 = store_mod.ConfigStore.for_device(str(_config_dir), CPU)   # a new run, from the file
    n_timed = len(timer.timed)
    rep = sweep.run_sweep(entries, st2, _tuner(timer), "cpu", resume=True)
    assert len(rep.skipped) == 2 and not rep.results and len(timer.timed) == n_timed
    rep = sweep.run_sweep(entries[:1], st2, _tuner(timer), "cpu", resume=False)
    assert len(rep.results) == 1                                    # without --resume: re-tuned

    newer = dict(VERSIONS, triton="3.10.0")
    st3 = store_mod.ConfigStore.for_device(str(_config_dir), CPU, versions=newer)
    assert sweep.pending(entries, st3, resume=True)[0] == entries    # stale: tuned again
    monkeypatch.setattr(tuned, "current_versions", lambda: newer)
    tuned.clear_cache()
    assert tuned.lookup("pre_apply_mix", "triton", "cpu", torch.float32, 4, 32, 16) is None


# -- runtime lookup -----------------------------------------------------------------
def test_lookup_exact_nearest_bucket_and_miss(_config_dir):
    _filled_store(_config_dir, entries=((4, 16), (4, 1024)))
    look = lambda n=4, T=16, C=256, dt=torch.bfloat16, b="triton": tuned.lookup("post", b, "cpu", dt, n, C, T)  # noqa
    assert look(T=16) == {"BLOCK_T": 16}
    assert look(T=9) == {"BLOCK_T": 16}            # bucket 16: exact
    assert look(T=1000) == {"BLOCK_T": 1024}       # bucket 1024: exact
    assert look(T=1) == {"BLOCK_T": 16}            # nearest
    assert look(T=60) == {"BLOCK_T": 16}           # bucket 64: log-nearer 16 than 1024
    assert look(T=100) == {"BLOCK_T": 1024}        # bucket 128: a tie goes to the larger bucket
    assert look(T=300) == {"BLOCK_T": 1024}        # bucket 512
    assert look(T=10 ** 6) == {"BLOCK_T": 1024}
    assert look(n=2) is None and look(C=512) is None and look(dt=torch.float16) is None
    assert look(b="tilelang") is None
    if not torch.cuda.is_available():   # a device that cannot be named is a miss, not an error
        assert tuned.lookup("post", "triton", "cuda:3", torch.bfloat16, 4, 256, 16) is None


def test_user_configs_win_over_bundled_and_files_are_read_once(_config_dir, tmp_path, monkeypatch):
    bundled = tmp_path / "bundled"
    monkeypatch.setattr(tuned, "bundled_config_dir", lambda: str(bundled))
    b = store_mod.ConfigStore.for_device(str(bundled), CPU)
    for T, v in ((16, "bundled"), (256, "bundled")):
        b.put("post", "triton", torch.bfloat16, 4, 256, T, config={"from": v}, us=1, gbps=1)
    b.save()
    u = store_mod.ConfigStore.for_device(str(_config_dir), CPU)
    u.put("post", "triton", torch.bfloat16, 4, 256, 16, config={"from": "user"}, us=1, gbps=1)
    u.save()
    reads = []
    real = tuned.read_store
    monkeypatch.setattr(tuned, "read_store", lambda p, **k: (reads.append(p), real(p, **k))[1])
    assert tuned.lookup("post", "triton", "cpu", torch.bfloat16, 4, 256, 16) == {"from": "user"}
    assert tuned.lookup("post", "triton", "cpu", torch.bfloat16, 4, 256, 256) == {"from": "bundled"}
    for T in range(1, 3000, 7):
        tuned.lookup("post", "triton", "cpu", torch.bfloat16, 4, 256, T)
    assert len(reads) == 2   # bundled + user, once


@pytest.mark.parametrize("content, what", [("{\"schema\": 1, \"entries\": {\"post/tri", "JSON"),
                                           (json.dumps({"schema": 999, "entries": {}}), "schema version 999")])
def test_corrupt_or_stale_schema_file_warns_once_and_reads_as_a_miss(_config_dir, content, what):
    os.makedirs(_config_dir)
    (_config_dir / "cpu.json").write_text(content)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for T in (16, 16, 64, 1000):
            assert tuned.lookup("post", "triton", "cpu", torch.bfloat16, 4, 256, T) is None
        st = store_mod.ConfigStore.for_device(str(_config_dir), CPU)   # the tuner starts afresh
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and what in msgs[0] and "cpu.json" in msgs[0]
    assert st.entries == {}


def test_lookup_with_symbolic_sizes_returns_none():
    class Sym:
        pass

    assert tuned.lookup("post", "triton", "cpu", torch.bfloat16, 4, 256, Sym()) is None


def test_core_does_not_import_the_tools():
    code = ("import sys, torch, mhc_kernels; from mhc_kernels import tuned; "
            "tuned.lookup('post', 'triton', 'cpu', torch.bfloat16, 4, 256, 16); "
            "print(sorted(m for m in sys.modules if m.startswith('mhc_kernels.autotune.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


# -- CLI -------------------------------------------------------------------------------
def _cli(*args, **env):
    e = dict(os.environ, COLUMNS="200", **env)
    return subprocess.run([sys.executable, "-m", "mhc_kernels", "autotune", *args], capture_output=True, text=True,
                          cwd=REPO, env=e, timeout=120)


def test_cli_dry_run_prints_the_plan_on_cpu(tmp_path):
    r = _cli("--dry-run", "--tokens", "1", "4096", "--hidden", "4096", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "autotune plan for sm_90" in r.stdout and "entries" in r.stdout
    for b in plan.TUNABLE_BACKENDS:
        assert b in r.stdout
    assert not os.listdir(tmp_path)   # a plan writes nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a CUDA device")
def test_cli_without_gpu_exits_nonzero_with_a_clear_message():
    r = _cli("--ops", "post")
    assert r.returncode != 0
    assert "needs a CUDA device" in r.stderr + r.stdout and "--dry-run" in r.stderr + r.stdout


# -- the runtime: one resolution per call, in the core ------------------------------------------------------
def test_a_composite_reads_its_own_store_entry_once_and_the_result_is_memoized(monkeypatch):
    """mhc_head's config is one entry (named sub-configs, merged part by part over the default), looked up
    once per call shape; repeated calls hit the memo; a cleared store is read afresh. (Triton's mhc_pre is
    its own two-launch kernel now, with the parts "projection" and "tail"; mhc_head is a composite.)"""
    pytest.importorskip("triton")
    asked = []
    stored = {"pre_apply_mix": {"block_T": 2, "num_warps": 8}}

    def lookup(op, backend, device, dtype, n, C, T):
        asked.append((op, backend, n, C, T))
        return stored if op == "mhc_head" else None

    monkeypatch.setattr(tuned, "lookup", lookup)
    k = registry.get_kernel("mhc_head", "triton")
    call = fabricate_call("mhc_head", 4096, 4, 4096, torch.bfloat16)
    default = k.default_config(call)
    assert set(default) == {"norm_fn", "pre_apply_mix"}
    cfg = registry.config_for(k, call)
    assert cfg["pre_apply_mix"] == dict(default["pre_apply_mix"], block_T=2, num_warps=8)
    assert cfg["norm_fn"] == default["norm_fn"]
    assert asked == [("mhc_head", "triton", 4, 4096, 4096)]   # the composite's own entry, not norm_fn's
    assert registry.config_for(k, call) is cfg and len(asked) == 1
    tuned.clear_cache()
    registry.config_for(k, call)
    assert len(asked) == 2


def test_a_stored_config_the_kernel_refuses_for_this_call_falls_back_to_the_default(monkeypatch):
    monkeypatch.setattr(tuned, "lookup", lambda *a: {"BLOCK": 64})
    k = _kernel(check_config=lambda call, cfg: "too big for this call" if cfg["BLOCK"] > 8 else None)
    call = fabricate_call("pre_apply_mix", 16, 4, 32, torch.float32)
    assert registry.config_for(k, call) == DEFAULT
    ok = _kernel(check_config=lambda call, cfg: None)
    registry.clear_caches()
    assert registry.config_for(ok, call) == {"BLOCK": 64}


def test_cpu_calls_never_read_the_store(monkeypatch):
    monkeypatch.setattr(tuned, "lookup", lambda *a: pytest.fail("looked up a config for a CPU call"))
    call = fabricate_call("pre_apply_mix", 16, 4, 32, torch.float32, target="cpu")
    assert registry.config_for(_kernel(), call) == DEFAULT
