"""Triton kernels of the streaming mix ops (``triton_src/mix.py``) against the float64 oracle.

Forward outputs are compared with the NumPy float64 oracle and backward outputs with the
explicit PyTorch reference backward evaluated in float64, using the shared tolerances of
``mhc_kernels.reference.cases`` (the working-precision reference supplies the slack for
ill-conditioned sums). Runs under Triton's interpreter on CPU, so shapes are small but
awkward: n in {1, 2, 4, 8}, C in {1, 33, 64, 200}, T in {0, 1, 5, 37}, bf16/fp16/fp32 as a
covering set. Every output the wrappers allocate is poisoned with NaN first, so an element
a kernel forgets to write shows up as a non-finite value.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'mhc-kernels[triton]')")

from op_samples import resolved_config  # noqa: E402

from mhc_kernels.reference import cases, oracle, torch_ref  # noqa: E402
from mhc_kernels.triton_src import common, mix  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (n, C, T, dtype): every n, C, T and dtype appears, in different combinations.
SHAPES = [
    (1, 1, 5, FP32),
    (1, 200, 37, BF16),
    (2, 33, 37, BF16),
    (2, 64, 1, FP16),
    (4, 64, 5, BF16),
    (4, 200, 1, FP32),
    (8, 33, 5, FP16),
    (8, 200, 5, BF16),
    (8, 1, 37, FP32),
    (4, 200, 37, BF16),
    (4, 33, 0, BF16),
    (2, 1, 0, FP16),
]
IDS = [f"n{n}-C{C}-T{T}-{str(d)[6:]}" for n, C, T, d in SHAPES]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every wrapper-allocated output starts as NaN (integers: never used here)."""
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mix, "_new_output", poisoned)


class _Call:
    """The fields of mhc_kernels.validation.Call that the config functions read."""

    def __init__(self, T, n, C, dtype):
        self.T, self.n, self.C, self.dtype, self.device = T, n, C, dtype, torch.device("cpu")


def _cfg(op, *args):
    return resolved_config("triton", op, *args)


def _check(name, got, expected, naive, dtype=None):
    r = cases.compare(name, got, expected, dtype=dtype, naive=naive)
    assert r.ok, f"{name}: ratio {r.worst_ratio:.3g} ({r.detail})"


def _f64(t):
    return t.to(torch.float64)


def _grad_like(t, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)


# -- pre_apply_mix ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n,C,T,dtype", SHAPES, ids=IDS)
def test_pre_apply_mix(n, C, T, dtype):
    d = cases.make_inputs("pre_apply_mix", (T,), n, C, dtype)
    x, w = d["residual"], d["pre_mix"]
    out = mix.pre_apply_mix_fwd(x, w, config=_cfg("pre_apply_mix", x, w))
    assert out.shape == (T, C) and out.dtype == dtype
    _check("layer_input", out, oracle.pre_apply_mix(x, w), torch_ref.pre_apply_mix_fwd(x, w))

    g = _grad_like(out)
    d_x, d_w = mix.pre_apply_mix_bwd(g, x, w, config=_cfg("pre_apply_mix_bwd", g, x, w))
    exp = torch_ref.pre_apply_mix_bwd(_f64(g), _f64(x), _f64(w))
    naive = torch_ref.pre_apply_mix_bwd(g, x, w)
    assert d_x.dtype == dtype and d_w.dtype == torch.float32
    _check("d_residual", d_x, exp[0], naive[0])
    _check("d_pre_mix", d_w, exp[1], naive[1])


# -- post --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,C,T,dtype", SHAPES, ids=IDS)
def test_post(n, C, T, dtype):
    d = cases.make_inputs("post", (T,), n, C, dtype)
    args = (d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"])
    out = mix.post_fwd(*args, config=_cfg("post", *args))
    assert out.shape == (T, n, C) and out.dtype == dtype
    _check("new_residual", out, oracle.post(*args), torch_ref.post_fwd(*args))

    g = _grad_like(out)
    got = mix.post_bwd(g, *args, config=_cfg("post_bwd", g, *args))
    exp = torch_ref.post_bwd(_f64(g), *map(_f64, args))
    naive = torch_ref.post_bwd(g, *args)
    for name, a, e, nv in zip(("d_layer_output", "d_residual", "d_post_mix", "d_comb_mix"), got, exp, naive):
        assert a.shape == e.shape and a.dtype == nv.dtype, name
        _check(name, a, e, nv)


# -- expand ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,C,T,dtype", SHAPES, ids=IDS)
def test_expand(n, C, T, dtype):
    h = cases.make_inputs("expand", (T,), n, C, dtype)["hidden"]
    out = mix.expand_fwd(h, n, config=_cfg("expand", h, n))
    assert out.shape == (T, n, C) and out.dtype == dtype
    assert torch.equal(out, h.unsqueeze(1).expand(T, n, C))  # a copy is exact

    g = _grad_like(out)
    d_h = mix.expand_bwd(g, config=_cfg("expand_bwd", g))
    assert d_h.shape == (T, C) and d_h.dtype == dtype
    _check("d_hidden", d_h, _f64(g).sum(1), torch_ref.expand_bwd(g))


def test_expand_does_not_alias_its_input():
    h = torch.randn(3, 40)
    for n in (1, 4):
        out = mix.expand_fwd(h, n, config=_cfg("expand", h, n))
        assert out.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
        out.zero_()
        assert h.abs().sum() > 0


# -- configs -----------------------------------------------------------------------------------------
def _agree(name, a, b, exact):
    if exact:
        assert torch.equal(a, b), f"{name}: differs from the default config"
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _pick(space, **want):
    for cfg in space:
        if all(cfg.get(k) == v for k, v in want.items()):
            return cfg
    raise AssertionError(f"no config with {want} in the space")


@pytest.mark.parametrize("n", [2, 8])
def test_non_default_configs_agree_with_default(n):
    """Several token/C blocks (and C splits for the backward): forwards bitwise equal, sums to rounding."""
    T, C, dtype = 5, 200, FP32
    call = _Call(T, n, C, dtype)
    d = cases.make_inputs("post", (T,), n, C, dtype)
    y, x, p, cm = d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"]
    g = _grad_like(x)
    gy = _grad_like(y)
    small = dict(block_C=64, num_warps=2)

    fwd_cases = [
        ("pre_apply_mix", lambda cfg: mix.pre_apply_mix_fwd(x, p, config=cfg)),
        ("post", lambda cfg: mix.post_fwd(y, x, p, cm, config=cfg)),
        ("expand", lambda cfg: mix.expand_fwd(y, n, config=cfg)),
        ("expand_bwd", lambda cfg: mix.expand_bwd(g, config=cfg)),
    ]
    for name, f in fwd_cases:
        ref = f(mix.default_config(name, call))
        space = mix.config_space(name, call)
        for cfg in (_pick(space, block_T=4, **small), _pick(space, block_T=1, block_C=128)):
            _agree(f"{name} {cfg}", f(cfg), ref, exact=True)

    bwd_cases = [
        ("pre_apply_mix_bwd", lambda cfg: mix.pre_apply_mix_bwd(gy, x, p, config=cfg)),
        ("post_bwd", lambda cfg: mix.post_bwd(g, y, x, p, cm, config=cfg)),
    ]
    for name, f in bwd_cases:
        ref = f(mix.default_config(name, call))
        configs = [dict(block_T=2, block_C=64, split_C=1, num_warps=2, num_stages=1),
                   dict(block_T=4, block_C=64, split_C=3, num_warps=4, num_stages=2)]
        configs.append(_pick(mix.config_space(name, call), block_T=1))
        for cfg in configs:
            for k, (a, b) in enumerate(zip(f(cfg), ref)):
                # full-size gradients do not reduce over C: bitwise equal; the mix gradients are sums
                _agree(f"{name}[{k}] {cfg}", a, b, exact=a.shape[-1] == C)


def test_config_functions_and_defaults():
    for T, n, C in [(1, 4, 4096), (4096, 4, 4096), (37, 8, 33), (0, 1, 1), (5, 3, 7168)]:
        call = _Call(T, n, C, BF16)
        for op in ("pre_apply_mix", "pre_apply_mix_bwd", "post", "post_bwd", "expand", "expand_bwd"):
            default = mix.default_config(op, call)
            space = mix.config_space(op, call)
            assert default in space, (op, T, n, C)
            for cfg in space:
                for k in ("block_T", "block_C"):
                    assert cfg[k] >= 1 and cfg[k] & (cfg[k] - 1) == 0
                assert {"num_warps", "num_stages"} <= set(cfg)
                if op in ("pre_apply_mix_bwd", "post_bwd"):
                    assert cfg["split_C"] >= 1
    # few tokens: the backward splits C so that the GPU has enough programs
    assert mix.default_config("post_bwd", _Call(1, 4, 4096, BF16))["split_C"] > 1
    assert mix.default_config("post_bwd", _Call(4096, 4, 4096, BF16))["split_C"] == 1
    with pytest.raises(ValueError, match="power of two"):
        mix.pre_apply_mix_fwd(torch.randn(2, 2, 8), torch.rand(2, 2),
                              config=dict(block_T=3, block_C=16, num_warps=1, num_stages=1))


def test_backward_is_deterministic_with_split_c():
    T, n, C = 3, 4, 200
    d = cases.make_inputs("post", (T,), n, C, BF16)
    args = (d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"])
    g = _grad_like(d["residual"])
    cfg = dict(block_T=1, block_C=64, split_C=4, num_warps=4, num_stages=2)
    first, second = mix.post_bwd(g, *args, config=cfg), mix.post_bwd(g, *args, config=cfg)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_n_above_limit_is_refused_by_supports_call():
    assert common.supports_call(_Call(4, 16, 64, BF16)) is not None
    assert common.supports_call(_Call(4, 8, 64, BF16)) is None


def test_aot_specs_cover_every_kernel():
    specs = mix.aot_specs(4, 1280, BF16)
    kernels = {v for k, v in vars(mix).items() if k.endswith("_kernel")}
    assert {s.fn for s in specs} == kernels
    for s in specs:
        names = getattr(s.fn, "arg_names", None)
        assert set(s.signature) == set(names), s.name
        assert all(s.signature[k] == "constexpr" for k in s.constexprs)
        assert s.config["num_warps"] == s.num_warps
