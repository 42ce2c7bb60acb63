"""TileLang kernels compiled for real GPU targets on a machine without a GPU (DESIGN.md section 4).

Every kernel (forward and backward) is built for sm_90a and assembled with ``ptxas -v``;
the tests assert that it compiles, spills no registers, fits the arch's shared
memory and has no hazard the CPU emulator cannot show (a shared-memory conflict TileLang's
barrier planner could not fence, a grid past CUDA's launch limits at some token count), and
inspect the generated CUDA for properties the design promises.

The case list is a deliberate covering subset (the full product would take far longer
than CI allows on 2 cores): every kernel x n in {1, 4, 8} at C=4096 bf16 (n=2 for the
kernels whose source checks loop over n); C=7168 and the vector-less 200/201 at n=4 bf16
for the kernels whose code depends on C (1280 for the projections); float32 for every
kernel whose code depends on the residual dtype and float16 for one of each family; a
representative subset for sm_80 and sm_100a; and the tensor-core (TF32) variant of the norm_fn projection
at explicit configs (MMA_CASES: every n, C=200/201, float32, split-K, plain tf32, sm_80
and sm_100a). One kernel of each family (n=4 C=4096 bf16 sm_90a) goes
through the full ``tilelang.compile`` (cubin + launcher, as at run time); the rest stops
at the PTX (the same generated source), built in batches of 16 with one ``nvcc -ptx`` and
one ``ptxas`` each (``aot.compile_many``: nvcc's fixed cost is ~1.5 s of header parsing).
All builds run once per module, on 2 processes.
"""

import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

import pytest
import torch

tilelang = pytest.importorskip("tilelang", reason="tilelang is not installed (pip install 'mhc-kernels[tilelang]')")
if shutil.which("nvcc") is None or shutil.which("ptxas") is None:
    pytest.skip("nvcc/ptxas not on PATH: TileLang kernels cannot be compiled without the CUDA toolkit",
                allow_module_level=True)

import tilelang_checks  # noqa: E402

from mhc_kernels import ptxas  # noqa: E402
from mhc_kernels.specs import MAX_SINKHORN_ITERS  # noqa: E402
from mhc_kernels.tilelang_src import aot, backend, common  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ALL = aot.kernel_names()
ACT = [k for k in ALL if common.KERNELS[k].act_dependent]
C_SWEEP_MAIN = ["pre_apply_mix_fwd", "pre_apply_mix_bwd", "post_fwd", "post_bwd", "expand_fwd", "expand_bwd",
                "norm_fn_fwd", "norm_fn_bwd_dx", "norm_fn_bwd_dfn", "mhc_pre_tail", "mhc_pre_norm_tail",
                "mhc_pre_project", "post_project", "post_pre_sp_project"]
SINGLE_PASS = ("pre_sp_project", "post_pre_sp_project", "mhc_pre_sp_tail")
OTHER_ARCH = ["post_fwd", "post_bwd", "pre_apply_mix_fwd", "norm_fn_fwd", "split_mixes_bwd", "sinkhorn_bwd",
              "mhc_pre_tail", "mhc_pre_norm_tail", "post_project", "post_pre_sp_project", "mhc_pre_sp_tail"]


FP8 = ("quantize_fp8",)   # n-independent, and C must be whole groups of 32 (not 200)


# Thinned where a case finds nothing another does not (each cold build costs ~1 s of lowering on CI's 2 cores):
# n=2 runs the n=4 code with smaller unrolls and fewer registers, so it is kept only for the kernels whose
# source checks loop over every n; fp16 differs from bf16 only in the conversion intrinsics (one kernel of each
# family); C=1280 matters to the projections' K tiling (7168 and the vector-less 200/201 cover the rest); the
# full tilelang.compile (cubin + launcher) is kernel-independent past the source, so one kernel per family.
N2 = ("post_fwd", "mhc_pre_tail", "mhc_pre_norm_tail", "post_project", *SINGLE_PASS)
C1280 = ("norm_fn_fwd", "mhc_pre_project", "post_project", "post_pre_sp_project")
FP16 = ("pre_apply_mix_fwd", "post_fwd", "post_bwd", "expand_bwd", "norm_fn_fwd", "norm_fn_bwd_dx", "collapse_norm",
        "mhc_pre_tail", "post_project")
FULL = ("quantize_fp8", "norm_fn_fwd", "post_fwd", "split_mixes_fwd", "mhc_pre_tail", "post_project",
        "mhc_pre_sp_tail")


def _cases():
    cases = []  # (kernel, arch, n, C, dtype key, full build)
    for n in (1, 2, 4, 8):
        for k in ALL:
            if (k not in FP8 or n == 4) and (n != 2 or k in N2):
                cases.append((k, "sm_90a", n, 4096, "bf16", n == 4 and k in FULL))
    cases += [(k, "sm_90a", 4, 1280, "bf16", False) for k in C1280]
    cases += [(k, "sm_90a", 4, 7168, "bf16", False) for k in C_SWEEP_MAIN]
    cases += [(k, "sm_90a", 4, 200, "bf16", False) for k in ACT if k not in FP8]
    cases += [(k, "sm_90a", 4, 201, "bf16", False) for k in ("pre_apply_mix_fwd", "post_fwd", "norm_fn_fwd",
                                                                         "mhc_pre_tail", "mhc_pre_norm_tail",
                                                                         "post_project")]
    # (the single-pass kernels share post_project's dtype handling, covered here; the norm tail's collapse and
    # rewrite are collapse_norm's, its Sinkhorn warp the tail's)
    cases += [(k, "sm_90a", 4, 4096, "fp32", False) for k in ACT
              if k not in ("norm_fn_finalize", "mhc_pre_norm_tail", *SINGLE_PASS)]
    cases += [(k, "sm_90a", 4, 4096, "fp16", False) for k in FP16]
    for arch in ("sm_80", "sm_100a"):
        cases += [(k, arch, 4, 4096, "bf16", False) for k in OTHER_ARCH]
    return cases


CASES = _cases()
EXTRA = {  # source checks that need a non-default constant
    "sinkhorn_iters7": ("sinkhorn_fwd", dict(iters=7)),
}


def _case_id(c):
    return f"{c[0]}-{c[1]}-n{c[2]}-C{c[3]}-{c[4]}"


def _build(case):
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    k, arch, n, C, dt, full = case
    return aot.compile_one(k, arch, n, C, DTYPES[dt], full=full)


def _build_sinkhorn(iters, kernel="sinkhorn_fwd"):
    """Generated source of ``kernel`` (sinkhorn_fwd, or the fused mhc_pre tail) at a non-default ``iters``."""
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    aot.kernel_names()  # registers every kernel (this runs in a fresh worker process)
    kdef = common.KERNELS[kernel]
    if kernel == "sinkhorn_fwd":
        prim = kdef.build(4, 1, torch.float32, {"block_T": 128}, iters=iters)
    else:
        prim = kdef.build(4, 4096, torch.bfloat16, aot._config_for(kdef, 4, 4096, torch.bfloat16), iters=iters)
    return aot._lower_to_ptx(prim, "sm_90a")[0]


SEGMENTED = [("sinkhorn_bwd", 8, 700), ("split_mixes_bwd", 8, 2000)]  # checkpoints of every round do not fit

# The single-pass kernels' non-default variants (the default build is the middle-site one, with a carried pre
# and the out-norm): the first site's one-hot collapse and the tail without the norm, at n=4 and n=8; and the
# fused projections with norm_weight folded in as fn is staged (fold=True), at n=8 (the most registers).
VARIANTS = [("variant", k, n, tuple(c.items())) for n in (4, 8) for k, c in (
    ("pre_sp_project", {"collapse": "first"}), ("post_pre_sp_project", {"collapse": "first"}),
    ("mhc_pre_sp_tail", {"iters": 20, "normalize": False}))]
FOLDED = [("variant", k, 8, tuple(c.items())) for k, c in (
    ("mhc_pre_project", {"fold": True}), ("post_project", {"fold": True}),
    ("post_pre_sp_project", {"collapse": "mix", "fold": True}))]
VARIANTS += FOLDED

# The boundary tails with the FP8 copy of the layer input fused in (fused.py, fp8_group > 0; the default builds
# are the plain tails): each tail once at n=4, C=4096, both groups between them -- the norm tail at 32, where its
# threads take several (token, group) items each.
FP8_TAILS = [("fp8", k, 4, tuple(c.items())) for k, c in (
    ("mhc_pre_tail", {"iters": 20, "fp8_group": 128}), ("mhc_pre_norm_tail", {"iters": 20, "fp8_group": 32}),
    ("mhc_pre_sp_tail", {"iters": 20, "normalize": True, "fp8_group": 128}),
    ("mhc_pre_sp_tail", {"iters": 20, "normalize": False, "fp8_group": 32}))]


# The tensor-core norm_fn projection (config key mma; the default stays "fma"), built at explicit configs:
# ("mma", kernel, arch, n, C, dtype key, mode, block_T, block_K, splits)
MMA_CASES = [("mma", "norm_fn_fwd", "sm_90a", n, 4096, "bf16", "3xtf32", 32, 128, 1) for n in (1, 2, 4, 8)] + [
    ("mma", "norm_fn_fwd_splitk", "sm_90a", 8, 4096, "bf16", "3xtf32", 64, 64, 4),
    ("mma", "norm_fn_fwd", "sm_90a", 4, 200, "bf16", "3xtf32", 64, 128, 1),
    ("mma", "norm_fn_fwd_splitk", "sm_90a", 4, 201, "bf16", "3xtf32", 32, 64, 3),
    ("mma", "norm_fn_fwd", "sm_90a", 4, 4096, "fp32", "3xtf32", 32, 128, 1),
    ("mma", "norm_fn_fwd", "sm_90a", 4, 4096, "bf16", "tf32", 32, 256, 1),
    ("mma", "norm_fn_fwd", "sm_80", 4, 4096, "bf16", "3xtf32", 32, 128, 1),
    ("mma", "norm_fn_fwd", "sm_100a", 4, 4096, "bf16", "3xtf32", 32, 128, 1),
]
TF32_MMA = "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"


def _mma_config(case):
    from mhc_kernels.tilelang_src import norm

    _, k, arch, n, C, dt, mode, bt, bk, splits = case
    return dict(norm.default_config("norm_fn", common.Shape(4096, n, C, DTYPES[dt])), mma=mode, block_T=bt,
                block_K=bk, split_K=splits)


def _mma_case_id(c):
    return f"{c[1]}-{c[2]}-n{c[3]}-C{c[4]}-{c[5]}-{c[6]}-bt{c[7]}-bk{c[8]}-s{c[9]}"


def _build_segmented(case):
    """A Sinkhorn backward kernel at its default config for a large iteration count (ck_stride > 1)."""
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    from mhc_kernels.tilelang_src import mixes

    name, n, iters = case
    cfg = mixes.default_config(name, common.Shape(4096, n, 1, torch.float32), iters)
    src, ptx, dyn, hazards = aot._lower_to_ptx(common.KERNELS[name].build(n, 1, torch.float32, cfg, iters=iters),
                                               "sm_90a")
    res = ptxas.resources(ptx, "sm_90a")
    return {"config": cfg, "source": src, "registers": max(r.registers for r in res),
            "spills": sum(r.spills for r in res), "smem_bytes": max(r.smem_bytes for r in res) + dyn,
            "hazards": hazards}


def _request(case) -> tuple[str, dict]:
    """(arch, aot.compile_many request) of a PTX-only case of CASES, MMA_CASES, VARIANTS or FP8_TAILS."""
    if case[0] == "mma":
        _, k, arch, n, C, dt, *_ = case
        return arch, dict(name=k, n=n, C=C, dtype=DTYPES[dt], config=_mma_config(case))
    if case[0] in ("variant", "fp8"):
        _, k, n, consts = case
        kdef = common.KERNELS[k]
        return "sm_90a", dict(name=k, n=n, C=4096, dtype=torch.bfloat16, consts=dict(consts),
                              config=aot._config_for(kdef, n, 4096, torch.bfloat16))
    k, arch, n, C, dt, _ = case
    return arch, dict(name=k, n=n, C=C, dtype=DTYPES[dt])


def _build_batch(batch):
    """One worker's share: (arch, [case]) through aot.compile_many (one nvcc -ptx and one ptxas for the lot)."""
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    aot.kernel_names()
    arch, cases = batch
    return aot.compile_many([_request(c)[1] for c in cases], arch)


def _batches(cases, size=16):
    by_arch = {}
    for c in cases:
        by_arch.setdefault(_request(c)[0], []).append(c)
    return [(arch, cs[i:i + size]) for arch, cs in by_arch.items() for i in range(0, len(cs), size)]


@pytest.fixture(scope="module")
def records():
    """Every build of the module, once, on ``MHC_TL_COMPILE_WORKERS`` (2) processes: the full builds one by one
    (tilelang.compile), the PTX-only ones in batches of 16 per arch (aot.compile_many)."""
    workers = int(os.environ.get("MHC_TL_COMPILE_WORKERS", "2"))
    ctx = __import__("multiprocessing").get_context("spawn")
    aot.kernel_names()
    ptx_only = [c for c in CASES if not c[5]] + MMA_CASES + VARIANTS + FP8_TAILS
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        full = [c for c in CASES if c[5]]
        recs = dict(zip(full, pool.map(_build, full)))
        batches = _batches(ptx_only)
        for (_, cases), built in zip(batches, pool.map(_build_batch, batches)):
            recs.update(zip(cases, built))
        recs["sinkhorn_iters7"] = pool.submit(_build_sinkhorn, 7).result()
        recs["tail_iters7"] = pool.submit(_build_sinkhorn, 7, "mhc_pre_tail").result()
        recs.update(zip(SEGMENTED, pool.map(_build_segmented, SEGMENTED)))
    return recs


def _comparable(ptx):
    """PTX without what depends on a function's place in its module: .loc source lines, block label numbers."""
    ptx = re.sub(r"\$L__BB\d+_", "$L__BB_", ptx)
    return "\n".join(line for line in ptx.splitlines() if not line.lstrip().startswith(".loc"))


def test_batched_builds_report_each_kernels_own_resources(records):
    """aot.compile_many (one nvcc and ptxas per batch) gives the record compile_one gives alone: the same source,
    registers, spills and shared memory, for kernels of one batch that differ in registers (n=8 vs n=1) and for
    one with dynamic shared memory; its PTX is the kernel's own entry."""
    for case in [("post_fwd", "sm_90a", 8, 4096, "bf16", False), ("post_fwd", "sm_90a", 1, 4096, "bf16", False),
                 ("mhc_pre_tail", "sm_90a", 8, 4096, "bf16", False)]:
        alone = aot.compile_one(*case[:4], DTYPES[case[4]], full=False)
        batched = records[case]
        for key in ("source", "registers", "spills", "smem_bytes", "ok", "config"):
            assert batched[key] == alone[key], (case, key)
        # the same instructions, up to the renamed kernel and its place in the batch
        (entry,) = [m.group(0) for m in aot._PTX_ENTRY.finditer(alone["ptx"])]
        assert _comparable(re.sub(r"__b\d+", "", batched["ptx"])) == _comparable(entry), case
    assert records[("post_fwd", "sm_90a", 8, 4096, "bf16", False)]["registers"] != \
        records[("post_fwd", "sm_90a", 1, 4096, "bf16", False)]["registers"], "n=8 and n=1 must not share a report"


def test_no_kernel_has_a_hazard_the_emulator_cannot_show(records):
    """Two things the CPU emulator cannot see, checked on every build of the sweep (aot._lower):

    * TileLang's barrier planner warns when a barrier that a shared-memory conflict needs would sit in a branch
      that threads take differently: it hoists the barrier out, and the two accesses are no longer separated.
      The emulator runs threads one after another, so it agrees with the oracle even when a GPU would race.
    * The grid at any token count fits CUDA's launch limits (blockIdx.y and .z at most 65535): the emulator
      runs any grid, a GPU refuses one past them."""
    checked = [k for k, r in records.items() if isinstance(r, dict) and "hazards" in r]
    assert len(checked) >= len(CASES), "every build must report its hazards"
    found = {str(k): r["hazards"] for k, r in records.items() if isinstance(r, dict) and r.get("hazards")}
    assert not found, found


def _racy_kernel():
    """Thread t writes s[t], then reads s[63 - t], in a loop under ``if token < T`` (one token per thread): a real
    cross-thread race in a branch that threads take differently."""
    import tilelang.language as T

    Tn = T.dynamic("T")

    @T.prim_func
    def racy(x: T.Tensor((Tn,), "float32"), y: T.Tensor((Tn,), "float32")):
        with T.Kernel(T.ceildiv(Tn, 64), threads=64) as bx:
            tx = T.get_thread_binding(0)
            s = T.alloc_shared((64,), "float32")
            if bx * 64 + tx < Tn:
                for i in T.serial(4):
                    s[tx] = x[bx * 64 + tx] * i
                    y[bx * 64 + tx] += s[63 - tx]

    return racy


def test_the_hazard_checks_see_what_they_are_for():
    """The checks above are only as good as their patterns: a real race must draw TileLang's warning, in the
    words this TileLang prints it, and token blocks on blockIdx.y must break the launch limits (on x they fit)."""
    _, _, hazards = aot._lower(_racy_kernel(), "sm_90a")
    assert len(hazards) == 1 and "ThreadSync" in hazards[0] and "Hoisting sync" in hazards[0], hazards
    _, _, hazards = aot._lower(tilelang_checks.copy_kernel(tokens_on_x=False), "sm_90a")
    assert len(hazards) == 1 and "blockIdx.y extent 268435456 > 65535" in hazards[0], hazards
    assert aot._lower(tilelang_checks.copy_kernel(tokens_on_x=True), "sm_90a")[2] == []


def test_sync_warnings_takes_only_the_threadsync_lines(capfd):
    """aot.sync_warnings reads what TileLang's C++ logging writes to file descriptor 2: the ThreadSync warnings go
    into the list, everything else is written back to stderr."""
    got = []
    with aot.sync_warnings(got):
        os.write(2, b"[01:12:30] : Warning: [ThreadSync] Hoisting sync out of an if. Condition: tx < T_1\n"
                    b"some other message\n")
    assert got == ["Hoisting sync out of an if. Condition: tx < T_1"]
    err = capfd.readouterr().err
    assert "some other message" in err and "ThreadSync" not in err


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_compiles_without_spills(records, case):
    rec = records[case]
    assert rec["error"] is None or rec["ok"], f"{_case_id(case)} failed: {rec['error']}"
    assert rec["ok"], rec["error"]
    assert rec["spills"] == 0
    assert 0 < rec["registers"] <= 255
    assert rec["smem_bytes"] <= ptxas.SMEM_LIMIT_BYTES[case[1]]
    src = rec["source"]
    assert "atomic" not in src.lower(), "reductions must be deterministic (no atomics)"
    assert re.search(r"\bint T\b", src), "the token count must be a runtime (symbolic) dim"


def _src(records, kernel, n=4, C=4096, dt="bf16", arch="sm_90a"):
    for c, r in records.items():
        if isinstance(c, tuple) and c[:5] == (kernel, arch, n, C, dt):
            return r["source"]
    raise KeyError(kernel)


def _global_load_sites(src, name):
    """Number of places the kernel reads global tensor ``name`` (vector or scalar loads)."""
    return len(re.findall(rf"=\s*\*\(\w+\*\)\({name} \+|=\s*{name}\[", src))


def test_post_reads_residual_once(records):
    for n in (1, 2, 4, 8):
        src = _src(records, "post_fwd", n=n)
        assert _global_load_sites(src, "residual") == 1, f"n={n}: the residual must be loaded at one site"
        assert "uint4" in src, "bf16 C=4096: 16-byte vector accesses"
        # the one load site sits in a loop over the n streams; nothing else in the body touches it
        body = "\n".join(line for line in src.splitlines() if "__global__" not in line)
        assert body.count("residual") == 1


def test_streaming_kernels_vectorised(records):
    for k in ("pre_apply_mix_fwd", "pre_apply_mix_bwd", "expand_fwd", "expand_bwd", "post_bwd"):
        assert "uint4" in _src(records, k), k
    assert "uint4" not in _src(records, "pre_apply_mix_fwd", C=201), "odd C: scalar accesses"


def test_sinkhorn_iteration_loops(records):
    # iters=20: the forward runs 19 (row, column) rounds after the first; the backward recomputes
    # them (19) and reverses them (19)
    loop19 = r"for \(int \w+ = 0; \w+ < 19; \+\+\w+\)"
    assert len(re.findall(loop19, _src(records, "sinkhorn_fwd"))) == 1
    assert len(re.findall(loop19, _src(records, "split_mixes_fwd"))) == 1
    assert len(re.findall(loop19, _src(records, "sinkhorn_bwd"))) == 2
    assert len(re.findall(loop19, _src(records, "split_mixes_bwd"))) == 2
    src7 = records["sinkhorn_iters7"]
    assert len(re.findall(r"for \(int \w+ = 0; \w+ < 6; \+\+\w+\)", src7)) == 1


def test_fused_pre_tail_overlaps_sinkhorn_with_the_collapse(records):
    loop19 = r"for \(int \w+ = 0; \w+ < 19; \+\+\w+\)"
    for n in (1, 2, 4, 8):
        src = _src(records, "mhc_pre_tail", n=n)
        # the configured Sinkhorn (iters=20: 19 rounds after the first), once
        assert len(re.findall(loop19, src)) == 1, n
        # the residual is read at one site (the collapse), 16 bytes at a time
        assert _global_load_sites(src, "x") == 1, n
        assert "uint4" in src
        # roles: threads below the collapse count stream, the extra warp runs the Sinkhorn; the only barrier
        # is the one publishing pre, before the roles split, so nothing serialises the two
        assert re.search(r"if \(\(\(int\)threadIdx.x\) < 128\) \{", src), n
        # a register budget that leaves room for 8 CTAs per SM (2 at n = 8); spills are checked above
        assert f"__launch_bounds__(160, {8 if n <= 4 else 2})" in src, n
        assert src.count("__syncthreads()") == 1, n
        sync, branch = src.index("__syncthreads()"), src.index("if (((int)threadIdx.x) < 128) {")
        assert sync < branch
        assert src.index("rsqrtf", branch) > 0  # the Sinkhorn warp finalises rstd/mixes after the split
    assert len(re.findall(r"for \(int \w+ = 0; \w+ < 6; \+\+\w+\)", records["tail_iters7"])) == 1


def test_fused_pre_norm_tail_normalises_beside_the_sinkhorn(records):
    """mhc_pre / post_pre with the sublayer's norm: one tail whose CTAs own whole rows (fused._build_pre_norm_tail)."""
    loop19 = r"for \(int \w+ = 0; \w+ < 19; \+\+\w+\)"
    for n in (1, 2, 4, 8):
        src = _src(records, "mhc_pre_norm_tail", n=n)
        # the configured Sinkhorn (iters=20), once; the residual read at one site (the collapse), 16 bytes at a time
        assert len(re.findall(loop19, src)) == 1, n
        assert _global_load_sites(src, "x") == 1 and "uint4" in src, n
        # the collapse u stored at one site, read back at one (by the thread that stored it) and rewritten at one
        assert _stores(src, "layer_input") == 2 and _global_load_sites(src, "layer_input") == 1, n
        assert "part_usq" not in src and "residual" not in src, n
        # two barriers, both outside the roles: pre published, then the token statistics; between them the
        # collapse threads stream while the extra warp runs the Sinkhorn; rho after the second
        assert src.count("__syncthreads()") == 2, n
        first = src.index("__syncthreads()")
        second = src.index("__syncthreads()", first + 1)
        branch = src.index("if (((int)threadIdx.x) < 128) {")
        assert first < branch < src.index("} else {", branch) < second, n
        assert src.index("rsqrtf", second) > second and "out_rstd" in src[second:], n
        # a register budget that leaves room for 7 CTAs per SM (2 at n = 8); spills are checked above
        assert f"__launch_bounds__(160, {7 if n <= 4 else 2})" in src, n


def test_fused_post_project_reads_and_writes_the_residual_once(records):
    for n in (1, 2, 4, 8):
        src = _src(records, "post_project", n=n)
        # residual and layer output read at one site each, the new residual stored at one site and never
        # read back (the projection takes it from the staged tile)
        assert _global_load_sites(src, "residual") == 1, n
        assert _global_load_sites(src, "y") == 1, n
        assert _global_load_sites(src, "out") == 0, n
        assert len(re.findall(r"\*\(uint4\*\)\(out \+", src)) == 1, n
        assert _global_load_sites(src, "fn") == 1, n
        assert "rsqrtf" not in src, "partials only: the tail finalises"


def _stores(src, name):
    return len(re.findall(rf"\*\(uint4\*\)\({name} \+[^;]*\) =", src))


def test_single_pass_projections_read_the_residual_once(records):
    """mhc_pre_sp / post_pre_sp's main loops (contract §14): the residual (and the layer output) read at one
    site, the collapse formed from the staged values -- the layer input (and the new residual) stored at
    one site and never read back; partials only (the tail finalises)."""
    variants = [(_src(records, k, n=n), k, n, "mix", "") for k in ("pre_sp_project", "post_pre_sp_project")
                for n in (1, 2, 4, 8)]
    variants += [(r["source"], c[1], c[2], dict(c[3])["collapse"], " fold" if dict(c[3]).get("fold") else "")
                 for c, r in records.items()
                 if isinstance(c, tuple) and c[0] == "variant" and c[1] in ("pre_sp_project", "post_pre_sp_project")]
    for src, k, n, collapse, fold in variants:
        where = f"{k} n={n} {collapse}{fold}"
        assert _global_load_sites(src, "residual") == 1, where
        assert _global_load_sites(src, "layer_input") == 0 and _stores(src, "layer_input") == 1, where
        assert _global_load_sites(src, "fn") == 1, where
        assert ("prev_pre" in src) == (collapse == "mix"), where
        assert "rsqrtf" not in src, where
        if k == "post_pre_sp_project":
            assert _global_load_sites(src, "y") == 1, where
            assert _global_load_sites(src, "out") == 0 and _stores(src, "out") == 1, where
        else:
            assert "out" not in re.findall(r"\w+", src.split("{", 1)[0]), where


def test_single_pass_tail_normalises_in_place_beside_the_sinkhorn(records):
    loop19 = r"for \(int \w+ = 0; \w+ < 19; \+\+\w+\)"
    for n in (1, 2, 4, 8):
        src = _src(records, "mhc_pre_sp_tail", n=n)
        assert len(re.findall(loop19, src)) == 1, n
        # the rounded collapse read once and rewritten once, 16 bytes at a time; the residual is not an argument
        assert _global_load_sites(src, "layer_input") == 1 and _stores(src, "layer_input") == 1, n
        assert "residual" not in src and "part_usq" in src, n
        # one barrier, publishing the token statistics, before the roles split
        assert src.count("__syncthreads()") == 1, n
        assert f"__launch_bounds__(160, {8 if n <= 4 else 2})" in src, n
    for c, r in records.items():
        if isinstance(c, tuple) and c[:2] == ("variant", "mhc_pre_sp_tail"):
            assert r["spills"] == 0, c
            src = r["source"]
            assert "layer_input" not in src.split("{", 1)[1], "without the norm the layer input is left alone"
            assert "__syncthreads" not in src and len(re.findall(loop19, src)) == 1, c


def test_single_pass_variants_compile_without_spills(records):
    for c, r in records.items():
        if isinstance(c, tuple) and c[0] == "variant":
            assert r["spills"] == 0 and 0 < r["registers"] <= 255, c
            assert r["smem_bytes"] <= ptxas.SMEM_LIMIT_BYTES["sm_90a"], c


def test_folded_projections_multiply_fn_by_the_norm_weight_as_they_stage_it(records):
    """norm_weight folded in the kernel (no torch multiply in front): read at one site beside fn, the residual still
    once; the default (unfolded) builds do not read it."""
    for c in FOLDED:
        src = records[c]["source"]
        assert _global_load_sites(src, "norm_weight") == 1 and _global_load_sites(src, "fn") == 1, c
        assert _global_load_sites(src, "residual" if c[1] != "mhc_pre_project" else "x") == 1, c
        assert _global_load_sites(_src(records, c[1], n=8), "norm_weight") == 0, c


def test_fused_pre_tail_deals_every_token_to_one_sinkhorn_lane():
    from mhc_kernels.tilelang_src import fused

    for C in (1, 200, 201, 1280, 4096, 7168):
        for T in (1, 13, 4096):
            for dt in DTYPES.values():
                for cfg in fused.config_space("mhc_pre", common.Shape(T, 4, C, dt)):
                    bt, ncb = cfg["tail"]["block_T"], common.cdiv(C, cfg["tail"]["block_C"])
                    hits = [fused.sinkhorn_token(cb, lane, q, ncb)
                            for cb in range(ncb) for lane in range(fused.SINKHORN_WARP)
                            for q in range(fused.sinkhorn_passes(bt, ncb))]
                    hits = sorted(t for t in hits if t < bt)
                    assert hits == list(range(bt)), (C, T, cfg)


@pytest.mark.parametrize("case", SEGMENTED, ids=lambda c: f"{c[0]}-n{c[1]}-iters{c[2]}")
def test_sinkhorn_backward_recomputes_in_segments_when_checkpoints_do_not_fit(records, case):
    from mhc_kernels.tilelang_src import mixes

    rec = records[case]
    name, n, iters = case
    stride, bt = rec["config"]["ck_stride"], rec["config"]["block_T"]
    assert stride > 1 and bt >= mixes.MIN_BWD_BLOCK_T, rec["config"]
    assert rec["spills"] == 0 and 0 < rec["registers"] <= 255
    assert rec["smem_bytes"] <= mixes.SMEM_BUDGET
    assert rec["smem_bytes"] >= bt * mixes.ck_slots(iters, stride) * n * n * 4
    src = rec["source"]
    # forward: a loop over the segments, each checkpointing its first round's input; reverse: the segments
    # again, each one's rounds re-run from its checkpoint (slot indices affine in the counters: no division)
    nseg = mixes.ck_slots(iters, stride) - 1
    assert len(re.findall(rf"for \(int \w+ = 0; \w+ < {nseg}; \+\+\w+\)", src)) == 2
    assert not re.search(rf"for \(int \w+ = 0; \w+ < {iters - 1}; \+\+\w+\)", src), "not one round at a time"
    assert re.search(r"for \(int _q = 0; _q < ", src)
    assert not re.search(r"ck\[[^\]]*/", src), "a checkpoint slot index divides"


def _sinkhorn_vjp_with_checkpoint_schedule(logits, grad, iters, eps, stride):
    """NumPy transcription of the TileLang ``sinkhorn_bwd`` macro's schedule (slot 0 = S, slot 1 + s = the
    input of round s * stride, the first of segment s; in reverse, segments last to first and each one's
    rounds last to first, round j of a segment rebuilt by re-running j rounds from its checkpoint), to check
    its loop bounds and slot indices against the float64 oracle's gradient."""
    import numpy as np

    def rows(P):
        d = P.sum(-1, keepdims=True) + eps
        return P / d, d

    def cols(P):
        d = P.sum(-2, keepdims=True) + eps
        return P / d, d

    Lg = logits - logits.max(-1, keepdims=True)
    S = np.exp(Lg) / np.exp(Lg).sum(-1, keepdims=True)
    nseg = -(-(iters - 1) // stride)

    def seg_len(sg):
        return min(stride, iters - 1 - sg * stride)

    ck = {0: S.copy()}
    P, _ = cols(S + eps)
    for sg in range(nseg):
        ck[1 + sg] = P.copy()
        for _ in range(seg_len(sg)):
            P, _ = cols(rows(P)[0])
    G = grad.copy()
    for rs in range(nseg):
        for jj in range(seg_len(nseg - 1 - rs)):
            P = ck[nseg - rs].copy()
            for _ in range(seg_len(nseg - 1 - rs) - 1 - jj):
                P, _ = cols(rows(P)[0])
            Q, d_row = rows(P)
            d_col = Q.sum(-2, keepdims=True) + eps
            G = (G - (G * (Q / d_col)).sum(-2, keepdims=True)) / d_col
            G = (G - (G * Q).sum(-1, keepdims=True)) / d_row
    P0 = ck[0] + eps
    d_col = P0.sum(-2, keepdims=True) + eps
    G = (G - (G * (P0 / d_col)).sum(-2, keepdims=True)) / d_col
    return (G - (G * ck[0]).sum(-1, keepdims=True)) * ck[0]


@pytest.mark.parametrize("iters,stride", [(20, 1), (20, 3), (7, 6), (1, 1), (33, 8)])
def test_checkpoint_schedule_gives_the_exact_sinkhorn_gradient(iters, stride):
    import numpy as np

    from mhc_kernels.reference import oracle

    rng = np.random.default_rng(iters * 10 + stride)
    logits = rng.standard_normal((5, 4, 4)) * 2
    grad = rng.standard_normal((5, 4, 4))
    eps = 1e-6
    got = _sinkhorn_vjp_with_checkpoint_schedule(logits, grad, iters, eps, stride)
    h = 1e-6  # central differences of <grad, sinkhorn(logits)> in float64
    want = np.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        up, dn = logits.copy(), logits.copy()
        up[idx] += h
        dn[idx] -= h
        f_up, f_dn = (grad * oracle.sinkhorn(up, iters, eps)).sum(), (grad * oracle.sinkhorn(dn, iters, eps)).sum()
        want[idx] = (f_up - f_dn) / (2 * h)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_norm_fn_single_pass(records):
    src = _src(records, "norm_fn_fwd")
    # x is read in one place (the staged tile feeds both the dot products and the sum of squares)
    assert _global_load_sites(src, "x") == 1
    assert "rsqrtf" in src


@pytest.mark.parametrize("case", MMA_CASES, ids=_mma_case_id)
def test_norm_fn_tensor_core_variant_compiles(records, case):
    from mhc_kernels.tilelang_src import norm

    rec = records[case]
    _, k, arch, n, C, dt, mode, bt, bk, splits = case
    assert rec["ok"], rec["error"]
    assert f"mma={mode}" in rec["config"]
    assert rec["spills"] == 0
    assert 0 < rec["registers"] <= 255
    assert rec["smem_bytes"] <= ptxas.SMEM_LIMIT_BYTES[arch]
    assert rec["smem_bytes"] <= norm.mma_smem_bytes(n * (n + 2), DTYPES[dt], bt, bk, mode), "estimate is an upper bound"
    assert TF32_MMA in rec["ptx"], "the projection must run on TF32 tensor cores"
    src = rec["source"]
    assert "kTensorFloat32" in src
    assert "atomic" not in src.lower()
    assert re.search(r"\bint T\b", src), "the token count must be a runtime (symbolic) dim"
    assert "4294959104" in src, "operands are rounded to TF32 in the kernel (mask ~0x1fff)"
    # x: chunk 0 before the main loop and chunk i+1 inside it (each element read once); fn: one site
    assert _global_load_sites(src, "x") == 2
    assert _global_load_sites(src, "fn") == 1
    assert ("rsqrtf" in src) == (k == "norm_fn_fwd")


def test_norm_fn_default_stays_fma(records):
    from mhc_kernels.tilelang_src import norm

    for n in (1, 2, 4, 8):
        for C in (200, 4096):
            for T in (1, 4096, 65536):
                for dt in DTYPES.values():
                    s = common.Shape(T, n, C, dt)
                    assert norm.default_config("norm_fn", s)["mma"] == "fma"
                    assert backend.OPS["norm_fn"].default(s)["mma"] == "fma"
    rec = records[("norm_fn_fwd", "sm_90a", 4, 4096, "bf16", True)]
    assert "mma=fma" in rec["config"]
    assert "mma.sync" not in rec["ptx"], "the default projection is plain float32 FMAs"


def test_norm_fn_config_space_has_tensor_core_candidates():
    from mhc_kernels.tilelang_src import norm

    for dt in DTYPES.values():
        for n in (1, 2, 4, 8):
            for C, T in ((4096, 4096), (200, 13)):
                s = common.Shape(T, n, C, dt)
                space = norm.config_space("norm_fn", s)
                mma = [c for c in space if c["mma"] != "fma"]
                assert mma, (n, C, dt)
                # plain tf32 misses the float32 tolerance: the tuner would only reject it
                assert {c["mma"] for c in mma} == {"3xtf32"}
                assert {c["split_K"] for c in mma} >= {1, 2, 4, 8}
                for c in mma:
                    assert c["block_T"] in (32, 64) and c["block_K"] in (64, 128, 256)
                    assert c["smem_bytes"] == norm.mma_smem_bytes(n * (n + 2), dt, c["block_T"], c["block_K"], "3xtf32")
                    assert c["smem_bytes"] <= norm.MMA_SMEM_BUDGET
                    assert norm.mma_acc_per_thread(n * (n + 2), dt, c["block_T"], c["block_K"], "3xtf32") \
                        <= norm.MMA_MAX_ACC
                assert space[0] == norm.default_config("norm_fn", s)  # the default (fma) comes first
    # the mode is part of each forward kernel's cache key
    s = common.Shape(4096, 4, 4096, torch.bfloat16)
    d = norm.default_config("norm_fn", s)
    for k in ("norm_fn_fwd", "norm_fn_fwd_splitk"):
        kdef = common.KERNELS[k]
        assert "mma" in kdef.keys
        assert kdef.cfg_of(d) != kdef.cfg_of(dict(d, mma="3xtf32")) != kdef.cfg_of(dict(d, mma="tf32"))
    with pytest.raises(ValueError, match="mma"):
        norm._build_fwd_fused(4, 4096, torch.bfloat16, dict(d, mma="tf16"))


def _round_tf32(t):
    """float32 -> nearest TF32, ties away from zero: the kernel's ``(bits + 0x1000) & ~0x1fff``."""
    b = t.to(torch.float32).contiguous().view(torch.int32)
    return ((b + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_tf32_split_meets_the_float32_contract_in_emulation(dtype):
    """Why config_space offers 3xtf32 and not tf32: the operand roundings of each mode, emulated exactly
    (float64 products and sums), against the oracle under the float32 tolerance of reference.cases."""
    from mhc_kernels.reference import cases, oracle, transcription

    inputs = cases.make_inputs("norm_fn", (64,), 4, 1280, dtype, "cpu", norm_weight=True)
    x, fn, nw, eps = inputs["residual"], inputs["fn"], inputs["norm_weight"], inputs["norm_eps"]
    expected = oracle.norm_fn(x, fn, nw, eps)
    naive = transcription.norm_fn(x, fn, nw, eps)
    xf = x.reshape(64, -1).float()
    f = fn * nw
    r = torch.rsqrt(xf.double().pow(2).mean(-1, keepdim=True) + eps)
    xh = _round_tf32(xf)
    xl = _round_tf32(xf - xh)
    fh = _round_tf32(f)
    fl = _round_tf32(f - fh)
    if dtype != torch.float32:
        assert torch.equal(xh, xf) and not xl.any(), "bf16 is exact in TF32"
    split = ((xh.double() @ fh.double().T + xh.double() @ fl.double().T) + xl.double() @ fh.double().T) * r
    plain = (xh.double() @ fh.double().T) * r
    assert cases.compare("3xtf32", split.float(), expected, naive=naive).worst_ratio < 0.05
    assert cases.compare("tf32", plain.float(), expected, naive=naive).worst_ratio > 2


# -- CPU-only checks of the backend's contract (no compilation) -------------------------------------------
def _call(op, n=4, C=4096, dtype=torch.bfloat16, device="cuda", **args):
    from mhc_kernels.specs import SPECS

    spec = SPECS[op]
    return SimpleNamespace(spec=spec, T=16, n=n, C=C, dtype=dtype, device=torch.device(device),
                           iters=args.get("iters", 20) if any("iters" in a for a in spec.arg_names) else None,
                           alignment=args.get("alignment", ()))


def test_supports_refuses_with_reasons():
    sup = backend.supports
    assert sup(_call("post")) is None
    assert "CUDA" in sup(_call("post", device="cpu"))
    assert "float64" in sup(_call("post", dtype=torch.float64))
    assert "n <= 8" in sup(_call("post", n=16))
    assert sup(_call("sinkhorn_bwd", n=8)) is None
    # checkpoints for every round would need 1000 * 256 B per token: served with segment recompute
    assert sup(_call("sinkhorn_bwd", n=8, iters=MAX_SINKHORN_ITERS)) is None
    assert sup(_call("split_mixes_bwd", n=8, iters=MAX_SINKHORN_ITERS)) is None
    # tensors off a 16-byte boundary (Call.alignment: name, pointer alignment, row alignment): a residual-dtype
    # tensor needs its rows' alignment (vectors lie inside a token's row), the float32 mixes 16 bytes
    assert "'residual' starts at an address aligned to 2 bytes" in sup(_call("post", alignment=(("residual", 2, 16),)))
    assert sup(_call("post", alignment=(("residual", 8, 8),))) is None
    assert "need it 16-byte aligned" in sup(_call("post", alignment=(("post_mix", 8, 8),)))


def test_every_op_registered_with_configs():
    """Every op has a TileLang kernel (its own, or the shared composite of its kernels) whose default config
    is a point of its space; the ops with kernels of their own are the primitives and the fused mhc_pre /
    post_pre and their single-pass versions, and mhc_head_sp (the collapse and its norm in one kernel)."""
    from mhc_kernels import composite, registry
    from mhc_kernels.autotune.inputs import fabricate_call
    from mhc_kernels.specs import SPECS

    fused = {"mhc_pre", "post_pre", "mhc_pre_sp", "post_pre_sp", "mhc_head_sp"}
    assert set(backend.OPS) == (set(SPECS) - set(composite.COMPOSITES)) | fused
    for op in SPECS:
        k = registry.get_kernel(op, "tilelang")
        assert k is not None and k.tunable, op
        for n in (1, 2, 4, 8):
            for C in (1, 200, 4096):
                if op == "quantize_fp8" and C % 32:
                    continue   # refused at the boundary: FP8 groups must be whole
                for T in (1, 13, 16384):
                    call = fabricate_call(op, T, n, C, torch.bfloat16)
                    cfg = k.default_config(call)
                    assert isinstance(cfg, dict) and cfg
                    assert cfg in k.config_space(call), (op, n, C, T)


def test_streaming_configs_valid():
    from mhc_kernels.tilelang_src import streaming

    for op in ("pre_apply_mix", "pre_apply_mix_bwd", "post", "post_bwd", "expand", "expand_bwd"):
        for dt in DTYPES.values():
            for C in (1, 3, 200, 201, 1280, 4096, 7168):
                s = common.Shape(64, 4, C, dt)
                for cfg in streaming.config_space(op, s):
                    assert streaming._valid(cfg), (op, C, cfg)
                    assert C % cfg["vec"] == 0 and cfg["vec"] * common.elem_bytes(dt) <= 16


def test_fp8_tails_quantise_the_stored_layer_input_after_a_barrier(records):
    """The tails with the FP8 copy (fused.py): spill-free at their register budgets (the norm tail asks for 6 CTAs
    per SM, the others keep 8), the codes stored 8 bytes at a time at one site and the scales at one; where the
    tail writes the layer input, the copy follows the CTA's last barrier and re-reads what it stored (the amax
    pass and the codes pass); the non-normalising single-pass tail reads the projection's layer input beside
    its Sinkhorn warp, with no barrier."""
    bounds = {"mhc_pre_tail": 8, "mhc_pre_norm_tail": 6, "mhc_pre_sp_tail": 8}
    syncs = {"mhc_pre_tail": 2, "mhc_pre_norm_tail": 3, ("mhc_pre_sp_tail", True): 2, ("mhc_pre_sp_tail", False): 0}
    for case in FP8_TAILS:
        rec, (_, k, _, consts) = records[case], case
        consts = dict(consts)
        where = f"{k} {consts}"
        assert rec["ok"] and rec["spills"] == 0 and 0 < rec["registers"] <= 255, (where, rec["error"])
        src = rec["source"]
        assert f"__launch_bounds__(160, {bounds[k]})" in src, where
        nsync = syncs.get((k, consts.get("normalize")), syncs.get(k))
        assert src.count("__syncthreads()") == nsync, where
        assert len(re.findall(r"\*\(uint2\*\)\(fp8_codes \+[^;]*\) =", src)) == 1, where
        assert len(re.findall(r"fp8_scales\[[^;]*\] =", src)) == 1, where
        assert _global_load_sites(src, "fp8_codes") == 0 and _global_load_sites(src, "fp8_scales") == 0, where
        if nsync:
            assert src.rindex("__syncthreads()") < src.index("fp8_codes +"), where
            assert _global_load_sites(src[src.rindex("__syncthreads()"):], "layer_input") == 2, where
        else:
            assert _stores(src, "layer_input") == 0 and _global_load_sites(src, "layer_input") == 2, where
