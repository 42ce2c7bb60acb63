"""The benchmark runner: every op x implementation x shape, timed, with derived metrics.

Targets (:data:`TARGETS`):

* every forward op of :data:`~mhc_kernels.specs.FORWARD_OPS` in inference (no grad),
  which includes the fused paths ``mhc_pre`` (projection + split + collapse) and
  ``post_pre`` (post of one sublayer + pre of the next);
* every backward op of :data:`~mhc_kernels.specs.BACKWARD_OPS`, called directly with
  the forward's saved tensors and random upstream gradients;
* ``mhc_site``: one full mHC site, ``mhc_pre -> (identity sublayer) -> mhc_post``,
  forward and backward (``torch.autograd.grad`` w.r.t. residual, fn, scale, base).

Implementations: each backend (forced with :func:`mhc_kernels.use_backend`, called
through the op bodies / public functions exactly as users reach them, validation
included), and two baselines built from the plain PyTorch transcription of
the contract (``mhc_kernels.reference.transcription``): ``eager`` and ``compile``
(the same under ``torch.compile``). For a backward op the baselines run the
transcription's forward once (outside the timed region) and time its autograd
backward (``retain_graph=True``); for ``mhc_site`` they time forward + backward.

Inputs come from the project's one input recipe (:func:`mhc_kernels.reference.cases.op_inputs`)
for a small token tile (at most 64 tokens), tiled along the token dim to ``T`` on the
device, so huge shapes cost no float64 staging. Bytes and FLOPs come from the op specs only
(:mod:`mhc_kernels.specs`): ``mhc_site`` counts ``mhc_pre + post`` forward and
``post_bwd + mhc_pre_bwd`` (residual gradient accumulated in place) backward.

A shape whose estimated working set does not fit in free memory is skipped with a
note; any failure of one measurement becomes a ``skipped``/``error`` record, never an
abort.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import mhc_kernels as mk
from mhc_kernels import invariance, ops, registry
from mhc_kernels.errors import BackendError
from mhc_kernels.reference import cases, transcription
from mhc_kernels.specs import BACKWARD_OPS, FORWARD_OPS, SPECS

from .timing import Timing, time_fn

BASELINES = ("eager", "compile")
SITE = "mhc_site"


@dataclass(frozen=True)
class Target:
    name: str
    pass_: str  # "fwd", "bwd" or "fwd+bwd"
    forward_op: str  # the forward op whose inputs it uses


TARGETS: dict[str, Target] = {}
for _op in FORWARD_OPS:
    TARGETS[_op] = Target(_op, "fwd", _op)
for _op in BACKWARD_OPS:
    TARGETS[_op] = Target(_op, "bwd", _op[: -len("_bwd")])
TARGETS[SITE] = Target(SITE, "fwd+bwd", "mhc_pre")
# (multilayer_recompute, a forward op, runs with the recipe's cases.DEFAULT_LAYERS layers)

FUSED = ("mhc_pre", "post_pre", SITE)
# Single-pass mHC (contract §14): the spec bytes of post_pre_sp are its (2n+2)*C floor per token.
SINGLE_PASS = ("mhc_pre_sp", "post_pre_sp", "mhc_head_sp", "mhc_pre_sp_bwd", "mhc_head_sp_bwd")

# Upper bound of the working set of one measurement relative to the spec's minimum
# bytes (float32 intermediates of the reference and of autograd through the transcription).
_MEMORY_FACTOR = {"fwd": 6.0, "bwd": 8.0, "fwd+bwd": 12.0}


# -- bytes and FLOPs (from the specs only) -------------------------------------------------
def _present(op: str, args: dict) -> tuple[str, ...]:
    spec = SPECS[op]
    return tuple(a.name for a in spec.tensor_args if a.optional and args.get(a.name) is not None)


def site_bytes(T: int, n: int, C: int, dtype: torch.dtype) -> int:
    fwd = SPECS["mhc_pre"].bytes(T, n, C, dtype) + SPECS["post"].bytes(T, n, C, dtype)
    bwd = SPECS["post_bwd"].bytes(T, n, C, dtype) + SPECS["mhc_pre_bwd"].bytes(T, n, C, dtype, ("grad_residual",))
    return fwd + bwd


def site_flops(T: int, n: int, C: int, iters: int = 20) -> float:
    return sum(SPECS[o].flops(T, n, C, iters) for o in ("mhc_pre", "post", "post_bwd", "mhc_pre_bwd"))


def target_cost(target: str, T: int, n: int, C: int, dtype: torch.dtype, present: tuple[str, ...] = (),
                iters: int = 20, L: int = cases.DEFAULT_LAYERS) -> tuple[int, float]:
    """(minimum bytes, FLOPs) of one call, from the op specs; ``dtype`` is the residual dtype of the sweep,
    ``L`` the layers of a multilayer_recompute call (the benchmark's inputs have the recipe's default)."""
    if target == SITE:
        return site_bytes(T, n, C, dtype), site_flops(T, n, C, iters)
    spec = SPECS[target]
    if not spec.has_act:  # split_mixes, sinkhorn (and backward): the spec's dtype is the mix dtype
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return spec.bytes(T, n, C, dtype, present, L=L), spec.flops(T, n, C, iters, L=L)


# -- inputs (the one recipe: mhc_kernels.reference.cases.op_inputs) ---------------------------------------------
TILE = 64


def forward_inputs(op: str, T: int, n: int, C: int, dtype: torch.dtype, device, *, norm_weight: bool = False,
                   seed: int = 0) -> dict:
    """Named inputs of forward op ``op`` (schema argument names), ``T`` tokens, on ``device``."""
    return cases.op_inputs(op, T, n, C, dtype, device, norm_weight=norm_weight, seed=seed, tile=TILE)


def backward_pool(fwd_op: str, T: int, n: int, C: int, dtype: torch.dtype, device, *, norm_weight: bool = False,
                  seed: int = 0) -> dict:
    """Forward inputs, the forward's outputs (by spec output name) and a random upstream gradient
    ``grad_<output>`` for each non-auxiliary output, all with ``T`` tokens on ``device``."""
    return cases.backward_pool(fwd_op, T, n, C, dtype, device, norm_weight=norm_weight, seed=seed, tile=TILE)


def backward_args(bwd_op: str, pool: dict) -> dict:
    """The named arguments of backward op ``bwd_op`` taken from a :func:`backward_pool`."""
    spec = SPECS[bwd_op]
    out = {}
    for a in spec.arg_names:
        key = cases.GRAD_ALIASES.get((bwd_op, a), a)
        if key in pool:
            out[a] = pool[key]
        elif a in [t.name for t in spec.tensor_args if t.optional]:
            out[a] = None
        else:
            raise KeyError(f"{bwd_op}: no input for argument '{a}'")
    return out


# -- implementations ----------------------------------------------------------------------------
_COMPILED: dict = {}


def _compiled(key, fn):
    """One ``torch.compile`` wrapper per (target, kind), reused across shapes (dynamic after a recompile)."""
    if key not in _COMPILED:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        # backward baselines replay one forward's graph (retain_graph=True), which compiled
        # backwards that donate their saved buffers refuse; this process only benchmarks
        torch._functorch.config.donated_buffer = False
        _COMPILED[key] = torch.compile(fn)
    return _COMPILED[key]


def _transcription_fn(op: str) -> Callable[[dict], tuple]:
    case = cases.CASES[op]

    def f(d):
        return case.transcription(d)

    f.__name__ = f"transcription_{op}"
    return f


def _identity(t):
    return t


def _site_transcription(x, fn, scale, base):
    return transcription.mhc_site(x, _identity, fn, scale, base)


def _site_backend(x, fn, scale, base):
    li, post_mix, comb_mix = mk.mhc_pre(x, fn, scale, base)
    return mk.mhc_post(li, x, post_mix, comb_mix)


@dataclass
class Prepared:
    """Callables of one (target, shape): impl -> (context factory, fn) or a reason it was skipped."""

    bytes: int
    flops: float
    present: tuple
    runs: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)   # impl -> (bytes, present) where an impl moves other bytes (+fp8)


BATCH_INVARIANT_SUFFIX = "+bi"   # impl "<backend>+bi": the backend in batch-invariant mode (forward ops)
FP8_SUFFIX = "+fp8"              # impl "<backend>+fp8": a boundary op also writing the FP8 copy of its layer input
FP8_OUTPUTS = ("fp8_codes", "fp8_scales")


def fp8_group_for(C: int) -> int:
    """The FP8 group a ``+fp8`` run takes: 128 (e4m3_g128) where C allows it, else 32, else none (0)."""
    return 128 if C % 128 == 0 else 32 if C % 32 == 0 else 0


def prepare(target: str, T: int, n: int, C: int, dtype: torch.dtype, device, backends, baselines,
            batch_invariant: bool = False, fp8: bool = False) -> Prepared:
    tg = TARGETS[target]
    dev = torch.device(device)
    nograd = torch.no_grad
    if tg.pass_ == "fwd":
        d = forward_inputs(target, T, n, C, dtype, dev)
        spec = SPECS[target]
        args = [d[a] for a in spec.arg_names]
        nbytes, flops = target_cost(target, T, n, C, dtype, _present(target, d))
        p = Prepared(nbytes, flops, _present(target, d))
        body = ops.BODIES[target]
        for b in backends:
            p.runs[b] = (lambda b=b: _ctx(nograd(), registry.use_backend(b)), lambda: body(*args))
            if batch_invariant:   # the mode's cost: the same op with the fixed-token-count configs
                p.runs[b + BATCH_INVARIANT_SUFFIX] = (
                    lambda b=b: _ctx(nograd(), registry.use_backend(b), invariance.batch_invariant()),
                    lambda: body(*args))
            group = fp8_group_for(C)
            if fp8 and "fp8_group" in spec.arg_names and group:   # the copy's cost: its bytes count too
                fargs = [group if a == "fp8_group" else d[a] for a in spec.arg_names]
                present = _present(target, d) + FP8_OUTPUTS
                p.costs[b + FP8_SUFFIX] = (spec.bytes(T, n, C, dtype, present, G=C // group), present)
                p.runs[b + FP8_SUFFIX] = (lambda b=b: _ctx(nograd(), registry.use_backend(b)),
                                          lambda fargs=fargs: body(*fargs))
        tfn = _transcription_fn(target)
        if "eager" in baselines:
            p.runs["eager"] = (nograd, lambda: tfn(d))
        if "compile" in baselines:
            cfn = _compiled((target, "fwd"), tfn)
            p.runs["compile"] = (nograd, lambda: cfn(d))
        return p

    if tg.pass_ == "bwd":
        fwd = tg.forward_op
        pool = backward_pool(fwd, T, n, C, dtype, dev)
        a = backward_args(target, pool)
        args = [a[k] for k in SPECS[target].arg_names]
        present = _present(target, a)
        nbytes, flops = target_cost(target, T, n, C, dtype, present)
        p = Prepared(nbytes, flops, present)
        body = ops.BODIES[target]
        for b in backends:
            p.runs[b] = (lambda b=b: _ctx(nograd(), registry.use_backend(b)), lambda: body(*args))
        fspec = SPECS[fwd]
        grads = [pool["grad_" + o.name] for o in fspec.outputs if not o.aux]
        for kind in baselines:
            tfn = _transcription_fn(fwd)
            if kind == "compile":
                tfn = _compiled((fwd, "autograd"), tfn)
            leaves = {k: pool[k].detach().clone().requires_grad_() for k in cases.CASES[fwd].differentiable
                      if pool.get(k) is not None}
            dd = {k: pool[k] for k in cases.CASES[fwd].uses if k in pool}
            dd.update({k: v for k, v in pool.items() if k in SPECS[fwd].arg_names})
            dd.update(leaves)
            p.runs[kind] = (torch.enable_grad, _autograd_runner(tfn, dd, list(leaves.values()), grads))
        return p

    # mhc_site: forward + backward
    d = forward_inputs("mhc_pre", T, n, C, dtype, dev)
    nbytes, flops = target_cost(SITE, T, n, C, dtype)
    p = Prepared(nbytes, flops, ("grad_residual",))
    g = forward_inputs("mhc_pre", T, n, C, dtype, dev, seed=7)["residual"]  # a residual-shaped upstream gradient
    leaves = [d[k].detach().clone().requires_grad_() for k in ("residual", "fn", "scale", "base")]

    def site_runner(f):
        def run():
            out = f(*leaves)
            return torch.autograd.grad(out, leaves, g)
        return run

    for b in backends:
        p.runs[b] = (lambda b=b: _ctx(torch.enable_grad(), registry.use_backend(b)), site_runner(_site_backend))
    if "eager" in baselines:
        p.runs["eager"] = (torch.enable_grad, site_runner(_site_transcription))
    if "compile" in baselines:
        p.runs["compile"] = (torch.enable_grad, site_runner(_compiled((SITE, "fwd+bwd"), _site_transcription)))
    return p


def _autograd_runner(tfn, dd, leaves, grads):
    state = {}

    def run():
        if "outs" not in state:  # the forward runs once, on the first (warm-up) call
            outs = tfn(dd)
            state["outs"] = outs if isinstance(outs, (tuple, list)) else (outs,)
        return torch.autograd.grad(state["outs"], leaves, grads[:len(state["outs"])], retain_graph=True)

    return run


@contextlib.contextmanager
def _ctx(*cms):
    with contextlib.ExitStack() as st:
        for cm in cms:
            st.enter_context(cm)
        yield


# -- memory guard ----------------------------------------------------------------------------------
def free_memory(device) -> Optional[int]:
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def too_big(target: str, T: int, n: int, C: int, dtype, device) -> Optional[str]:
    nbytes, _ = target_cost(target, T, n, C, dtype)
    need = nbytes * _MEMORY_FACTOR[TARGETS[target].pass_]
    free = free_memory(device)
    if free is not None and need > 0.8 * free:
        return f"needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
    return None


# -- the sweep --------------------------------------------------------------------------------------
@dataclass
class Measurement:
    """Raw result of one (target, impl, shape): a timing or a reason there is none."""

    target: str
    impl: str
    T: int
    n: int
    C: int
    dtype: torch.dtype
    bytes: int
    flops: float
    present: tuple
    timing: Optional[Timing] = None
    status: str = "ok"  # ok | skipped | error
    note: str = ""


@dataclass
class SweepConfig:
    targets: list
    backends: list
    baselines: list
    tokens: list
    ns: list
    hiddens: list
    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    budget_s: float = 0.3
    min_repeats: int = 5
    max_repeats: int = 100
    warmup: int = 2

    batch_invariant: bool = False   # also time each backend's forward ops in batch-invariant mode
    fp8: bool = False               # also time each backend's boundary ops writing the FP8 copy

    def impls(self) -> list:
        bi = [b + BATCH_INVARIANT_SUFFIX for b in self.backends] if self.batch_invariant else []
        f8 = [b + FP8_SUFFIX for b in self.backends] if self.fp8 else []
        return list(self.backends) + bi + f8 + list(self.baselines)

    def shapes(self) -> list:
        return [(T, n, C) for n in self.ns for C in self.hiddens for T in self.tokens]

    def total(self) -> int:
        return len(self.targets) * len(self.shapes()) * len(self.impls())


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_sweep(cfg: SweepConfig, progress: Optional[Callable[[str], None]] = None) -> list[Measurement]:
    """Measure every (shape, target, impl) of ``cfg``; ``progress(description)`` is called after each."""
    dev = torch.device(cfg.device)
    out: list[Measurement] = []
    tick = progress or (lambda desc: None)
    for (T, n, C) in cfg.shapes():
        for target in cfg.targets:
            base = dict(target=target, T=T, n=n, C=C, dtype=cfg.dtype)
            nbytes, flops = target_cost(target, T, n, C, cfg.dtype)
            reason = too_big(target, T, n, C, cfg.dtype, dev)
            prep = None
            if reason is None:
                try:
                    prep = prepare(target, T, n, C, cfg.dtype, dev, cfg.backends, cfg.baselines,
                                   cfg.batch_invariant, cfg.fp8)
                except Exception as e:  # noqa: BLE001 -- reported as a record, the sweep goes on
                    reason = f"inputs could not be built: {type(e).__name__}: {e}"
            for impl in cfg.impls():
                desc = f"{target} {impl} T={T} n={n} C={C}"
                if prep is None:
                    out.append(Measurement(**base, impl=impl, bytes=nbytes, flops=flops, present=(),
                                           status="skipped", note=reason))
                    tick(desc)
                    continue
                nb, pr = prep.costs.get(impl, (prep.bytes, prep.present))
                m = Measurement(**base, impl=impl, bytes=nb, flops=prep.flops, present=pr)
                if impl not in prep.runs:   # "+bi" of a backward target, "+fp8" of an op without the copy
                    m.status, m.note = "skipped", (
                        "the FP8 copy is written by the boundary ops only (mhc_pre, post_pre, mhc_pre_sp, "
                        "post_pre_sp), with C a multiple of 32" if impl.endswith(FP8_SUFFIX) else
                        "batch-invariant mode changes forward ops only")
                    out.append(m)
                    tick(desc)
                    continue
                ctx, fn = prep.runs[impl]
                try:
                    with ctx():
                        m.timing = time_fn(fn, dev, warmup=cfg.warmup, min_repeats=cfg.min_repeats,
                                           max_repeats=cfg.max_repeats, budget_s=cfg.budget_s)
                except BackendError as e:  # the forced backend cannot serve this call (its first call says so)
                    m.status, m.note = "skipped", str(e)[:300]
                except Exception as e:  # noqa: BLE001
                    m.status = "skipped" if _is_oom(e) else "error"
                    m.note = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                out.append(m)
                tick(desc)
            del prep
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return out


# -- derived metrics ------------------------------------------------------------------------------------
# When FLOP/s mean something.  A row's FLOPs are *compute-relevant* when its arithmetic intensity
# (spec FLOPs / spec bytes) is at least COMPUTE_INTENSITY FLOP/B.  The fp32 ridge point (peak FLOP/s /
# bandwidth) of the datacentre GPUs in mhc_kernels.bench.device.GPU_PEAKS is 9-26 FLOP/B, so at 4 FLOP/B
# the compute time at the fp32 roof is already a sixth or more of the memory time; below it the row is
# memory-bound on every such device and its TFLOP/s only restates its GB/s.  The rule is per row: at T=1
# reading fn dominates the bytes and nothing qualifies; for bf16, n=4 and T in the thousands it selects the
# ops with the fn projection (norm_fn, mhc_pre, post_pre, mhc_head, the single-pass pre ops, their
# backward, mhc_site) and the 20-round Sinkhorn ops (split_mixes, sinkhorn and backward); never
# expand, pre_apply_mix, post, multilayer_recompute or mhc_head_sp.
COMPUTE_INTENSITY = 4.0


def compute_relevant(flops: float, nbytes: int) -> bool:
    """Whether a call's FLOPs bear on its time (the rule above): TFLOP/s is reported only then."""
    return nbytes > 0 and flops / nbytes >= COMPUTE_INTENSITY


def roof_known(flops: float, nbytes: int, ceiling_gbps: Optional[float], peak_tflops: Optional[float]) -> bool:
    """Whether the device has every roof the call's roofline time needs: a bandwidth ceiling, and a compute
    roof too when its FLOPs are compute-relevant (on CPU or an unknown GPU a bandwidth-only time would
    overstate how far a compute-bound row is from its roof); ``roofline_us`` and ``roofline_ratio`` exist only then."""
    return bool(ceiling_gbps) and (bool(peak_tflops) or not compute_relevant(flops, nbytes))


def derive(m: Measurement, baseline_times: dict, ceiling_gbps: Optional[float], datasheet_gbps: Optional[float],
           peak_tflops: Optional[float]) -> dict:
    """The derived numbers of one measurement (see :mod:`mhc_kernels.bench.report` for the fields)."""
    d = dict(median_us=None, p20_us=None, p80_us=None, gbps=None, tflops=None, pct_measured_bw=None,
             pct_datasheet_bw=None, roofline_us=None, roofline_ratio=None, speedup_vs_eager=None,
             speedup_vs_compile=None)
    d["intensity"] = (m.flops / m.bytes) if m.bytes else None
    d["compute_relevant"] = compute_relevant(m.flops, m.bytes)
    roof = None
    if roof_known(m.flops, m.bytes, ceiling_gbps, peak_tflops):
        roof = m.bytes / (ceiling_gbps * 1e9)
        if peak_tflops:
            roof = max(roof, m.flops / (peak_tflops * 1e12))
        d["roofline_us"] = roof * 1e6
    if m.timing is None:
        return d
    t = m.timing.median_s
    d["median_us"] = t * 1e6
    d["p20_us"] = m.timing.p20_s * 1e6
    d["p80_us"] = m.timing.p80_s * 1e6
    if t > 0:
        d["gbps"] = m.bytes / t / 1e9
        d["tflops"] = m.flops / t / 1e12
        if ceiling_gbps:
            d["pct_measured_bw"] = 100.0 * d["gbps"] / ceiling_gbps
        if datasheet_gbps:
            d["pct_datasheet_bw"] = 100.0 * d["gbps"] / datasheet_gbps
        if roof:
            d["roofline_ratio"] = t / roof
        for b in BASELINES:
            bt = baseline_times.get(b)
            if bt:
                d[f"speedup_vs_{b}"] = bt / t
    return d


