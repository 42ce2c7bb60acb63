"""Sample arguments (schema order) for every ``torch.ops.mhc`` op, forward and backward.

Backward ops get the tensors their forward would have saved, produced by running the
forward op, so the samples are consistent. Shared by the opcheck and backend tests.
"""

import torch

from mhc_kernels.reference import cases

C_PRE = cases.DEFAULT_CONSTS


def _pre_consts(c):
    return (c["pre_eps"], c["post_mult"], c["sinkhorn_iters"], c["sinkhorn_eps"])


def op_args(name, lead=(3,), n=2, C=5, dtype=torch.float32, norm_weight=True, device="cpu", consts=None):
    """Arguments for ``torch.ops.mhc.<name>`` in schema order."""
    c = dict(C_PRE)
    c.update(consts or {})
    md = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(7)

    def rnd(*shape, dt=md):
        return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype=dt, device=device)

    pre = cases.make_inputs("mhc_pre", lead, n, C, dtype, device, norm_weight=norm_weight, consts=consts)
    x, fn, scale, base, nw = pre["residual"], pre["fn"], pre["scale"], pre["base"], pre["norm_weight"]
    m = n * (n + 2)
    post = cases.make_inputs("post", lead, n, C, dtype, device)
    y, post_mix, comb_mix = post["layer_output"], post["post_mix"], post["comb_mix"]
    head = cases.make_inputs("mhc_head", lead, n, C, dtype, device, norm_weight=norm_weight)
    mixes = rnd(*lead, m)
    logits = rnd(*lead, n, n)
    pc = _pre_consts(c)
    if name == "norm_fn":
        return (x, fn, nw, c["norm_eps"])
    if name == "norm_fn_bwd":
        mx, rstd = torch.ops.mhc.norm_fn(x, fn, nw, c["norm_eps"])
        return (rnd(*lead, m), x, fn, nw, mx, rstd)
    if name == "split_mixes":
        return (mixes, scale, base) + pc
    if name == "split_mixes_bwd":
        return (rnd(*lead, n), rnd(*lead, n), rnd(*lead, n, n), mixes, scale, base) + pc[1:]
    if name == "sinkhorn":
        return (logits, c["sinkhorn_iters"], c["sinkhorn_eps"])
    if name == "sinkhorn_bwd":
        return (rnd(*lead, n, n), logits, c["sinkhorn_iters"], c["sinkhorn_eps"])
    if name == "pre_apply_mix":
        return (x, post_mix)
    if name == "pre_apply_mix_bwd":
        return (rnd(*lead, C, dt=dtype), x, post_mix)
    if name == "post":
        return (y, x, post_mix, comb_mix)
    if name == "post_bwd":
        return (rnd(*lead, n, C, dt=dtype), y, x, post_mix, comb_mix)
    if name == "mhc_pre":
        return (x, fn, scale, base, nw, c["norm_eps"]) + pc
    if name == "mhc_pre_bwd":
        _, _, _, mx, rstd = torch.ops.mhc.mhc_pre(x, fn, scale, base, nw, c["norm_eps"], *pc)
        return (rnd(*lead, C, dt=dtype), rnd(*lead, n), rnd(*lead, n, n), x, fn, scale, base, nw, mx, rstd,
                rnd(*lead, n, C, dt=dtype)) + pc
    if name == "expand":
        return (y, n)
    if name == "expand_bwd":
        return (rnd(*lead, n, C, dt=dtype),)
    if name == "mhc_head":
        return (head["residual"], head["fn"], head["scale"], head["base"], head["norm_weight"], c["norm_eps"],
                c["pre_eps"])
    if name == "mhc_head_bwd":
        args = op_args("mhc_head", lead, n, C, dtype, norm_weight, device, consts)
        _, mx, rstd = torch.ops.mhc.mhc_head(*args)
        return (rnd(*lead, C, dt=dtype),) + args[:5] + (mx, rstd, c["pre_eps"])
    if name == "post_pre":
        return (y, x, post_mix, comb_mix, fn, scale, base, nw, c["norm_eps"]) + pc
    raise KeyError(name)
