"""The TileLang kernels' generated CUDA, executed on CPU threads, against the float64 oracle.

``MHC_TILELANG_EMULATE=1`` (set here for this module only) makes the TileLang backend
serve CPU tensors: each kernel is lowered for sm_90a exactly as for a GPU and its
generated CUDA source is compiled as host C++ against ``tilelang_src/cuda_emu.h``
(``tilelang_src/emulate.py``). So these tests run the same index arithmetic, masks,
loops, shared-memory staging, barriers and float32 math as the GPU would, on every op
forward and backward, with awkward shapes; what they cannot run are the tensor-core
(``mma``) projection variants (refused, tested below). One fiber per CUDA thread, CTAs in
turn: shapes stay small. The GPU tests (test_tilelang_gpu.py) remain the word on real hardware.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("tilelang", reason="tilelang is not installed (pip install 'mhc-kernels[tilelang]')")
if shutil.which(os.environ.get("CXX", "g++")) is None:
    pytest.skip("no host C++ compiler (g++) to build the emulated kernels", allow_module_level=True)

import tilelang_checks  # noqa: E402
from op_samples import SP_FUSED_CASES, fused_single_pass_matches_its_parts  # noqa: E402

import mhc_kernels as mk  # noqa: E402
from mhc_kernels.reference import cases, torch_ref  # noqa: E402
from mhc_kernels.tilelang_src import EMULATE_ENV, common  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _emulate():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EMULATE_ENV, "1")
        yield


OPS_WITHOUT_C = ("split_mixes", "sinkhorn")
VARIANTS = [  # every n, C odd / not a multiple of any block / 1, T in {0, 1, 5, 37, (2, 3)}, each dtype
    dict(n=4, C=33, lead=(5,), dtype=torch.bfloat16, nw=True, consts={}),
    dict(n=1, C=1, lead=(1,), dtype=torch.float32, nw=False, consts={"sinkhorn_iters": 1}),
    dict(n=8, C=64, lead=(37,), dtype=torch.float16, nw=True, consts=cases.LOUD_CONSTS),
    dict(n=2, C=200, lead=(0,), dtype=torch.float32, nw=False, consts={}),
    dict(n=2, C=40, lead=(2, 3), dtype=torch.float32, nw=True, consts={"sinkhorn_iters": 20}),
    dict(n=4, C=72, lead=(300,), dtype=torch.bfloat16, nw=False, consts={}),  # several token blocks per grid
    # production widths (a few tokens: CTAs run one after another)
    dict(n=4, C=4096, lead=(3,), dtype=torch.bfloat16, nw=True, consts={}),
    dict(n=4, C=7168, lead=(2,), dtype=torch.bfloat16, nw=False, consts={}),
]


def _assert_ok(results, context):
    bad = [r for r in results if not r.ok]
    assert not bad, f"{context}: " + "; ".join(f"{r.name}: ratio {r.worst_ratio:.3g} ({r.detail})" for r in bad)


# the ops without a hidden dim are not repeated at the production widths
# The single-pass ops are the shared composite over the same kernels as mhc_pre / mhc_head / post (no code
# of their own on this backend yet), so the production widths add nothing for them but emulation time.
SHARED_COMPOSITE_ONLY = ("mhc_pre_sp", "post_pre_sp", "mhc_head_sp")
CASES = [(op, v) for v in VARIANTS for op in cases.CASES
         if not (op in OPS_WITHOUT_C + SHARED_COMPOSITE_ONLY and v["C"] > 1000)]


@pytest.mark.parametrize("op,v", CASES, ids=lambda c: c if isinstance(c, str) else
                         f"n{c['n']}-C{c['C']}-T{c['lead']}-{str(c['dtype'])[6:]}")
def test_tilelang_matches_oracle(op, v, served):
    C = 1 if op in OPS_WITHOUT_C else v["C"]
    inputs = cases.make_inputs(op, v["lead"], v["n"], C, v["dtype"], "cpu", norm_weight=v["nw"], consts=v["consts"])
    with mk.use_backend("tilelang"):
        fwd = cases.check_forward(mk, op, inputs)
        bwd = cases.check_backward(mk, op, inputs)
    _assert_ok(fwd + bwd, f"{op} {v}")
    assert op in served and all(b == {"tilelang"} for b in served.values()), served
    if v["lead"] != (0,) and cases.CASES[op].differentiable:
        assert any(name.endswith("_bwd") for name in served), served


@pytest.mark.parametrize("n,C,lead,L,dtype", [(4, 33, (5,), 3, torch.bfloat16), (8, 64, (2, 3), 2, torch.float16),
                                              (1, 1, (1,), 1, torch.float32)], ids=str)
def test_multilayer_recompute(n, C, lead, L, dtype, served):
    from mhc_kernels.recompute import multilayer_recompute

    inputs = cases.make_recompute_inputs(lead, n, C, L, dtype, "cpu")
    with mk.use_backend("tilelang"), torch.no_grad():
        _assert_ok(cases.check_recompute(multilayer_recompute, inputs), f"multilayer_recompute n={n} C={C} L={L}")
    assert served == {"multilayer_recompute": {"tilelang"}}, served


@pytest.mark.parametrize("n,C,T,splits", [(4, 64, 37, 1), (4, 33, 5, 3), (8, 16, 9, 2), (1, 7, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_mhc_pre_equals_the_kernel_chain_bitwise(n, C, T, splits, dtype):
    tilelang_checks.fused_mhc_pre_equals_the_chain("cpu", n, C, T, splits, dtype)


@pytest.mark.parametrize("n,C,T,splits,dtype", [(4, 33, 5, 3, torch.bfloat16), (8, 16, 9, 2, torch.float32)], ids=str)
def test_fused_mhc_pre_with_the_sublayer_norm_equals_the_chain_bitwise(n, C, T, splits, dtype):
    tilelang_checks.fused_mhc_pre_equals_the_chain("cpu", n, C, T, splits, dtype, out_norm=True)


@pytest.mark.parametrize("n,C,T,splits", [(4, 64, 37, 2), (4, 33, 5, 1), (8, 16, 9, 4), (2, 1, 3, 1)], ids=str)
def test_fused_post_pre_matches_post_then_mhc_pre(n, C, T, splits):
    tilelang_checks.fused_post_pre_matches_post_then_mhc_pre("cpu", n, C, T, splits)


def test_fused_post_pre_with_the_sublayer_norm_matches_post_then_mhc_pre():
    tilelang_checks.fused_post_pre_matches_post_then_mhc_pre("cpu", 4, 33, 5, 1, out_norm=True)


@pytest.mark.parametrize("n,C,T,splits,dtype,with_post,first,normalize", SP_FUSED_CASES, ids=str)
def test_fused_single_pass_matches_its_parts(n, C, T, splits, dtype, with_post, first, normalize):
    fused_single_pass_matches_its_parts("tilelang", "cpu", n, C, T, splits, dtype, with_post, first, normalize)


def test_configs_in_the_spaces_are_correct():
    """Non-default tilings (the tuner's candidates) run correctly too: every ~6th of each space."""
    tilelang_checks.configs_in_the_space_are_correct("cpu", 7, 24, lambda space: space[::max(1, len(space) // 6)])


@pytest.mark.parametrize("splits", [1, 2, 7])
def test_norm_fn_split_k_paths_agree(splits):
    tilelang_checks.norm_fn_split_k_paths_agree("cpu", 9, 40, splits)


@pytest.mark.parametrize("op", ["sinkhorn_bwd", "split_mixes_bwd"])
@pytest.mark.parametrize("iters,stride", [(20, 1), (20, 3), (20, 4), (9, 4), (7, 6)])
def test_sinkhorn_backward_checkpoint_segments(op, iters, stride):
    """The segment-recompute schedule (ck_stride > 1) runs to the same gradient as keeping every round."""
    from mhc_kernels.tilelang_src import mixes

    n, T = 4, 21
    g = torch.Generator().manual_seed(1)
    cfg = {"block_T": 16, "ck_stride": stride}
    if op == "sinkhorn_bwd":
        logits, grad = torch.randn(T, n, n, generator=g), torch.randn(T, n, n, generator=g)
        got = mixes.sinkhorn_bwd(grad, logits, iters, 1e-6, config=cfg)
        want = torch_ref.sinkhorn_bwd(grad, logits, iters, 1e-6)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    else:
        m = n * (n + 2)
        mx, scale, base = torch.randn(T, m, generator=g), torch.rand(3, generator=g) + 0.5, torch.randn(m, generator=g)
        gp, gq, gc = torch.randn(T, n, generator=g), torch.randn(T, n, generator=g), torch.randn(T, n, n, generator=g)
        got = mixes.split_mixes_bwd(gp, gq, gc, mx, scale, base, 2.0, iters, 1e-6, config=cfg)
        want = torch_ref.split_mixes_bwd(gp, gq, gc, mx, scale, base, 2.0, iters, 1e-6)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tensor_core_variant_is_refused_clearly():
    from mhc_kernels.tilelang_src import norm
    from mhc_kernels.tilelang_src.emulate import EmulationError

    inputs = cases.make_inputs("norm_fn", (3,), 4, 64, torch.bfloat16, "cpu")
    cfg = dict(norm.default_config("norm_fn", norm.Shape(3, 4, 64, torch.bfloat16)), mma="3xtf32", block_T=32,
               block_K=64, split_K=1)
    with pytest.raises(EmulationError, match="tensor-core"):
        norm.norm_fn_fwd(inputs["residual"], inputs["fn"], None, 1e-6, config=cfg)


def test_cpu_refused_without_emulation(monkeypatch):
    monkeypatch.setenv(EMULATE_ENV, "0")
    x = torch.randn(2, 4, 8)
    with mk.use_backend("tilelang"), pytest.raises(mk.BackendError, match=EMULATE_ENV):
        mk.pre_apply_mix(x, torch.rand(2, 4))


MUTATIONS = {  # post_fwd's source, broken three ways: each must be caught
    "transposed comb": ("acc[v] += comb[tok, j, i] * xf[j, v]", "acc[v] += comb[tok, i, j] * xf[j, v]"),
    "read the next token": ("yv[v] = y[tok, col + v]\n                    for j in T.unroll(n):",
                            "yv[v] = y[tok + 1, col + v]\n                    for j in T.unroll(n):"),
    "write the wrong stream": ("out[tok, i, col + v] = ov[v]\n\n    return post_fwd",
                               "out[tok, (i + 1) % n, col + v] = ov[v]\n\n    return post_fwd"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_emulator_catches_kernel_mistakes(mutation, tmp_path, monkeypatch):
    """The emulated tests can fail: post_fwd with a wrong index or a wrong store runs and misses the oracle."""
    import importlib.util

    from mhc_kernels.tilelang_src import aot, common, streaming

    aot.kernel_names()
    src = open(streaming.__file__).read().replace("from .common", "from mhc_kernels.tilelang_src.common")
    src = src.replace("    kernel_def(KernelDef(_name", "    (KernelDef(_name")  # do not re-register
    old, new = MUTATIONS[mutation]
    assert src.count(old) == 1, mutation
    path = tmp_path / "streaming_mutant.py"
    path.write_text(src.replace(old, new))
    spec = importlib.util.spec_from_file_location("streaming_mutant", path)
    mutant = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutant)
    monkeypatch.setattr(common.KERNELS["post_fwd"], "build", mutant._build_post_fwd)
    common._compiled.cache_clear()
    try:
        inputs = cases.make_inputs("post", (5,), 4, 33, torch.float32, "cpu")
        with mk.use_backend("tilelang"):
            res = cases.check_forward(mk, "post", inputs)
        assert not all(r.ok for r in res), f"{mutation} went unnoticed"
    finally:
        common._compiled.cache_clear()


def test_guard_zones_catch_out_of_bounds_writes_and_poison_reads():
    """TileLang already bounds every global access by the declared buffer shape (and the emulator checks the
    tensors against those shapes); the guard zones are the net under that: checked here directly."""
    from mhc_kernels.tilelang_src import emulate

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = torch.randn(3, 5).to(dtype)
        buf = emulate._guarded(a)
        assert torch.equal(buf[emulate.GUARD:emulate.GUARD + a.numel()].view(3, 5), a)
        assert buf[:emulate.GUARD].isnan().all() and buf[-emulate.GUARD:].isnan().all(), "reads past an end: NaN"
        assert emulate._guard_intact(buf)
        buf[emulate.GUARD + a.numel()] = 0.0       # one element past the end
        assert not emulate._guard_intact(buf)
        buf = emulate._guarded(a)
        buf[emulate.GUARD - 1] = float("nan")      # a computed NaN is not the guard's payload
        assert not emulate._guard_intact(buf)


def test_a_view_off_a_16_byte_boundary_is_refused_with_the_reason():
    """A contiguous view at a storage offset can start off a 16-byte boundary. The TileLang kernels' 16-byte vector
    accesses would fault there on a GPU (cudaErrorMisalignedAddress, which also ends the CUDA context), and the
    emulator's guarded copies are aligned, so it would not show. So TileLang does not take the call: forced, the
    error names the argument and its alignment; chosen automatically, another backend serves it (on CUDA: Triton,
    whose compiler specialises on pointer alignment); the emulator refuses such a pointer outright; and a view
    at an aligned offset is served by TileLang as before."""
    from mhc_kernels.tilelang_src import emulate

    d = cases.make_inputs("post", (5,), 4, 256, torch.bfloat16, "cpu", seed=1)
    args = (d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"])
    with mk.use_backend("reference"):
        want_ref = mk.mhc_post(*args)
    with mk.use_backend("tilelang"):
        want_tl = mk.mhc_post(*args)

    def residual_at(offset):   # the residual's values, contiguous, `offset` elements into a larger buffer
        buf = torch.zeros(d["residual"].numel() + offset, dtype=torch.bfloat16)
        r = buf[offset:].view(d["residual"].shape)
        r.copy_(d["residual"])
        return r

    off = residual_at(3)
    assert off.is_contiguous() and off.data_ptr() % 16 == 6
    with mk.use_backend("tilelang"), pytest.raises(mk.BackendError, match=r"'residual' starts at an address "
                                                                         r"aligned to 2 bytes only"):
        mk.mhc_post(d["layer_output"], off, d["post_mix"], d["comb_mix"])
    assert mk.which_backend("post", d["layer_output"], off, d["post_mix"], d["comb_mix"]) == "reference"
    assert torch.equal(mk.mhc_post(d["layer_output"], off, d["post_mix"], d["comb_mix"]), want_ref)
    with mk.use_backend("tilelang"):
        assert torch.equal(mk.mhc_post(d["layer_output"], residual_at(8), d["post_mix"], d["comb_mix"]), want_tl)
    # the net under it: the kernel itself, handed the pointer directly, is refused by the emulator, which reads
    # the 16-byte vector accesses off the generated code
    from mhc_kernels.tilelang_src import streaming

    cfg = streaming.default_config("post", common.Shape(5, 4, 256, torch.bfloat16))
    with pytest.raises(emulate.EmulationError, match="'residual' is not 16-byte aligned"):
        streaming.post_fwd(d["layer_output"], off, d["post_mix"], d["comb_mix"], config=cfg)


def test_emulator_refuses_a_grid_a_gpu_would_refuse():
    """A GPU refuses blockIdx.y or .z extents past 65535. So the emulator refuses a kernel whose grid breaks CUDA's
    launch limits at some token count (evaluated at emulate.MAX_TOKENS): token blocks on blockIdx.y break them
    from T > 65535 * block_T on, on blockIdx.x they hold. And it refuses a launch with an empty grid."""
    from mhc_kernels.tilelang_src import emulate

    with pytest.raises(emulate.EmulationError, match=r"blockIdx\.y extent 268435456 > 65535"):
        emulate.EmulatedKernel(tilelang_checks.copy_kernel(tokens_on_x=False))
    x = torch.randn(9, 128)
    y = torch.zeros(9, 128)
    kernel = emulate.EmulatedKernel(tilelang_checks.copy_kernel(tokens_on_x=True))
    kernel(x, y)
    assert torch.equal(x, y)
    # TileLang's CUDA launcher refuses an empty grid ("grid dimension must be positive"), so the emulator does
    # too: a wrapper must return before launching on an empty input (every op's T=0 case runs through here)
    with pytest.raises(emulate.EmulationError, match="empty grid"):
        kernel(torch.zeros(0, 128), torch.zeros(0, 128))


def test_check_command_covers_tilelang_on_cpu():
    """`MHC_TILELANG_EMULATE=1 mhc-kernels check --device cpu --backends tilelang` runs the TileLang cases."""
    from mhc_kernels.commands.check import run_checks

    summaries, unavailable, requested = run_checks("cpu", ["tilelang"], ["post", "mhc_pre"])
    assert requested and not unavailable
    assert [(s.backend, s.op, s.status) for s in summaries] == [("tilelang", "post", "pass"),
                                                                ("tilelang", "mhc_pre", "pass")]


def test_emulator_leaves_inputs_untouched_so_chained_ops_backpropagate():
    """Regression: the emulator used to copy every argument back after a launch, which bumped the autograd
    version of inputs an earlier op had saved ("modified by an inplace operation" in backward)."""
    x = torch.randn(2, 4, 8, requires_grad=True)
    pre, post, comb = torch.rand(2, 4), torch.rand(2, 4), torch.rand(2, 4, 4)
    version = x._version
    with mk.use_backend("tilelang"):
        li = mk.pre_apply_mix(x, pre)
        out = mk.mhc_post(li, x, post, comb)
        assert x._version == version
        (li.sum() + out.sum()).backward()
    ref = x.detach().clone().requires_grad_()
    with mk.use_backend("reference"):
        li_r = mk.pre_apply_mix(ref, pre)
        (li_r.sum() + mk.mhc_post(li_r, ref, post, comb).sum()).backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-5)


PROBE = """extern "C" __global__ void __launch_bounds__(64, 1) probe_kernel(float* __restrict__ out, int mode) {
  extern __shared__ __align__(16) float buf[];
  int t = (int)threadIdx.x;
  if (mode == 2 && t == 0) { return; }
  buf[t] = (float)(t + 1);
  if (mode != 1) { __syncthreads(); }
  out[((int)blockIdx.x) * 64 + t] = buf[(t + 1) % 64];
}"""


def _run_probe(mode: int) -> tuple[int, torch.Tensor]:
    """The hand-written kernel above on the emulator's launcher: 2 CTAs of 64 threads, 256 B of shared memory."""
    import ctypes

    from mhc_kernels.tilelang_src import emulate

    src, name, params = emulate._host_source(PROBE)
    assert name == "probe_kernel" and [p for _, p in params] == ["out", "mode"]
    lib = emulate._build_library(src)
    out = torch.zeros(2 * 64)
    box = ctypes.c_int(mode)
    args = (ctypes.c_void_p * 2)(out.data_ptr(), ctypes.addressof(box))
    return lib.emu_entry(args, 2, 1, 1, 64, 1, 1, 64 * 4), out


def test_emulator_orders_threads_so_a_missing_barrier_shows():
    """Fibers run in ascending thread order in even CTAs and descending in odd ones, on shared memory that
    starts poisoned: a neighbour's value read without the barrier is the poison in one CTA or the other."""
    want = (torch.arange(64) + 1).roll(-1).float().repeat(2)
    status, out = _run_probe(0)
    assert status == 0 and torch.equal(out, want)
    status, out = _run_probe(1)  # the same kernel without its barrier
    assert status == 0 and not torch.equal(out, want)
    assert out[:64].isnan().any(), "ascending order: thread t reads t+1's slot before t+1 wrote it"


def test_emulator_refuses_threads_that_skip_a_barrier():
    """Thread 0 returns before the barrier the others wait at (a hang or a race on a GPU): status 1, which
    EmulatedKernel turns into an EmulationError."""
    status, _ = _run_probe(2)
    assert status == 1
