"""Checks of the TileLang backend's kernel-level paths, shared by the GPU tests and the CPU-emulated tests.

Each takes the device (``"cuda"``, or ``"cpu"`` under ``MHC_TILELANG_EMULATE=1``) and the shape, so
the GPU file runs them at production sizes and the emulated file at sizes CPU threads can afford.
"""

import torch
from op_samples import resolved_config

import mhc_kernels as mk
from mhc_kernels.reference import cases, torch_ref

PRE_CONSTS = ("norm_eps", "pre_eps", "post_mult", "sinkhorn_iters", "sinkhorn_eps")
PRE_PARAMS = ("fn", "scale", "base", "norm_weight", "out_norm_weight")
PRE_ARGS = ("residual",) + PRE_PARAMS + PRE_CONSTS + ("out_norm_eps", "fp8_group")
POST_PRE_ARGS = ("layer_output", "residual", "post_mix", "comb_mix") + PRE_ARGS[1:]


def fused_mhc_pre_equals_the_chain(device, n, C, T, splits, dtype, out_norm=False):
    """The fused tail does the chain's arithmetic operation for operation (fused.py's claim): mhc_pre through
    it equals norm_fn -> split_mixes -> pre_apply_mix bit for bit, for the same projection config. With the
    sublayer's norm (``out_norm``: the tail whose CTAs own whole rows, :func:`fused._build_pre_norm_tail`) every
    output is bit for bit the chain's with the collapse-norm kernel (norm_fn -> split_mixes -> collapse_norm) and
    the three-launch path it replaced (the single-pass tail's Sinkhorn warp, then collapse_norm); the layer input
    is the chain's collapse normalised in torch to one rounding step (the norm's sum of squares runs in the
    kernel's lane order)."""
    from mhc_kernels import composite
    from mhc_kernels.tilelang_src import fused as fused_mod
    from mhc_kernels.tilelang_src import mixes, norm, streaming

    inputs = cases.make_inputs("mhc_pre", (T,), n, C, dtype, device, norm_weight=True)
    w = inputs["out_norm_weight"] if out_norm else None
    x, fn, nw, scale, base = (inputs[k] for k in ("residual", "fn", "norm_weight", "scale", "base"))
    consts = [inputs[k] for k in PRE_CONSTS]
    cfg = fused_mod.default_config("mhc_pre", norm.Shape(T, n, C, dtype))
    cfg["projection"]["split_K"] = splits
    fused = fused_mod.mhc_pre_fwd(x, fn, scale, base, nw, w, *consts, inputs["out_norm_eps"], config=cfg)
    mixes_, rstd = norm.norm_fn_fwd(x, fn, nw, consts[0], config=cfg["projection"])
    pre, post, comb = mixes.split_mixes_fwd(mixes_, scale, base, *consts[1:],
                                            config=resolved_config("tilelang", "split_mixes", mixes_, scale, base,
                                                                   *consts[1:]))
    layer_input = streaming.pre_apply_mix_fwd(x, pre, config=cfg["tail"])
    layer_input, out_rstd = composite.out_norm(layer_input, w, inputs["out_norm_eps"], torch.float32)
    for name, a, b in zip(("post", "comb", "mixes", "rstd"), fused[1:5], (post, comb, mixes_, rstd)):
        assert torch.equal(a, b), f"{name} differs from the chain (max |diff| {(a.float() - b.float()).abs().max()})"
    if w is None:
        assert torch.equal(fused[0], layer_input), "layer_input differs from the chain"
        assert torch.equal(fused[5], out_rstd), "out_rstd is ones without a norm"
        return
    torch.testing.assert_close(fused[0].float(), layer_input.float(), rtol=2 ** -7 if dtype != torch.float32
                               else 1e-5, atol=1e-5, msg="normalised layer_input")
    torch.testing.assert_close(fused[5], out_rstd, rtol=1e-5, atol=0, msg="out_rstd")
    # the chain with the collapse-norm kernel, and the three-launch path: every output bit for bit
    cn = {"collapse_norm": cfg["collapse_norm"]}
    chain = (*streaming.collapse_norm_fwd(x, pre, w, inputs["out_norm_eps"], config=cn), post, comb, mixes_, rstd)
    part_mix, part_sq = norm.norm_fn_partials(x, fn, nw, config=cfg["projection"])
    _, pre_t, post_t, comb_t, mixes_t, rstd_t, _ = fused_mod.mhc_pre_sp_tail(
        part_mix, part_sq, part_sq, scale, base, None, x.new_empty((T, C)), *consts, inputs["out_norm_eps"],
        config=fused_mod.tail_kernel_config(cfg))
    three = (*streaming.collapse_norm_fwd(x, pre_t, w, inputs["out_norm_eps"], config=cn), post_t, comb_t, mixes_t,
             rstd_t)
    names = ("layer_input", "out_rstd", "post", "comb", "mixes", "rstd")
    got = (fused[0], fused[5]) + tuple(fused[1:5])
    for what, want in (("the chain", chain), ("the three-launch path", three)):
        for name, a, b in zip(names, got, want):
            assert torch.equal(a, b), f"{name} differs from {what} (max |diff| {(a.float() - b.float()).abs().max()})"


def fused_post_pre_matches_post_then_mhc_pre(device, n, C, T, splits, mma="fma", out_norm=False):
    """post fused into the projection (mma="fma"; a tensor-core config runs post, then mhc_pre): the new
    residual is post's bit for bit, the rest agrees with post -> mhc_pre to float32 accumulation error. With
    ``out_norm`` the tail is the one that also applies the sublayer's norm (fused_mhc_pre_equals_the_chain checks
    it bit for bit against the chain)."""
    from mhc_kernels.tilelang_src import fused, norm, streaming

    inputs = cases.make_inputs("post_pre", (T,), n, C, torch.bfloat16, device, norm_weight=True)
    if not out_norm:
        inputs["out_norm_weight"] = None
    args = [inputs[k] for k in POST_PRE_ARGS]
    cfg = fused.default_config("post_pre", norm.Shape(T, n, C, torch.bfloat16))
    cfg["projection"].update(split_K=splits, mma=mma)
    if mma != "fma":
        cfg["projection"].update(block_T=32, block_K=128)
    got = fused.post_pre_fwd(*args, config=cfg)
    new_res = streaming.post_fwd(*args[:4], config=cfg["post"])
    want = (new_res,) + fused.mhc_pre_fwd(new_res, *args[4:], config=cfg)
    assert torch.equal(got[0], want[0]), "the new residual is post's, bit for bit"
    # float32 outputs to accumulation error; the bf16 layer input to one rounding step (its float32 value
    # moves by that error too, which can flip the last bit)
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2 ** -7, atol=1e-5, msg="layer_input")
    for name, a, b in zip(("post", "comb", "mixes", "rstd"), got[2:6], want[2:6]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    # out_rstd is the statistic of the rounded collapse u: a last-bit flip of u (above) moves mean(u^2) by up to
    # 2 * 2^-8 relative, so rsqrt of it by up to 2^-8 (without the norm it is exactly 1)
    torch.testing.assert_close(got[6], want[6], rtol=2 ** -8 if out_norm else 0, atol=0, msg="out_rstd")


def norm_fn_split_k_paths_agree(device, T, C, splits):
    from mhc_kernels.tilelang_src import norm

    inputs = cases.make_inputs("norm_fn", (T,), 4, C, torch.bfloat16, device)
    x, fn = inputs["residual"], inputs["fn"]
    ref_m, ref_r = torch_ref.norm_fn_fwd(x, fn, None, 1e-6)
    cfg = dict(norm.default_config("norm_fn", norm.Shape(T, 4, C, torch.bfloat16)), split_K=splits)
    m, r = norm.norm_fn_fwd(x, fn, None, 1e-6, config=cfg)
    torch.testing.assert_close(m, ref_m, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r, ref_r, rtol=1e-5, atol=1e-6)


def configs_in_the_space_are_correct(device, T, C, take):
    """The tuner's candidates (``take`` picks which of each space) run correctly: the streaming kernels and
    mhc_pre's fused tail, against the PyTorch reference."""
    from mhc_kernels.tilelang_src import backend, common

    for op, names in (("post", ("layer_output", "residual", "post_mix", "comb_mix")),
                      ("pre_apply_mix", ("residual", "pre_mix"))):
        inputs = cases.make_inputs(op, (T,), 4, C, torch.bfloat16, device)
        args = [inputs[k] for k in names]
        ref = getattr(torch_ref, f"{op}_fwd")(*args)
        for cfg in take(backend.OPS[op].space(common.Shape(T, 4, C, torch.bfloat16))):
            out = backend.OPS[op].fn(*args, config=cfg)
            torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2, msg=str(cfg))
    inputs = cases.make_inputs("mhc_pre", (T,), 4, C, torch.float32, device, norm_weight=True)
    for w in (None, inputs["out_norm_weight"]):   # the tail's layouts; the tail with the sublayer's norm
        args = [dict(inputs, out_norm_weight=w)[k] for k in PRE_ARGS]
        with mk.use_backend("reference"):
            ref = torch.ops.mhc.mhc_pre(*args)
        for cfg in take(backend.OPS["mhc_pre"].space(common.Shape(T, 4, C, torch.float32))):
            got = backend.OPS["mhc_pre"].fn(*args, config=cfg)
            assert [t.shape for t in got[-2:]] == [t.shape for t in ref[-2:]] == [(T, 0), (T, 0)]  # no FP8 copy
            for a, b in zip(got[:-2], ref[:-2]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=str(cfg))


def copy_kernel(tokens_on_x: bool = True):
    """A small TileLang copy kernel, (T, 128) float32, with its token blocks on blockIdx.x or on .y (the emulator's
    and the AOT records' launch-limit checks)."""
    import tilelang.language as T

    Tn = T.dynamic("T")

    @T.prim_func
    def copy(x: T.Tensor((Tn, 128), "float32"), y: T.Tensor((Tn, 128), "float32")):
        with T.Kernel(*((T.ceildiv(Tn, 4), 2) if tokens_on_x else (2, T.ceildiv(Tn, 4))), threads=64) as (b0, b1):
            bt, bc = (b0, b1) if tokens_on_x else (b1, b0)
            tx = T.get_thread_binding(0)
            for i in T.serial(4):
                if bt * 4 + i < Tn:
                    y[bt * 4 + i, bc * 64 + tx] = x[bt * 4 + i, bc * 64 + tx]

    return copy
