"""Triton kernels of norm_fn, split_mixes and sinkhorn (forward and backward) against the float64 oracle.

Runs the kernels on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when no GPU is present), or on CUDA where one is. Forwards are
compared with the NumPy oracle, gradients with the PyTorch reference's explicit
backward evaluated in float64 (itself gradchecked in test_reference_numerics.py),
under ``cases.TOLERANCES`` with the working-precision reference as the ``naive``
slack (see ``reference/cases.py``). Every freshly allocated kernel output is
pre-filled with NaN, so an element a kernel forgets to write fails the comparison.

Shapes cover n in {1, 2, 4, 8}, C in {1, 33, 64, 200}, T in {0, 1, 5, 37},
bf16/fp16/fp32, with and without norm_weight, Sinkhorn rounds in {1, 3, 20}; the
interpreter costs tens of ms per program, so the test configs use large blocks.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)

from op_samples import resolved_config  # noqa: E402

from mhc_kernels.reference import cases, oracle  # noqa: E402
from mhc_kernels.reference import torch_ref as ref  # noqa: E402
from mhc_kernels.triton_src import common  # noqa: E402
from mhc_kernels.triton_src import norm_fn as nf  # noqa: E402
from mhc_kernels.triton_src import sinkhorn as sk  # noqa: E402

F64 = torch.float64


def _resolving(fn, op, nargs):
    """``fn`` (a launch wrapper, which requires a config) with ``config=None`` meaning the config the core
    resolves for the call -- what the registered kernel runs with."""
    def call(*args, config=None, **kw):
        return fn(*args, config=config if config is not None else resolved_config("triton", op, *args[:nargs]), **kw)
    return call


_norm_fwd = _resolving(nf.norm_fn_fwd, "norm_fn", 4)
_norm_bwd = _resolving(nf.norm_fn_bwd, "norm_fn_bwd", 6)
_split_fwd = _resolving(sk.split_mixes_fwd, "split_mixes", 7)
_split_bwd = _resolving(sk.split_mixes_bwd, "split_mixes_bwd", 9)
_sk_fwd = _resolving(sk.sinkhorn_fwd, "sinkhorn", 3)
_sk_bwd = _resolving(sk.sinkhorn_bwd, "sinkhorn_bwd", 4)


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    """Kernel outputs start as NaN: an unwritten element cannot pass."""
    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(nf, "_alloc", alloc)
    monkeypatch.setattr(sk, "_alloc", alloc)


def _ok(name, actual, expected, dtype=None, naive=None):
    r = cases.compare(name, actual, expected, dtype=dtype, naive=naive)
    assert r.ok, f"{name}: ratio {r.worst_ratio:.3g}, max err {r.max_abs_err:.3g} ({r.detail})"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _to(t):
    return None if t is None else t.to(DEVICE)


def _d64(t):
    return None if t is None else t.detach().cpu().to(F64)


# -- norm_fn --------------------------------------------------------------------------------------------
def _norm_inputs(T, n, C, dtype, with_nw, seed=0, rows=None):
    d = cases.make_inputs("norm_fn", (T,), n, C, dtype, norm_weight=with_nw, seed=seed)
    if rows is not None:  # mhc_head's projection has n rows
        d["fn"] = d["fn"][:rows].contiguous()
    return {k: _to(v) if isinstance(v, torch.Tensor) else v for k, v in d.items()}


# (T, n, C, dtype, norm_weight): a covering set of n x C x T x dtype x norm_weight
NORM_SHAPES = [
    (37, 1, 1, torch.float32, True),
    (5, 2, 33, torch.bfloat16, False),
    (37, 4, 64, torch.float16, True),
    (5, 8, 200, torch.bfloat16, True),
    (37, 4, 200, torch.float32, False),
    (1, 8, 33, torch.float16, False),
    (37, 2, 1, torch.bfloat16, True),
    (5, 1, 64, torch.float16, False),
    (1, 8, 1, torch.float32, True),
    (0, 4, 33, torch.bfloat16, True),
]


def _norm_id(p):
    T, n, C, dt, nw = p
    return f"T{T}-n{n}-C{C}-{str(dt)[6:]}" + ("-nw" if nw else "")


# CPU configs: few programs (the interpreter is slow per program), yet several loop steps
FWD_SPLIT = dict(block_T=32, block_K=32, split_K=3, num_warps=4, num_stages=1, precision="ieee")
BWD_SPLIT = dict(block_T=16, block_C=32, split_T=3, num_warps=4, num_stages=1, precision="ieee")


@pytest.mark.parametrize("T,n,C,dtype,with_nw", NORM_SHAPES, ids=[_norm_id(p) for p in NORM_SHAPES])
def test_norm_fn_fwd_matches_oracle(T, n, C, dtype, with_nw):
    d = _norm_inputs(T, n, C, dtype, with_nw)
    args = (d["residual"], d["fn"], d["norm_weight"], d["norm_eps"])
    exp_mixes = oracle.norm_fn(d["residual"], d["fn"], d["norm_weight"], d["norm_eps"])
    exp_rstd = oracle.rstd(d["residual"], d["norm_eps"])
    naive = ref.norm_fn_fwd(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    for cfg in (None, FWD_SPLIT):   # default (no split on CPU) and a split-K config
        mixes, rstd = _norm_fwd(*args, config=cfg)
        assert mixes.shape == (T, n * (n + 2)) and rstd.shape == (T,) and mixes.dtype == rstd.dtype == torch.float32
        _ok(f"mixes[{cfg}]", mixes, exp_mixes, naive=naive[0])
        _ok(f"rstd[{cfg}]", rstd, exp_rstd, naive=naive[1])


def _norm_bwd_case(T, n, C, dtype, with_nw, seed=0, rows=None):
    d = _norm_inputs(T, n, C, dtype, with_nw, seed, rows)
    mixes, rstd = ref.norm_fn_fwd(d["residual"], d["fn"], d["norm_weight"], d["norm_eps"])
    g = torch.randn(mixes.shape, generator=_gen(seed + 1), dtype=F64).float().to(DEVICE)
    return d, g, mixes, rstd


def _norm_bwd_expected(d, g, mixes, rstd):
    """(float64 truth, working-precision reference) of (d_x in fp64 before rounding, d_fn_eff)."""
    x, fn, w = d["residual"], d["fn"], d["norm_weight"]
    x_flat = _d64(x).reshape(x.shape[0], x.shape[1] * x.shape[2])
    exact = ref._norm_fn_bwd_acc(_d64(g), x_flat, _d64(fn), _d64(w), _d64(mixes), _d64(rstd))
    naive = ref.norm_fn_bwd(g.cpu(), x.cpu(), fn.cpu(), _to_cpu(w), mixes.cpu(), rstd.cpu())
    return (exact[0].reshape(x.shape), exact[1]), naive


def _to_cpu(t):
    return None if t is None else t.cpu()


@pytest.mark.parametrize("T,n,C,dtype,with_nw", NORM_SHAPES, ids=[_norm_id(p) for p in NORM_SHAPES])
def test_norm_fn_bwd_matches_reference_f64(T, n, C, dtype, with_nw):
    d, g, mixes, rstd = _norm_bwd_case(T, n, C, dtype, with_nw)
    (exp_dx, exp_dfn), naive = _norm_bwd_expected(d, g, mixes, rstd)
    for cfg in (None, BWD_SPLIT):   # default (one token range on CPU) and 3 token ranges of d_fn partials
        dx, dfn = _norm_bwd(g, d["residual"], d["fn"], d["norm_weight"], mixes, rstd, config=cfg)
        assert dx.dtype == dtype and dx.shape == (T, n, C) and dfn.shape == d["fn"].shape
        _ok(f"d_residual[{cfg}]", dx, exp_dx, naive=naive[0])
        _ok(f"d_fn_eff[{cfg}]", dfn, exp_dfn, naive=naive[1])


@pytest.mark.parametrize("T,n,C,dtype", [(37, 4, 33, torch.bfloat16), (5, 8, 64, torch.float32),
                                         (1, 1, 1, torch.float16), (5, 2, 200, torch.float16)])
def test_norm_fn_bwd_fused_site_extras(T, n, C, dtype):
    """grad_residual + pre_mix (x) apply_grad are added in float32 before the single rounding."""
    d, g, mixes, rstd = _norm_bwd_case(T, n, C, dtype, True, seed=3)
    gen = _gen(7)
    grad_res = torch.randn((T, n, C), generator=gen, dtype=F64).to(dtype).to(DEVICE)
    apply_grad = torch.randn((T, C), generator=gen, dtype=F64).to(dtype).to(DEVICE)
    pre_mix = torch.rand((T, n), generator=gen, dtype=F64).float().to(DEVICE)
    (exp_dx, exp_dfn), _ = _norm_bwd_expected(d, g, mixes, rstd)
    exp_dx = exp_dx + _d64(grad_res) + _d64(pre_mix)[:, :, None] * _d64(apply_grad)[:, None, :]
    for kwargs in (dict(grad_residual=grad_res, apply_grad=apply_grad, apply_w=pre_mix),
                   dict(grad_residual=grad_res), dict(apply_grad=apply_grad, apply_w=pre_mix)):
        exp = exp_dx
        if "grad_residual" not in kwargs:
            exp = exp - _d64(grad_res)
        if "apply_grad" not in kwargs:
            exp = exp - _d64(pre_mix)[:, :, None] * _d64(apply_grad)[:, None, :]
        dx, dfn = _norm_bwd(g, d["residual"], d["fn"], d["norm_weight"], mixes, rstd, **kwargs)
        _ok(f"d_residual[{sorted(kwargs)}]", dx, exp)
        _ok(f"d_fn_eff[{sorted(kwargs)}]", dfn, exp_dfn)


def test_norm_fn_head_rows():
    """mhc_head's projection: fn has n rows instead of n*(n+2)."""
    d, g, mixes, rstd = _norm_bwd_case(37, 4, 33, torch.bfloat16, True, rows=4)
    got, got_rstd = _norm_fwd(d["residual"], d["fn"], d["norm_weight"], d["norm_eps"])
    _ok("head mixes", got, oracle.norm_fn(d["residual"], d["fn"], d["norm_weight"], d["norm_eps"]))
    (exp_dx, exp_dfn), naive = _norm_bwd_expected(d, g, mixes, rstd)
    dx, dfn = _norm_bwd(g, d["residual"], d["fn"], d["norm_weight"], mixes, rstd)
    _ok("head d_residual", dx, exp_dx, naive=naive[0])
    _ok("head d_fn_eff", dfn, exp_dfn, naive=naive[1])


NORM_FWD_CONFIGS = [
    dict(block_T=16, block_K=16, split_K=1, num_warps=4, num_stages=2, precision="tf32x3"),
    dict(block_T=64, block_K=64, split_K=2, num_warps=8, num_stages=3, precision="ieee"),
    dict(block_T=32, block_K=128, split_K=16, num_warps=4, num_stages=1, precision="tf32x3"),  # splits > K steps
]
NORM_BWD_CONFIGS = [
    dict(block_T=16, block_C=16, split_T=1, num_warps=4, num_stages=2, precision="tf32x3"),
    dict(block_T=32, block_C=128, split_T=2, num_warps=8, num_stages=3, precision="ieee"),
    dict(block_T=16, block_C=64, split_T=32, num_warps=4, num_stages=1, precision="tf32x3"),  # > token blocks
]


def test_norm_fn_configs_agree():
    """Split-K vs no split, and other points of the config spaces, give the same results."""
    d, g, mixes, rstd = _norm_bwd_case(37, 4, 33, torch.bfloat16, True, seed=5)
    args = (d["residual"], d["fn"], d["norm_weight"], d["norm_eps"])
    base_m, base_r = _norm_fwd(*args, config=dict(FWD_SPLIT, split_K=1))
    for cfg in NORM_FWD_CONFIGS + [FWD_SPLIT, None]:
        m_, r_ = _norm_fwd(*args, config=cfg)
        torch.testing.assert_close(m_, base_m, rtol=1e-5, atol=1e-6, msg=f"mixes with {cfg}")
        torch.testing.assert_close(r_, base_r, rtol=1e-6, atol=0, msg=f"rstd with {cfg}")
    base_dx, base_dfn = _norm_bwd(g, d["residual"], d["fn"], d["norm_weight"], mixes, rstd,
                                       config=NORM_BWD_CONFIGS[0])
    for cfg in NORM_BWD_CONFIGS[1:] + [BWD_SPLIT, None]:
        dx, dfn = _norm_bwd(g, d["residual"], d["fn"], d["norm_weight"], mixes, rstd, config=cfg)
        # bf16: one ulp apart at most (the float32 values differ only by summation order)
        torch.testing.assert_close(dx.float(), base_dx.float(), rtol=2 ** -7, atol=1e-5, msg=f"d_residual {cfg}")
        torch.testing.assert_close(dfn, base_dfn, rtol=1e-5, atol=1e-5, msg=f"d_fn_eff with {cfg}")


def test_norm_fn_deterministic_and_tight():
    """Bitwise run-to-run determinism (no atomics), and float32 values within a few ulp of float64."""
    d, g, mixes, rstd = _norm_bwd_case(37, 2, 64, torch.float32, True, seed=9)
    args = (d["residual"], d["fn"], d["norm_weight"], d["norm_eps"])
    a = _norm_fwd(*args, config=FWD_SPLIT)
    b = _norm_fwd(*args, config=FWD_SPLIT)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    a = _norm_bwd(g, d["residual"], d["fn"], d["norm_weight"], mixes, rstd, config=BWD_SPLIT)
    b = _norm_bwd(g, d["residual"], d["fn"], d["norm_weight"], mixes, rstd, config=BWD_SPLIT)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    exp = oracle.norm_fn(d["residual"], d["fn"], d["norm_weight"], d["norm_eps"])
    got = oracle.f64(_norm_fwd(*args)[0])
    assert np.abs(got - exp).max() <= 1e-6 * np.abs(exp).max()


def test_norm_fn_bad_configs_raise():
    d = _norm_inputs(5, 2, 33, torch.bfloat16, False)
    args = (d["residual"], d["fn"], None, 1e-6)
    good = dict(FWD_SPLIT)
    for bad, what in [(dict(good, block_K=24), "power of two"), (dict(good, block_T=8), "power of two"),
                      (dict(good, precision="tf32"), "precision"), ({"block_T": 16}, "missing"),
                      (dict(good, split_K=0), "split_K"), (dict(good, extra=1), "unknown")]:
        with pytest.raises(ValueError, match=what):
            _norm_fwd(*args, config=bad)
    mixes, rstd = ref.norm_fn_fwd(*args)
    with pytest.raises(ValueError, match="block_C"):
        _norm_bwd(torch.zeros_like(mixes), d["residual"], d["fn"], None, mixes, rstd,
                       config=dict(BWD_SPLIT, block_C=48))
    with pytest.raises(ValueError, match="together"):
        _norm_bwd(torch.zeros_like(mixes), d["residual"], d["fn"], None, mixes, rstd,
                       apply_grad=d["residual"][:, 0])


def test_norm_fn_config_space_and_default():
    from types import SimpleNamespace
    for n, C, T in [(4, 4096, 4096), (8, 7168, 16), (1, 1, 1), (2, 33, 100000)]:
        call = SimpleNamespace(T=T, n=n, C=C, dtype=torch.bfloat16, device=torch.device("cuda"))
        for space, default, keys in [(nf.norm_fn_config_space, nf.norm_fn_default_config, nf._FWD_KEYS),
                                     (nf.norm_fn_bwd_config_space, nf.norm_fn_bwd_default_config, nf._BWD_KEYS)]:
            pts = space(call)
            assert pts and all(set(p) == set(keys) for p in pts)
            assert set(default(call)) == set(keys)
    # small T splits K, large T does not
    small = SimpleNamespace(T=16, n=4, C=4096, dtype=torch.bfloat16, device=torch.device("cuda"))
    large = SimpleNamespace(T=65536, n=4, C=4096, dtype=torch.bfloat16, device=torch.device("cuda"))
    assert nf.norm_fn_default_config(small)["split_K"] > 1 and nf.norm_fn_default_config(large)["split_K"] == 1


# -- split_mixes and sinkhorn --------------------------------------------------------------------------------
SK_CFG = dict(block_T=64, num_warps=4)
SK_SMALL = dict(block_T=8, num_warps=1)   # several programs: the d_scale / d_base partials are summed


def _split_inputs(T, n, consts, seed=0):
    d = cases.make_inputs("split_mixes", (T,), n, 1, torch.float32, consts=consts, seed=seed)
    return {k: _to(v) if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def _split_grads(T, n, seed):
    gen = _gen(seed)
    return (torch.randn((T, n), generator=gen, dtype=F64).float().to(DEVICE),
            torch.randn((T, n), generator=gen, dtype=F64).float().to(DEVICE),
            torch.randn((T, n, n), generator=gen, dtype=F64).float().to(DEVICE))


SPLIT_CASES = [(n, T, iters) for n in (1, 2, 4, 8) for (T, iters) in ((37, 20), (5, 1))]


@pytest.mark.parametrize("n,T,iters", SPLIT_CASES + [(4, 1, 3), (8, 0, 20)],
                         ids=[f"n{n}-T{T}-I{i}" for n, T, i in SPLIT_CASES + [(4, 1, 3), (8, 0, 20)]])
def test_split_mixes_fwd_bwd(n, T, iters):
    consts = dict(cases.LOUD_CONSTS, sinkhorn_iters=iters) if iters == 3 else dict(sinkhorn_iters=iters)
    d = _split_inputs(T, n, consts)
    c = {k: d[k] for k in ("pre_eps", "post_mult", "sinkhorn_iters", "sinkhorn_eps")}
    exp = oracle.split_mixes(d["mixes"], d["scale"], d["base"], **c)
    naive = ref.split_mixes_fwd(d["mixes"].cpu(), d["scale"].cpu(), d["base"].cpu(), *c.values())
    gp, gq, gc = _split_grads(T, n, seed=11)
    bargs = (d["post_mult"], d["sinkhorn_iters"], d["sinkhorn_eps"])
    exp_b = ref.split_mixes_bwd(_d64(gp), _d64(gq), _d64(gc), _d64(d["mixes"]), _d64(d["scale"]), _d64(d["base"]),
                                *bargs)
    naive_b = ref.split_mixes_bwd(gp.cpu(), gq.cpu(), gc.cpu(), d["mixes"].cpu(), d["scale"].cpu(),
                                  d["base"].cpu(), *bargs)
    for cfg in (None, SK_SMALL):
        outs = _split_fwd(d["mixes"], d["scale"], d["base"], *c.values(), config=cfg)
        for name, o, e, nv in zip(("pre", "post", "comb"), outs, exp, naive):
            _ok(f"{name}[{cfg}]", o, e, naive=nv)
        grads = _split_bwd(gp, gq, gc, d["mixes"], d["scale"], d["base"], *bargs, config=cfg)
        for name, o, e, nv in zip(("d_mixes", "d_scale", "d_base"), grads, exp_b, naive_b):
            assert o.shape == e.shape
            _ok(f"{name}[{cfg}]", o, e, naive=nv)


@pytest.mark.parametrize("n,T,iters", [(1, 5, 20), (2, 37, 1), (4, 37, 20), (8, 37, 20), (8, 1, 2), (4, 0, 20)])
def test_sinkhorn_fwd_bwd(n, T, iters):
    gen = _gen(n * 100 + T)
    logits = (torch.randn((T, n, n), generator=gen, dtype=F64) * 1.5).float().to(DEVICE)
    grad = torch.randn((T, n, n), generator=gen, dtype=F64).float().to(DEVICE)
    exp_b = ref.sinkhorn_bwd(_d64(grad), _d64(logits), iters, 1e-6)
    naive_b = ref.sinkhorn_bwd(grad.cpu(), logits.cpu(), iters, 1e-6)
    for cfg in (None, SK_SMALL):
        _ok(f"sinkhorn[{cfg}]", _sk_fwd(logits, iters, 1e-6, config=cfg), oracle.sinkhorn(logits, iters, 1e-6),
            naive=ref.sinkhorn_fwd(logits.cpu(), iters, 1e-6))
        _ok(f"sinkhorn_bwd[{cfg}]", _sk_bwd(grad, logits, iters, 1e-6, config=cfg), exp_b, naive=naive_b)


def test_sinkhorn_peaked_logits_tight():
    """Strongly peaked logits (rows not converged at 20 rounds): the defined result, to float32 accuracy."""
    gen = _gen(3)
    logits = (torch.randn((37, 4, 4), generator=gen, dtype=F64) * 12).float().to(DEVICE)
    got = oracle.f64(_sk_fwd(logits, 20, 1e-6, config=SK_CFG))
    exp = oracle.sinkhorn(logits, 20, 1e-6)
    assert np.abs(got - exp).max() < 2e-6
    assert np.abs(exp.sum(-1) - 1).max() > 1e-3  # premise: not converged
    grad = torch.randn((37, 4, 4), generator=gen, dtype=F64).float().to(DEVICE)
    d = oracle.f64(_sk_bwd(grad, logits, 20, 1e-6, config=SK_CFG))
    e = ref.sinkhorn_bwd(_d64(grad), _d64(logits), 20, 1e-6).numpy()
    assert np.abs(d - e).max() <= 1e-4 * np.abs(e).max()


def test_split_mixes_configs_agree_and_deterministic():
    d = _split_inputs(37, 4, {})
    gp, gq, gc = _split_grads(37, 4, seed=2)
    args = (gp, gq, gc, d["mixes"], d["scale"], d["base"], 2.0, 20, 1e-6)
    base = _split_bwd(*args, config=SK_CFG)
    assert all(torch.equal(a, b) for a, b in zip(base, _split_bwd(*args, config=SK_CFG)))
    for cfg in (dict(block_T=16, num_warps=2), dict(block_T=128, num_warps=8), SK_SMALL):
        for a, b in zip(_split_bwd(*args, config=cfg), base):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        fa = _split_fwd(d["mixes"], d["scale"], d["base"], 1e-6, 2.0, 20, 1e-6, config=cfg)
        fb = _split_fwd(d["mixes"], d["scale"], d["base"], 1e-6, 2.0, 20, 1e-6, config=SK_CFG)
        assert all(torch.equal(a, b) for a, b in zip(fa, fb))  # per-token math: no order dependence


def test_sinkhorn_bad_configs_raise():
    logits = torch.zeros((3, 4, 4), device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        _sk_fwd(logits, 3, 1e-6, config=dict(block_T=12, num_warps=4))
    with pytest.raises(ValueError, match="missing"):
        _sk_bwd(logits, logits, 3, 1e-6, config=dict(block_T=16))
    with pytest.raises(ValueError, match="n must be"):
        _sk_fwd(torch.zeros((3, 3, 3), device=DEVICE), 3, 1e-6)


# -- ahead-of-time specs -----------------------------------------------------------------------------------------
def _params(fn):
    import inspect
    return list(inspect.signature(getattr(fn, "fn", fn)).parameters)


@pytest.mark.parametrize("mod", [nf, sk], ids=["norm_fn", "sinkhorn"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_aot_specs_are_complete(mod, n):
    specs = mod.aot_specs(n, 4096, torch.bfloat16)
    assert specs
    for s in specs:
        assert isinstance(s, common.AotSpec)
        params = _params(s.fn)
        assert list(s.signature) == params, s.name
        const = [p for p, ty in s.signature.items() if ty == "constexpr"]
        assert sorted(const) == sorted(s.constexprs), s.name
        assert all(ty == "constexpr" or ty in ("i32", "fp32") or ty.startswith("*") for ty in s.signature.values())


_COMPILE = textwrap.dedent("""
    import os, sys, torch, triton
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from mhc_kernels.triton_src import aot, norm_fn, single_pass, sinkhorn
    from mhc_kernels import ptxas
    for mod, name, n in ((norm_fn, "norm_fn_bwd_site", 4), (sinkhorn, "split_mixes_bwd", 4),
                         (single_pass, "sp_project_post", 8), (single_pass, "pre_tail_norm", 8)):
        spec = [s for s in mod.aot_specs(n, 4096, torch.bfloat16) if s.name == name][0]
        for cc, arch in ((80, "sm_80"), (90, "sm_90a"), (100, "sm_100a")):
            opts = dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
            ptx = aot.ptx_version_for(cc)  # what the PATH ptxas accepts (CUDA 13.0: PTX <= 9.0; older: less)
            if ptx is not None:
                opts["ptx_version"] = ptx
            k = triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs),
                               target=GPUTarget("cuda", cc, 32), options=opts)
            res = ptxas.resources(k.asm["ptx"], arch)
            print(name, arch, [(r.registers, r.spills) for r in res])
            assert res and all(r.spills == 0 for r in res), (name, arch, res)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="AOT compile check runs on Linux")
def test_aot_specs_compile_without_spills():
    from mhc_kernels import ptxas
    if ptxas.ptxas_path() is None:
        pytest.skip("ptxas is not on PATH")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
