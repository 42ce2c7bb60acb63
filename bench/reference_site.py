"""Benchmark of the PyTorch reference backend on CPU: one mHC site, and per-call overhead.

Run:  python -m mhc_kernels.bench.reference_site [--tokens 4096 --n 4 --hidden 1024 --repeats 7]

1. One mHC site (``mhc_pre`` then ``mhc_post``; the sublayer is the identity so only mHC
   work is timed), forward and forward+backward, for bf16 and fp32, through
   ``mhc_kernels`` (the reference backend with explicit backward) and through the plain
   PyTorch transcription of the contract (reference/README.md) with autograd through the forward.
   Achieved GB/s uses the op specs' minimum byte counts: forward
   ``mhc_pre + post``; backward ``post_bwd + mhc_pre_bwd`` with the residual gradient
   accumulated in place (``grad_residual`` present).
2. Per-call overhead of the public API on a decode-sized input (T=1, n=4, C=64):
   ``mhc_kernels.mhc_post`` with the eager fast path, the same through ``torch.ops.mhc.post``
   (the custom-op dispatcher, what the fast path skips), and the reference function called
   directly.

This is a benchmark: it prints numbers and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import mhc_kernels as mk
from mhc_kernels import ops
from mhc_kernels.reference import cases, torch_ref, transcription
from mhc_kernels.specs import DTYPES_BY_NAME, SPECS


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def site_bytes(T: int, n: int, C: int, dtype: torch.dtype) -> tuple[int, int]:
    fwd = SPECS["mhc_pre"].bytes(T, n, C, dtype) + SPECS["post"].bytes(T, n, C, dtype)
    bwd = SPECS["post_bwd"].bytes(T, n, C, dtype) + SPECS["mhc_pre_bwd"].bytes(T, n, C, dtype, ("grad_residual",))
    return fwd, bwd


def _site(impl_pre, impl_post, x, p):
    li, post_mix, comb_mix = impl_pre(x, p["fn"], p["scale"], p["base"])
    return impl_post(li, x, post_mix, comb_mix)


def _api_pre(x, fn, scale, base):
    return mk.mhc_pre(x, fn, scale, base)


IMPLS = {
    "mhc_kernels (reference)": (_api_pre, mk.mhc_post),
    "transcription + autograd": (transcription.mhc_pre, transcription.post),
}


def bench_site(T, n, C, dtype, repeats):
    d = cases.make_inputs("mhc_pre", (T,), n, C, dtype, torch.device("cpu"))
    params = {k: d[k].detach().clone().requires_grad_() for k in ("fn", "scale", "base")}
    x = d["residual"].detach().clone().requires_grad_()
    g = torch.randn(T, n, C).to(dtype)
    fwd_bytes, bwd_bytes = site_bytes(T, n, C, dtype)
    rows = []
    for name, (pre, post) in IMPLS.items():
        def forward():
            with torch.no_grad():
                _site(pre, post, x, params)

        def fwd_bwd():
            out = _site(pre, post, x, params)
            torch.autograd.backward(out, g)

        tf = median_seconds(forward, repeats)
        tfb = median_seconds(fwd_bwd, repeats)
        rows.append((name, tf, fwd_bytes / tf / 1e9, tfb, (fwd_bytes + bwd_bytes) / tfb / 1e9))
    return rows


def bench_overhead(repeats: int):
    T, n, C = 1, 4, 64
    d = cases.make_inputs("post", (T,), n, C, torch.bfloat16, torch.device("cpu"))
    args = (d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"])
    inner = 200

    def per_call(fn):
        def loop():
            for _ in range(inner):
                fn(*args)
        return median_seconds(loop, repeats, warmup=2) / inner

    was = ops.eager_fastpath_enabled()
    try:
        ops.set_eager_fastpath(True)
        fast = per_call(mk.mhc_post)
        ops.set_eager_fastpath(False)
        dispatcher = per_call(mk.mhc_post)
    finally:
        ops.set_eager_fastpath(was)
    direct = per_call(torch_ref.post_fwd)
    return [("mhc_kernels.mhc_post (eager fast path)", fast),
            ("mhc_kernels.mhc_post via torch.ops.mhc.post", dispatcher),
            ("reference post_fwd called directly", direct)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtypes", default="bf16,fp32")
    a = ap.parse_args(argv)
    con = Console()
    T, n, C = a.tokens, a.n, a.hidden
    con.print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    tab = Table(title=f"one mHC site on CPU (mhc_pre + mhc_post), T={T}, n={n}, C={C}, median of {a.repeats}")
    for col in ("dtype", "implementation", "fwd ms", "fwd GB/s", "fwd+bwd ms", "fwd+bwd GB/s"):
        tab.add_column(col, justify="right" if col != "implementation" else "left")
    for dt in a.dtypes.split(","):
        for name, tf, gf, tfb, gfb in bench_site(T, n, C, DTYPES_BY_NAME[dt], a.repeats):
            tab.add_row(dt, name, f"{tf * 1e3:.2f}", f"{gf:.2f}", f"{tfb * 1e3:.2f}", f"{gfb:.2f}")
    con.print(tab)
    tab = Table(title="per-call overhead, mhc_post, T=1, n=4, C=64, bf16, CPU")
    tab.add_column("path")
    tab.add_column("µs per call", justify="right")
    for name, t in bench_overhead(a.repeats):
        tab.add_row(name, f"{t * 1e6:.1f}")
    con.print(tab)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
