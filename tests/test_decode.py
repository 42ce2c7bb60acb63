"""Decode: the boundary's code path is CUDA-graph safe and short, and ``mhc-kernels bench --decode`` reports it.

CUDA-graph safety needs no host synchronisation (``.item()``, ``.cpu()``, ``nonzero``: every one reads device
data on the host) and no allocation whose size depends on data. On CPU the first is checked on the ops the
boundary dispatches (a ``TorchDispatchMode`` that records them), per backend that runs on CPU, after the
documented warm-up call; on a GPU one boundary is captured into a CUDA graph at T=1 and T=16 and replayed
against eager (``-m gpu``).

Short: in decode a boundary's time is its launches, so each kernel backend runs every forward boundary op in at
most two device launches at T <= 64 (issue 16, "Decode"), counted on CPU: Triton kernel launches (the JIT
function's ``run``, which the interpreter's launches also go through), TileLang launches (the emulator's
``EmulatedKernel.__call__``) and the torch ops that launch a device kernel (a fill, a copy, a cast, arithmetic;
allocation and views are free).
"""

import json

import pytest
import torch
from backends import BACKENDS
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

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


# torch ops that launch no device kernel: allocation, views and other metadata
_FREE = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "view", "reshape", "_reshape_alias",
         "_unsafe_view", "as_strided", "detach", "alias", "lift_fresh", "unsqueeze", "squeeze", "expand", "select",
         "slice", "t", "transpose", "permute", "unflatten", "split", "unbind", "sym_size", "sym_stride", "sym_numel",
         "sym_storage_offset", "is_contiguous", "dim", "size", "stride", "storage_offset"}
KERNEL_BACKENDS = [p for p in BACKENDS if p.values[0] != "reference"]   # the reference is not a kernel backend
BOUNDARY_OPS = ("post_pre_sp", "post_pre", "mhc_pre_sp", "mhc_pre")

class _LaunchCounter(TorchDispatchMode):
    """Records the device launches of the code run inside it: ``launches`` (kernel backends' launches, each run
    with the mode off, so the interpreter's and emulator's own tensor work is not counted) and ``ops`` (torch
    ops that launch a device kernel)."""

    def __init__(self):
        super().__init__()
        self.launches, self.ops = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return len(self.launches) + len(self.ops)


@pytest.fixture
def counted(monkeypatch):
    """-> a function giving a fresh :class:`_LaunchCounter`; Triton's and TileLang's launch paths report to
    the one active."""
    active = []

    def wrap(run, label):
        def launch(self, *args, **kwargs):
            if active:
                active[-1].launches.append(f"{label} {getattr(self, '__name__', type(self).__name__)}")
            with _disable_current_modes():
                return run(self, *args, **kwargs)
        return launch

    try:
        from mhc_kernels.triton_src import mix
        jit = type(mix.pre_apply_mix_fwd_kernel)      # JITFunction, or InterpretedFunction under the interpreter
        monkeypatch.setattr(jit, "run", wrap(jit.run, "triton"))
    except ImportError:
        pass
    try:
        from mhc_kernels.tilelang_src import emulate
        monkeypatch.setattr(emulate.EmulatedKernel, "__call__", wrap(emulate.EmulatedKernel.__call__, "tilelang"))
    except ImportError:
        pass

    def new():
        c = _LaunchCounter()

        class _Active:
            def __enter__(self):
                active.append(c)
                c.__enter__()
                return c

            def __exit__(self, *exc):
                c.__exit__(*exc)
                active.pop()

        return _Active()

    return new


def _boundary(op, T, weighted, fp8=None):
    from mhc_kernels.reference import cases

    d = cases.make_inputs(op, (T,), 4, 128 if fp8 else 64, torch.bfloat16, "cpu", norm_weight=True, seed=T)
    site = dict(fn=d["fn"], scale=d["scale"], base=d["base"], norm_weight=d["norm_weight"],
                out_norm_weight=d["out_norm_weight"] if weighted else None)
    if fp8:
        site["out_fp8"] = fp8
    x = d["residual"]
    if op == "mhc_pre":
        return lambda: mk.mhc_pre(x, **site)
    if op == "mhc_pre_sp":
        return lambda: mk.mhc_pre_sp(x, d["prev_pre"], **site)
    y, post, comb = d["layer_output"], d["post_mix"], d["comb_mix"]
    if op == "post_pre":
        return lambda: mk.post_pre(y, x, post, comb, **site)
    return lambda: mk.post_pre_sp(y, x, post, comb, d["prev_pre"], **site)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize("weighted,fp8", [(False, None), (True, None), (False, "e4m3_g32"), (True, "e4m3_g128")],
                         ids=["no_out_norm", "out_norm", "fp8_g32", "out_norm_fp8_g128"])
@pytest.mark.parametrize("op", BOUNDARY_OPS)
def test_a_decode_boundary_is_at_most_two_launches(backend, op, weighted, fp8, counted):
    """With the FP8 copy too: the tail kernel writes it beside the layer input, its scales as the public dtype's
    bits (E8M0 bytes at groups of 32: a view, not a cast launch)."""
    for T in (1, 16, 64):
        with torch.no_grad(), mk.use_backend(backend):
            fn = _boundary(op, T, weighted, fp8)
            if backend == "tilelang":             # the warm-up: builds the kernels (Triton's JIT builds inside the
                fn()                              # launch it counts; the interpreter builds nothing)
            with counted() as c:
                fn()
        assert c.launches, f"{backend} {op}: no launch counted (the counter's hook is broken)"
        assert c.total <= 2, (f"{backend} {op} T={T} {'with' if weighted else 'without'} the out-norm, FP8 {fp8}: "
                              f"{c.total} device launches: {c.launches + c.ops}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_the_launch_counter_counts_kernels_and_torch_launches(backend, counted):
    """The check above can fail: a primitive op is one launch, and a fill and a cast are counted, views and
    allocations not."""
    h = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad(), mk.use_backend(backend):
        mk.expand(h, 2)
        with counted() as c:
            mk.expand(h, 2)
    assert len(c.launches) == 1 and not c.ops, (c.launches, c.ops)
    with counted() as c:
        torch.empty(4).view(2, 2)
        torch.ones(3).float().to(torch.bfloat16)
    assert c.ops == ["ones", "_to_copy"], c.ops


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
    """At T=1 and T=16, and at T=1 with the FP8 copy in groups of 32 (the codes and E8M0 scales are views of the
    kernels' byte outputs; compared, and cleared, as bytes: float8 has no fill or equality kernels everywhere)."""
    if not mk.available_backends("cuda")[backend].available:
        pytest.skip(mk.available_backends("cuda")[backend].reason)

    def bits(t):
        return t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t

    for T, fp8 in ((1, None), (16, None), (1, "e4m3_g32")):
        with torch.no_grad(), mk.use_backend(backend):
            fn = decode.boundary_fn(op, T, 4, 4096, torch.bfloat16, "cuda", out_fp8=fp8)
            want = fn()
            replay, outs = decode.capture(fn, "cuda")
            for o in outs:
                bits(o).zero_()
            replay()
            torch.cuda.synchronize()
        assert len(outs) == len(want) == (6 if fp8 else 4) + (op == "post_pre_sp")
        for a, b in zip(outs, want):
            assert torch.equal(bits(a), bits(b)), f"{backend} {op} T={T} FP8 {fp8}: the graph replay differs from eager"
