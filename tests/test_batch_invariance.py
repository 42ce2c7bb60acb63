"""Batch-invariant mode (``mk.batch_invariant()``, ``MHC_KERNELS_BATCH_INVARIANT=1``; mhc_kernels/invariance.py).

Per backend that runs on CPU (the reference, Triton under its interpreter, TileLang under the emulator): every
row of the boundary ops at T in {1, 7, 300}, at the first, a middle and the last position of the batch, is
bitwise the row computed alone. The default mode is *not* batch invariant on the reference (PyTorch's CPU
matmul takes another summation order for one row than for many), which the last test shows -- so the mode is
what makes these pass. On a GPU the same check runs at production sizes (``-m gpu``).
"""

import os
import subprocess
import sys

import pytest
import torch
from backends import BACKENDS

import mhc_kernels as mk
from mhc_kernels import invariance, registry
from mhc_kernels.autotune.inputs import fabricate_call
from mhc_kernels.reference import cases

BOUNDARY_OPS = ("mhc_pre", "mhc_pre_sp", "post_pre", "post_pre_sp")


def _token_rows(op: str, d: dict, T: int, rows: slice) -> dict:
    """The inputs of ``op`` restricted to the tokens ``rows`` (the tensors whose template has token dims)."""
    spec = mk.SPECS[op]
    out = dict(d)
    for a in spec.tensor_args:
        if a.shape[:1] == ("*",) and d.get(a.name) is not None:
            out[a.name] = d[a.name][rows]
    return out


def _row_mismatches(backend: str, op: str, T: int, n: int, C: int, dtype, enabled=True):
    d = cases.make_inputs(op, (T,), n, C, dtype, norm_weight=True, seed=T)
    case = cases.CASES[op]
    bad = []
    with torch.no_grad(), mk.use_backend(backend), mk.batch_invariant(enabled):
        full = case.run(mk, d)
        for p in sorted({0, T // 2, T - 1}):
            alone = case.run(mk, _token_rows(op, d, T, slice(p, p + 1)))
            for i, (a, b) in enumerate(zip(full, alone)):
                if not torch.equal(a[p:p + 1], b):
                    bad.append(f"row {p} of output {i}: max |diff| {(a[p:p + 1].float() - b.float()).abs().max():.3g}")
    return bad


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("op", BOUNDARY_OPS)
def test_each_row_equals_the_row_computed_alone(backend, op, served):
    # C = 33: a ragged tail block on every backend; n = 4 and bf16, the production pair
    for T in (1, 7, 300):
        bad = _row_mismatches(backend, op, T, 4, 33, torch.bfloat16)
        assert not bad, f"{backend} {op} T={T} in batch-invariant mode: " + "; ".join(bad)
    assert served[op] == {backend}, served


def test_the_default_mode_is_not_batch_invariant_on_the_reference():
    """What the mode is for: without it the reference's rows at T=300 differ from the rows alone (PyTorch's
    CPU matmul sums one row in another order than a block of rows). If a PyTorch build ever makes this
    pass on its own, the tests above still hold; this one then only documents the old behaviour."""
    bad = _row_mismatches("reference", "mhc_pre", 300, 4, 1024, torch.float32, enabled=False)
    if not bad:
        pytest.skip("this PyTorch build's CPU matmul is already row invariant at these shapes")
    assert bad


@pytest.mark.parametrize("backend_name", ["triton", "tilelang"])
def test_forward_configs_do_not_depend_on_the_token_count(backend_name):
    """In the mode every forward op's config is the one of a fixed token count (the K split included), on a
    fabricated GPU call whose default config does depend on T; backward ops keep theirs."""
    pytest.importorskip(backend_name)
    registry.clear_caches()
    k = registry.get_kernel("norm_fn", backend_name)
    kb = registry.get_kernel("norm_fn_bwd", backend_name)
    calls = {T: fabricate_call("norm_fn", T, 4, 4096, torch.bfloat16) for T in (1, 7, 300, 65536)}
    bwd_calls = [fabricate_call("norm_fn_bwd", T, 4, 4096, torch.bfloat16) for T in (1, 65536)]
    default = {T: registry.config_for(k, c) for T, c in calls.items()}
    default_bwd = [registry.config_for(kb, c) for c in bwd_calls]
    assert len({repr(c) for c in default.values()}) > 1, "the default split depends on T (else nothing to test)"
    with mk.batch_invariant():
        fixed = {T: registry.config_for(k, c) for T, c in calls.items()}
        bwd = [registry.config_for(kb, c) for c in bwd_calls]
    assert len({repr(c) for c in fixed.values()}) == 1, fixed
    assert fixed[1] == registry.config_for(k, fabricate_call("norm_fn", invariance.BATCH_INVARIANT_TOKENS, 4, 4096,
                                                              torch.bfloat16))
    assert bwd == default_bwd, "backward configs are not the mode's business"
    registry.clear_caches()


def test_the_mode_nests_and_the_environment_switches_it_on():
    assert not mk.batch_invariant_enabled()
    with mk.batch_invariant():
        assert mk.batch_invariant_enabled()
        with mk.batch_invariant(False):
            assert not mk.batch_invariant_enabled()
        assert mk.batch_invariant_enabled()
    assert not mk.batch_invariant_enabled()
    code = "import mhc_kernels as mk; print(mk.batch_invariant_enabled())"
    for value, want in (("1", "True"), ("off", "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, MHC_KERNELS_BATCH_INVARIANT=value)).stdout.strip()
        assert out == want, (value, out)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, MHC_KERNELS_BATCH_INVARIANT="maybe"))
    assert r.returncode != 0 and "MHC_KERNELS_BATCH_INVARIANT='maybe'" in r.stderr


@pytest.mark.gpu
@pytest.mark.gpu_smoke
@pytest.mark.parametrize("backend_name", ["triton", "tilelang", "reference"])
@pytest.mark.parametrize("op", BOUNDARY_OPS)
def test_each_row_equals_the_row_alone_on_the_gpu(backend_name, op):
    """Production sizes on a GPU, where the default K split does depend on T (tensor-core dots included)."""
    if not mk.available_backends("cuda")[backend_name].available:
        pytest.skip(mk.available_backends("cuda")[backend_name].reason)
    for T in (1, 300, 4096):
        d = cases.make_inputs(op, (T,), 4, 4096, torch.bfloat16, "cuda", norm_weight=True, seed=T)
        case = cases.CASES[op]
        with torch.no_grad(), mk.use_backend(backend_name), mk.batch_invariant():
            full = case.run(mk, d)
            for p in sorted({0, T // 2, T - 1}):
                alone = case.run(mk, _token_rows(op, d, T, slice(p, p + 1)))
                for i, (a, b) in enumerate(zip(full, alone)):
                    assert torch.equal(a[p:p + 1], b), f"{backend_name} {op} T={T} row {p} output {i}"
