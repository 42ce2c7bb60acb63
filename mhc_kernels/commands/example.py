"""``mhc-kernels example``: one mHC site (pre -> MLP -> post), forward and backward, checked.

Runs on the default device (CUDA if present, else CPU), reports which backend served
each op, the time of the forward and backward, and the largest error of the outputs
and parameter gradients against autograd through the float64 transcription.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table

import mhc_kernels as mk
from mhc_kernels import registry
from mhc_kernels.commands import device_for, positive
from mhc_kernels.reference import cases, transcription
from mhc_kernels.specs import DTYPES_BY_NAME

REL_LIMIT = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}


def _sublayer(p, li):
    """A small MLP standing in for attention/FFN. It computes in float32 (CPU bf16 GEMMs are
    slow and would hide the cost of the mHC ops) and hands back the layer-input dtype."""
    w1, w2 = p["w1"].to(torch.float32), p["w2"].to(torch.float32)
    h = torch.nn.functional.gelu(li.to(torch.float32) @ w1) @ w2
    return h.to(li.dtype)


def _site(p, x, *, impl):
    li, post_mix, comb_mix = impl.mhc_pre(x, p["fn"], p["scale"], p["base"], norm_weight=p["norm_weight"])
    return impl.mhc_post(_sublayer(p, li), x, post_mix, comb_mix)


class _Transcription:
    """The same call signature as mhc_kernels, backed by the plain transcription."""

    mhc_pre = staticmethod(lambda x, fn, s, b, norm_weight=None: transcription.mhc_pre(x, fn, s, b, norm_weight))
    mhc_post = staticmethod(transcription.post)


def run(args) -> int:
    con = Console()
    device = device_for("example", args.device)
    dtype = DTYPES_BY_NAME[args.dtype]
    T, n, C = args.tokens, args.n, args.hidden
    positive("example", tokens=T, n=n, hidden=C)
    d = cases.make_inputs("mhc_pre", (T,), n, C, dtype, device, norm_weight=True)
    g = torch.Generator().manual_seed(1)
    params = {k: d[k] for k in ("fn", "scale", "base", "norm_weight")}
    params["w1"] = (torch.randn(C, 2 * C, generator=g) / C ** 0.5).to(device)
    params["w2"] = (torch.randn(2 * C, C, generator=g) / (2 * C) ** 0.5).to(device)
    x = d["residual"]

    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    xl = x.detach().clone().requires_grad_()
    times = {"forward": [], "backward": []}
    for _ in range(args.repeats):
        for v in list(leaves.values()) + [xl]:
            v.grad = None
        t0 = time.perf_counter()
        out = _site(leaves, xl, impl=mk)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times["forward"].append(t1 - t0)
        times["backward"].append(time.perf_counter() - t1)

    # float64 gradient oracle
    ref = {k: v.detach().double().cpu().requires_grad_() for k, v in params.items()}
    xr = x.detach().double().cpu().requires_grad_()
    ref_out = _site(ref, xr, impl=_Transcription)
    ref_out.square().mean().backward()

    which = {op: registry.which_backend(op, *args_) for op, args_ in (
        ("mhc_pre", (x, params["fn"], params["scale"], params["base"], params["norm_weight"])),   # defaults after
        ("post", (x[:, 0], x, torch.rand(T, n, device=device), torch.rand(T, n, n, device=device))))}

    tab = Table(title=f"one mHC site on {device}: T={T}, n={n}, C={C}, {args.dtype}")
    for col in ("quantity", "value"):
        tab.add_column(col)
    tab.add_row("backends", ", ".join(f"{k}: {v}" for k, v in which.items()))
    med = lambda xs: sorted(xs)[len(xs) // 2] * 1e3  # noqa: E731
    tab.add_row("forward (median)", f"{med(times['forward']):.2f} ms")
    tab.add_row("backward (median)", f"{med(times['backward']):.2f} ms")
    ok = True
    checks = [("new residual", out, ref_out, dtype), ("d residual", xl.grad, xr.grad, dtype)]
    checks += [(f"d {k}", leaves[k].grad, ref[k].grad, dtype) for k in ("fn", "scale", "base", "norm_weight")]
    for name, got, exp, tol_dtype in checks:
        err = (got.double().cpu() - exp).abs().max().item()
        rel = err / max(exp.abs().max().item(), 1e-30)
        # relative to the largest magnitude; every quantity (parameter gradients too) flows
        # through activations stored in the residual dtype, so the limit follows that dtype
        limit = REL_LIMIT[tol_dtype]
        ok &= rel < limit
        tab.add_row(f"max error: {name}", f"{err:.3g} ({rel:.2g} of max) {'ok' if rel < limit else 'FAIL'}")
    con.print(tab)
    return 0 if ok else 1
