"""The Triton backend's fused two-launch ``mhc_pre`` and ``post_pre`` (triton_src/single_pass.py) against the
chain of Triton's own primitives (CPU: Triton interpreter).

``mhc_pre``'s main loop is norm_fn's kernel and its tail does the chain's arithmetic operation for operation
(the finalize kernel's split reduction, split_mixes' body, pre_apply_mix's / collapse_norm's collapse), so at
the same projection config every output is the chain's bit for bit, except the layer input normalised by the
sublayer's RMSNorm (one rounding step: its sum of squares may run in another lane order). ``post_pre`` fuses
post into the projection's main loop (column chunks of all streams, the single-pass order): the new residual
is post's bit for bit, mixes and rstd agree with norm_fn to float32 accumulation error, and everything after
the projection is the chain's split_mixes and collapse of those mixes, bit for bit.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("triton")

from op_samples import resolved_config, run_kernel  # noqa: E402

from mhc_kernels.reference import cases  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPLIT_CONSTS = ("pre_eps", "post_mult", "sinkhorn_iters", "sinkhorn_eps")
PRE_ARGS = ("residual", "fn", "scale", "base", "norm_weight", "out_norm_weight", "norm_eps", *SPLIT_CONSTS,
            "out_norm_eps", "fp8_group")

# (n, C, T, dtype, norm_weight, out_norm_weight, projection split): every n, awkward C and T, both dtypes, each
# optional weight, one split and several (mhc_pre's tail then also does the split reduction)
CASES = [
    (1, 7, 1, torch.float32, False, True, 1), (2, 33, 5, torch.bfloat16, True, False, 2),
    (4, 200, 37, torch.bfloat16, True, True, 3), (8, 33, 5, torch.float32, True, True, 1),
    (4, 7, 37, torch.float32, False, False, 2), (2, 200, 1, torch.bfloat16, False, True, 4),
    (8, 7, 1, torch.bfloat16, False, False, 1),
]


def _inputs(op, n, C, T, dtype, nw, onw):
    d = cases.make_inputs(op, (T,), n, C, dtype, DEVICE, norm_weight=True)
    d["norm_weight"] = d["norm_weight"] if nw else None
    d["out_norm_weight"] = d["out_norm_weight"] if onw else None
    return d


def _chain_after_projection(x, mixes, d, tail):
    """The chain's split_mixes and collapse (pre_apply_mix, or collapse_norm with the fused tail's tile) of
    ``mixes`` -> (layer_input, post, comb, out_rstd)."""
    from mhc_kernels.triton_src import mix

    split = (mixes, d["scale"], d["base"], *(d[k] for k in SPLIT_CONSTS))
    pre, post, comb = run_kernel("triton", "split_mixes", *split)
    if d["out_norm_weight"] is None:
        return run_kernel("triton", "pre_apply_mix", x, pre), post, comb, torch.ones_like(mixes[:, 0])
    u, out_rstd = mix.collapse_norm_fwd(x, pre, d["out_norm_weight"], d["out_norm_eps"], config={"collapse_norm": tail})
    return u, post, comb, out_rstd


def _same(name, a, b):
    assert torch.equal(a, b), f"{name} differs from the chain (max |diff| {(a.float() - b.float()).abs().max()})"


def _layer_input(got, want, dtype, normalised):
    if normalised:   # one rounding step, as the other fused-vs-chain checks allow
        step = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}.get(dtype, 1e-5)
        torch.testing.assert_close(got.float(), want.float(), rtol=step, atol=1e-5, msg="normalised layer_input")
    else:
        _same("layer_input", got, want)


@pytest.mark.parametrize("n,C,T,dtype,nw,onw,splits", CASES, ids=str)
def test_fused_mhc_pre_equals_the_chain(n, C, T, dtype, nw, onw, splits):
    d = _inputs("mhc_pre", n, C, T, dtype, nw, onw)
    args = [d[k] for k in PRE_ARGS]
    cfg = copy.deepcopy(resolved_config("triton", "mhc_pre", *args))   # the resolved one is cached: read-only
    cfg["projection"]["split_K"] = splits
    got = run_kernel("triton", "mhc_pre", *args, config=cfg)
    x = d["residual"]
    mixes, rstd = run_kernel("triton", "norm_fn", x, d["fn"], d["norm_weight"], d["norm_eps"],
                             config=cfg["projection"])
    u, post, comb, out_rstd = _chain_after_projection(x, mixes, d, cfg["tail"])
    for name, a, b in zip(("post", "comb", "mixes", "rstd"), got[1:5], (post, comb, mixes, rstd)):
        _same(name, a, b)
    _layer_input(got[0], u, dtype, onw)
    if onw:
        torch.testing.assert_close(got[5], out_rstd, rtol=1e-5, atol=0, msg="out_rstd")
    else:
        _same("out_rstd (ones without a weight)", got[5], out_rstd)


@pytest.mark.parametrize("n,C,T,dtype,nw,onw,splits", CASES, ids=str)
def test_fused_post_pre_is_post_then_the_chain(n, C, T, dtype, nw, onw, splits):
    d = _inputs("post_pre", n, C, T, dtype, nw, onw)
    post_args = [d[k] for k in ("layer_output", "residual", "post_mix", "comb_mix")]
    args = post_args + [d[k] for k in PRE_ARGS[1:]]
    cfg = copy.deepcopy(resolved_config("triton", "post_pre", *args))
    cfg["projection"]["split_K"] = splits
    got = run_kernel("triton", "post_pre", *args, config=cfg)
    x = run_kernel("triton", "post", *post_args)
    _same("new_residual", got[0], x)
    mixes, rstd = run_kernel("triton", "norm_fn", x, d["fn"], d["norm_weight"], d["norm_eps"])
    torch.testing.assert_close(got[4], mixes, rtol=1e-4, atol=1e-5, msg="mixes")
    torch.testing.assert_close(got[5], rstd, rtol=1e-5, atol=0, msg="rstd")
    u, post, comb, out_rstd = _chain_after_projection(x, got[4], d, cfg["tail"])
    _same("post", got[2], post)
    _same("comb", got[3], comb)
    _layer_input(got[1], u, dtype, onw)
    if onw:
        torch.testing.assert_close(got[6], out_rstd, rtol=1e-5, atol=0, msg="out_rstd")
    else:
        _same("out_rstd (ones without a weight)", got[6], out_rstd)


def test_boundary_configs_are_checked_with_specific_errors():
    from mhc_kernels.triton_src import single_pass

    d = _inputs("mhc_pre", 4, 33, 5, torch.bfloat16, True, True)
    args = [d[k] for k in PRE_ARGS]
    cfg = resolved_config("triton", "mhc_pre", *args)
    with pytest.raises(ValueError, match=r"exactly the parts \['projection', 'tail'\]"):
        run_kernel("triton", "mhc_pre", *args, config=dict(cfg, split_mixes={"block_T": 64, "num_warps": 4}))
    with pytest.raises(ValueError, match=r"config\['tail'\]\['block_C'\] must be a power of two"):
        run_kernel("triton", "mhc_pre", *args, config=dict(cfg, tail=dict(cfg["tail"], block_C=48)))
    # a stale stored entry (the parts before the tail existed) is refused by the registry's check, not run
    assert "projection" in single_pass.check_config("post_pre_sp", None, {"projection": {}, "split_mixes": {}})
    assert single_pass.check_config("mhc_pre", None, cfg) is None


SP_TAIL_CASES = [(4, 64, 37, 2, torch.bfloat16, True, False, True), (2, 200, 3, 3, torch.bfloat16, False, True, False),
                 (8, 16, 9, 1, torch.float32, True, False, False)]


@pytest.mark.parametrize("n,C,T,splits,dtype,with_post,first,normalize", SP_TAIL_CASES, ids=str)
def test_single_pass_tail_is_the_finalize_and_split_mixes_kernels(n, C, T, splits, dtype, with_post, first,
                                                                   normalize):
    """The single-pass boundary's second launch does the former second and third ones' arithmetic (the finalize
    kernel, the split_mixes kernel) bit for bit, from the same main loop's partials."""
    from op_samples import SP_CONSTS

    from mhc_kernels.triton_src import norm_fn, single_pass, sinkhorn

    op = "post_pre_sp" if with_post else "mhc_pre_sp"
    d = cases.make_inputs(op, (T,), n, C, dtype, DEVICE, norm_weight=True)
    d["prev_pre"] = None if first else d["prev_pre"]
    d["out_norm_weight"] = d["out_norm_weight"] if normalize else None
    site = [d[k] for k in ("prev_pre", "fn", "scale", "base", "norm_weight", "out_norm_weight")]
    consts = [d[k] for k in SP_CONSTS]
    x = d["residual"]
    post = (d["layer_output"], d["post_mix"], d["comb_mix"]) if with_post else None
    args = (post[0], x, *post[1:], *site, *consts) if with_post else (x, *site, *consts)
    cfg = copy.deepcopy(resolved_config("triton", op, *args))
    cfg["projection"]["split_K"] = splits
    got = run_kernel("triton", op, *args, config=cfg)[1 if with_post else 0:]
    pr = single_pass._sp_project(x, d["prev_pre"], d["fn"], d["norm_weight"], cfg["projection"], post=post)
    rows = d["fn"].shape[0]
    mixes, rstd = torch.empty((T, rows), device=DEVICE), torch.empty((T,), device=DEVICE)
    norm_fn._norm_fn_finalize_kernel[(T,)](pr.part_dot, pr.part_sq, mixes, rstd, T, n * C, rows, d["norm_eps"],
                                           ROWS_P=pr.rows_p, BLOCK_T=1, SPLIT_K=pr.split)
    split = (mixes, d["scale"], d["base"], *(d[k] for k in SPLIT_CONSTS))
    pre, post_mix, comb = sinkhorn.split_mixes_fwd(*split, config={"block_T": 16, "num_warps": 4})
    for name, a, b in zip(("pre", "post", "comb", "mixes", "rstd"), got[1:6], (pre, post_mix, comb, mixes, rstd)):
        _same(name, a, b)
    if not normalize:
        _same("layer_input (the main loop's collapse)", got[0], pr.u)
