"""Sample arguments (schema order) for every ``torch.ops.mhc`` op, forward and backward, at the test suite's
default small shape: :func:`mhc_kernels.reference.cases.op_args` (the one input recipe) with the optional
tensors present (``norm_weight``, ``mhc_pre_bwd``'s ``grad_residual``), so the optional paths are exercised.
Shared by the opcheck and backend tests.
"""

import torch

from mhc_kernels.reference import cases


def op_args(name, lead=(3,), n=2, C=5, dtype=torch.float32, norm_weight=True, device="cpu", consts=None):
    """Arguments for ``torch.ops.mhc.<name>`` in schema order."""
    return cases.op_args(name, lead, n, C, dtype, device, norm_weight=norm_weight, consts=consts, seed=7,
                         optional=True)


def resolved_config(backend, op, *args):
    """The config the core resolves (``registry.config_for``) when ``backend`` serves ``op`` with ``args``
    (canonical, schema order): what a test passes to a kernel module's launch wrapper it calls directly."""
    from mhc_kernels import registry
    from mhc_kernels.specs import SPECS
    from mhc_kernels.validation import bind

    return registry.config_for(registry.get_kernel(op, backend), bind(SPECS[op], args))


# every (post, collapse, norm) variant of the single-pass kernels once, over awkward shapes, splits and dtypes:
# (n, C, T, splits, dtype, with_post, first, normalize)
SP_FUSED_CASES = [
    (4, 64, 37, 2, torch.bfloat16, False, False, True), (4, 33, 5, 1, torch.float32, False, True, False),
    (8, 16, 9, 4, torch.bfloat16, False, False, False), (1, 7, 1, 1, torch.float16, False, True, True),
    (4, 64, 37, 2, torch.bfloat16, True, False, True), (2, 200, 3, 3, torch.bfloat16, True, True, False),
    (8, 16, 9, 1, torch.float32, True, False, False), (4, 33, 5, 2, torch.float16, True, True, True)]

SP_CONSTS = ("norm_eps", "pre_eps", "post_mult", "sinkhorn_iters", "sinkhorn_eps", "out_norm_eps", "fp8_group")


def run_kernel(backend, op, *args, config=None):
    """``op``'s kernel on ``backend`` called directly with ``args`` (schema order) and ``config`` (default: the
    one the core resolves)."""
    from mhc_kernels import registry

    cfg = resolved_config(backend, op, *args) if config is None else config
    return registry.get_kernel(op, backend).fn(*args, config=cfg)


def fused_single_pass_matches_its_parts(backend, device, n, C, T, splits, dtype, with_post, first, normalize):
    """mhc_pre_sp / post_pre_sp through a backend's one-read kernels against the same backend's primitives run
    one by one (post, pre_apply_mix, norm_fn, split_mixes; the out-norm in torch): the new residual is post's
    bit for bit, and so is the first site's layer input (stream 0); a carried pre's collapse to one rounding
    step (exactly pre_apply_mix's arithmetic on TileLang, bit for bit there), the normalised layer input to
    one rounding step (its statistic is summed in another order), the coefficients to float32 accumulation
    error (the fused projection sums K in column-chunk order). ``splits``: the fused projection's split count."""
    from mhc_kernels import composite

    op = "post_pre_sp" if with_post else "mhc_pre_sp"
    d = cases.make_inputs(op, (T,), n, C, dtype, device, norm_weight=True)
    d["prev_pre"] = None if first else d["prev_pre"]
    d["out_norm_weight"] = d["out_norm_weight"] if normalize else None
    site = [d[k] for k in ("prev_pre", "fn", "scale", "base", "norm_weight", "out_norm_weight")]
    consts = [d[k] for k in SP_CONSTS]
    x = d["residual"]
    post_args = (d["layer_output"], x, d["post_mix"], d["comb_mix"]) if with_post else None
    args = (*post_args, *site, *consts) if with_post else (x, *site, *consts)
    cfg = resolved_config(backend, op, *args)
    cfg["projection"]["split_K"] = splits
    got = run_kernel(backend, op, *args, config=cfg)
    if with_post:
        x = run_kernel(backend, "post", *post_args)
        assert torch.equal(got[0], x), "the new residual is post's, bit for bit"
        got = got[1:]
    u = composite.first_stream(x) if first else run_kernel(backend, "pre_apply_mix", x, d["prev_pre"])
    v, rho = composite.out_norm(u, d["out_norm_weight"], d["out_norm_eps"], torch.float32)
    mixes = run_kernel(backend, "norm_fn", x, d["fn"], d["norm_weight"], d["norm_eps"])
    split = (mixes[0], d["scale"], d["base"], d["pre_eps"], d["post_mult"], d["sinkhorn_iters"], d["sinkhorn_eps"])
    pre, post, comb = run_kernel(backend, "split_mixes", *split)
    step = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}.get(dtype, 1e-5)
    if first and not normalize or (backend == "tilelang" and not normalize):
        assert torch.equal(got[0], v), "the layer input is the collapse's, bit for bit"
    else:
        torch.testing.assert_close(got[0].float(), v.float(), rtol=step, atol=1e-5, msg="layer_input")
    if normalize:
        torch.testing.assert_close(got[6], rho, rtol=1e-5, atol=0, msg="out_rstd")
    else:
        assert torch.equal(got[6], torch.ones_like(got[6])), "out_rstd is 1 without a norm weight"
    for name, a, b in zip(("pre", "post", "comb", "mixes", "rstd"), got[1:6], (pre, post, comb) + tuple(mixes)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
