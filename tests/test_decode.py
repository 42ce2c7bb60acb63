"""Decode: the boundary's code path is CUDA-graph safe, and ``mhc-kernels bench --decode`` reports it.

CUDA-graph safety needs no host synchronisation (``.item()``, ``.cpu()``, ``nonzero``: every one reads device
data on the host) and no allocation whose size depends on data. On CPU the first is checked on the ops the
boundary dispatches (a ``TorchDispatchMode`` that records them), per backend that runs on CPU, after the
documented warm-up call; on a GPU one boundary is captured into a CUDA graph at T=1 and T=16 and replayed
against eager (``-m gpu``).
"""

import json

import pytest
import torch
from backends import BACKENDS
from torch.utils._python_dispatch import TorchDispatchMode

import mhc_kernels as mk
from mhc_kernels.bench import decode

# ops that read device data on the host, or give outputs whose size depends on data
_SYNCING = ("_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique", "bincount",
            "repeat_interleave", "equal", "is_nonzero")


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("op", decode.DECODE_OPS)
def test_the_boundary_never_synchronises_with_the_host(backend, op, monkeypatch):
    if backend == "tilelang":
        # the emulated launch stands in for the GPU's: its own checks (guard zones around every buffer, read on
        # the host) are not part of the GPU path, so they run outside the recorder
        from torch.utils._python_dispatch import _disable_current_modes

        from mhc_kernels.tilelang_src import emulate

        launch = emulate.EmulatedKernel.__call__

        def unrecorded(self, *args, **kwargs):
            with _disable_current_modes():
                return launch(self, *args, **kwargs)

        monkeypatch.setattr(emulate.EmulatedKernel, "__call__", unrecorded)
    for T in (1, 16):
        with torch.no_grad(), mk.use_backend(backend):
            fn = decode.boundary_fn(op, T, 4, 64, torch.bfloat16, "cpu")
            fn()                                  # the warm-up: compiles kernels, fills the config cache
            with _Recorder() as rec:
                fn()
        bad = sorted({o for o in rec.ops if o in _SYNCING})
        assert not bad, f"{backend} {op} T={T} calls {bad}, which synchronise with the host"


def test_the_recorder_sees_a_synchronising_op():
    """The check above can fail: ``.item()`` is recorded."""
    with _Recorder() as rec:
        torch.ones(3).sum().item()
    assert "_local_scalar_dense" in rec.ops


def test_bench_decode_writes_a_row_per_boundary_and_token_count(tmp_path):
    from mhc_kernels.cli import main

    rc = main(["bench", "--decode", "--device", "cpu", "--tokens", "1", "4", "--hidden", "64",
               "--out", str(tmp_path)])
    assert rc == 0
    rep = json.loads((tmp_path / "decode.json").read_text())
    rows = {(r["op"], r["T"]): r for r in rep["rows"]}
    assert set(rows) == {(op, T) for op in decode.DECODE_OPS for T in (1, 4)}
    for r in rows.values():
        assert r["eager_us"] > 0 and r["graph_us"] is None and "CUDA graphs" in r["note"]


@pytest.mark.gpu
@pytest.mark.gpu_smoke
@pytest.mark.parametrize("backend", ["triton", "tilelang", "reference"])
@pytest.mark.parametrize("op", decode.DECODE_OPS)
def test_a_captured_boundary_replays_what_eager_computes(backend, op):
    if not mk.available_backends("cuda")[backend].available:
        pytest.skip(mk.available_backends("cuda")[backend].reason)
    for T in (1, 16):
        with torch.no_grad(), mk.use_backend(backend):
            fn = decode.boundary_fn(op, T, 4, 4096, torch.bfloat16, "cuda")
            want = fn()
            replay, outs = decode.capture(fn, "cuda")
            for o in outs:
                o.zero_()
            replay()
            torch.cuda.synchronize()
        for a, b in zip(outs, want):
            assert torch.equal(a, b), f"{backend} {op} T={T}: the graph replay differs from eager"
