"""Decode latency of one boundary (``mhc-kernels bench --decode``): µs per ``post_pre`` / ``post_pre_sp`` at small
T, eager and replayed from a CUDA graph.

In decode a boundary moves a few hundred KB, so its time is launch and host overhead; a CUDA graph removes
the host part. Each row times the public function with the sublayer's norm fused (``out_norm_weight``) as an
engine calls it: eager (``bench.timing.time_fn``), and on CUDA captured once into a ``torch.cuda.CUDAGraph``
after a warm-up call outside the capture (which compiles the kernels and fills the config cache: the
documented warm-up) and replayed (CUDA events around each replay). On CPU there are no graphs: the graph
column is empty with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

import mhc_kernels as mk
from mhc_kernels import registry
from mhc_kernels.reference import cases

from .timing import summarise, time_fn

DECODE_TOKENS = (1, 2, 4, 8, 16, 64)
DECODE_N, DECODE_C = 4, 4096   # the default shape (--n, --hidden)
DECODE_OPS = ("post_pre", "post_pre_sp")


@dataclass
class DecodeRow:
    op: str
    backend: str
    T: int
    n: int
    C: int
    eager_us: Optional[float]
    graph_us: Optional[float]
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def boundary_fn(op: str, T: int, n: int, C: int, dtype: torch.dtype, device,
                out_fp8: Optional[str] = None) -> Callable[[], tuple]:
    """A no-argument call of the public boundary ``op`` on fixed inputs (a middle site with norms; with
    ``out_fp8`` also writing the FP8 copy of the layer input)."""
    d = cases.make_inputs(op, (T,), n, C, dtype, device, norm_weight=True, seed=T)
    site = dict(fn=d["fn"], scale=d["scale"], base=d["base"], norm_weight=d["norm_weight"],
                out_norm_weight=d["out_norm_weight"], out_fp8=out_fp8)
    y, x, post, comb = d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"]
    if op == "post_pre":
        return lambda: mk.post_pre(y, x, post, comb, **site)
    return lambda: mk.post_pre_sp(y, x, post, comb, d["prev_pre"], **site)


def capture(fn: Callable[[], tuple], device) -> tuple[Callable[[], None], tuple]:
    """-> (replay, the outputs' static tensors): ``fn`` warmed up on a side stream, then captured into a CUDA
    graph. Raises whatever the capture raises (a host synchronisation inside ``fn`` does)."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph.replay, outs


def _time_replay(replay: Callable[[], None], device, repeats: int = 200) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for _ in range(5):
        replay()
    for a, b in zip(starts, ends):
        a.record()
        replay()
        b.record()
    torch.cuda.synchronize(device)
    return summarise([a.elapsed_time(b) * 1e-3 for a, b in zip(starts, ends)], 5, "cuda graph replay").median_s


def run_decode(backends, tokens=DECODE_TOKENS, n: int = DECODE_N, C: int = DECODE_C, dtype=torch.bfloat16, device="cpu",
               budget_s: float = 0.1) -> list[DecodeRow]:
    """One row per (op, backend, T): eager µs, and CUDA-graph µs on CUDA."""
    device = torch.device(device)
    rows = []
    for op in DECODE_OPS:
        for b in backends:
            for T in tokens:
                row = DecodeRow(op, b, T, n, C, None, None)
                try:
                    with torch.no_grad(), registry.use_backend(b):
                        fn = boundary_fn(op, T, n, C, dtype, device)
                        row.eager_us = time_fn(fn, device, warmup=3, budget_s=budget_s).median_s * 1e6
                        if device.type == "cuda":
                            replay, _ = capture(fn, device)
                            row.graph_us = _time_replay(replay, device) * 1e6
                        else:
                            row.note = "no CUDA graphs on CPU"
                except Exception as e:  # noqa: BLE001 -- a row that says why, the sweep goes on
                    row.note = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                rows.append(row)
    return rows
