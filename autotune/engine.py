"""The tuner: enumerate, prune, compile, check, time, pick.

For one call shape of one (op, backend) kernel, :meth:`Tuner.tune`:

1. enumerates ``kernel.config_space(call)`` and prunes what cannot run on the
   target arch (:mod:`.space`);
2. compiles the survivors by a first launch, one at a time (the JIT caches of Triton
   and TileLang are not all thread-safe); a failure rejects that config;
3. checks every compiled candidate's outputs against the reference backend
   before timing it (so a fast but wrong config can never win). The expectation
   is the reference at float64 and the allowance is the project's rule
   (:mod:`mhc_kernels.reference.cases`: ``atol * max|expected| + rtol * |expected|
   + SLACK * error of the reference at working precision``), evaluated on the
   device; if the float64 copy does not fit in memory, the working-precision
   reference is the expectation with twice the tolerance;
4. times the survivors with ``timer`` (median of the samples) and keeps the
   fastest; the kernel's default config is timed too, for the speedup.

Every launch is ``kernel(*call.args, config=candidate)``: the path the runtime takes with
the config the core resolved (``mhc_kernels.registry.config_for``), so what is timed is what
runs. The timer is injected, so all of this runs without a GPU in tests. :class:`CudaTimer`
is the real one: the benchmark's clock (:mod:`mhc_kernels.bench.timing`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from mhc_kernels import registry
from mhc_kernels.reference import cases
from mhc_kernels.specs import SPECS

from . import space as space_mod
from .inputs import make_call

# --------------------------------------------------------------------------- timing


class CudaTimer:
    """The benchmark's clock (:func:`mhc_kernels.bench.timing.samples`: CUDA events per call, L2 flushed
    before each), ``warmup`` launches, then ``repeats`` samples in µs."""

    def __init__(self, warmup: int = 10, repeats: int = 50):
        from mhc_kernels.bench import timing

        self.warmup, self.repeats = warmup, repeats
        self._samples = timing.samples
        self.method = f"{timing.method_name(torch.device('cuda'))}; median of {repeats} after {warmup} warm-up launches"

    def __call__(self, fn: Callable[[], Any], config: dict) -> list[float]:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        return [t * 1e6 for t in self._samples(fn, "cuda", self.repeats)]


# --------------------------------------------------------------------------- results


@dataclass
class Candidate:
    config: dict
    status: str = "pending"   # pruned | compile-error | wrong | error | timed
    reason: str = ""
    us: Optional[float] = None
    samples: list = field(default_factory=list)


@dataclass
class TuneResult:
    op: str
    backend: str
    dtype: torch.dtype
    n: int
    C: int
    T: int
    candidates: list[Candidate]
    best: Optional[Candidate]
    default_config: Optional[dict]
    default_us: Optional[float]
    timing: str
    bytes: int

    @property
    def gbps(self) -> Optional[float]:
        return None if self.best is None else self.bytes / (self.best.us * 1e-6) / 1e9

    @property
    def speedup(self) -> Optional[float]:
        if self.best is None or not self.default_us:
            return None
        return self.default_us / self.best.us

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.candidates)


# --------------------------------------------------------------------------- checking


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _to64(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.to(torch.float64)
    return v


def _max_ratio(actual: torch.Tensor, expected: torch.Tensor, naive: Optional[torch.Tensor], dtype,
               factor: float = 1.0) -> tuple[float, str]:
    """max |a - e| / allowed (<= 1 passes): the project's tolerance rule (``cases.error_ratio``), on the device."""
    err, worst, idx, why = cases.error_ratio(actual, expected, dtype, naive=naive, factor=factor)
    return worst, why or f"max error {err:.3g} = {worst:.3g} x allowed"


@dataclass
class Expected:
    outputs: tuple
    naive: Optional[tuple]
    factor: float


def reference_outputs(reference, call) -> Expected:
    """What a candidate must reproduce for ``call`` (see the module docstring)."""
    with torch.no_grad():
        naive = tuple(o.clone() for o in _as_tuple(reference.fn(*call.args)))
        try:
            exact = _as_tuple(reference.fn(*[_to64(v) for v in call.args]))
            return Expected(exact, naive, 1.0)
        except torch.cuda.OutOfMemoryError:
            if call.device.type == "cuda":
                torch.cuda.empty_cache()
            return Expected(naive, None, 2.0)


def check_outputs(outputs, expected: Expected) -> Optional[str]:
    """``None`` if every output is within tolerance of the expectation, else what is wrong."""
    outputs = _as_tuple(outputs)
    if len(outputs) != len(expected.outputs):
        return f"{len(outputs)} outputs, expected {len(expected.outputs)}"
    for i, (o, e) in enumerate(zip(outputs, expected.outputs)):
        naive = expected.naive[i] if expected.naive is not None else None
        ratio, detail = _max_ratio(o, e, naive, o.dtype, expected.factor)
        if not ratio <= 1.0:
            return f"output {i}: {detail}"
    return None


# --------------------------------------------------------------------------- the tuner


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Tuner:
    """Tunes one kernel at one shape at a time; see the module docstring.

    Args:
        timer: ``timer(fn, config) -> list of µs samples``, with a ``method`` string
            attribute (default :class:`CudaTimer`).
        arch: target compute capability as an int (default: the device's, else 90).
        reference: the kernel outputs are checked against (default: the ``reference``
            backend's kernel for the op).
        make_call: ``(op, T, n, C, dtype, device) -> Call`` (default :func:`.inputs.make_call`).
    """

    def __init__(self, *, timer=None, arch: Optional[int] = None, reference=None, make_call: Callable = make_call):
        self.timer = timer
        self.arch = arch
        self.reference = reference
        self.make_call = make_call

    def _get_timer(self):
        if self.timer is None:
            self.timer = CudaTimer()
        return self.timer

    def _compile(self, kernel, call, cands: list[Candidate]) -> None:
        for c in cands:  # JIT on first launch: serial (JIT caches are not all thread-safe)
            try:
                kernel(*call.args, config=c.config)
                _sync(call.device)
            except Exception as e:  # noqa: BLE001
                c.status, c.reason = "compile-error", f"{type(e).__name__}: {e}"

    def _check_and_time(self, kernel, call, c: Candidate, expected: Expected, timer) -> None:
        try:
            with torch.no_grad():
                out = kernel(*call.args, config=c.config)
            _sync(call.device)
            why = check_outputs(out, expected)
        except Exception as e:  # noqa: BLE001
            c.status, c.reason = "error", f"{type(e).__name__}: {e}"
            return
        if why is not None:
            c.status, c.reason = "wrong", why
            return
        args, cfg = call.args, c.config

        def launch():
            return kernel(*args, config=cfg)

        try:
            with torch.no_grad():
                c.samples = list(timer(launch, cfg))
            c.us = float(statistics.median(c.samples))
            c.status = "timed"
        except Exception as e:  # noqa: BLE001
            c.status, c.reason = "error", f"timing failed: {type(e).__name__}: {e}"

    def tune(self, kernel, op: str, T: int, n: int, C: int, dtype: torch.dtype, device, *,
             call=None) -> TuneResult:
        """Tune ``kernel`` (a registry Kernel) for ``op`` at ``T`` tokens, ``n`` streams, width ``C``."""
        if call is None:
            call = self.make_call(op, T, n, C, dtype, device)
        arch = self.arch or space_mod.device_arch(call.device) or space_mod.DEFAULT_ARCH
        timer = self._get_timer()
        reference = self.reference or registry.get_kernel(op, "reference")

        pr = space_mod.prune(kernel, call, space_mod.enumerate_space(kernel, call), arch)
        cands = [Candidate(cfg) for cfg in pr.kept]
        pruned = [Candidate(cfg, "pruned", why) for cfg, why in pr.dropped]
        default = dict(kernel.default_config(call)) if kernel.default_config is not None else None
        default_cand, extra = None, []
        if default is not None:  # timed for the speedup; it may lie outside the space (never picked then)
            did = space_mod.config_id(default)
            default_cand = next((c for c in cands if space_mod.config_id(c.config) == did), None)
            if default_cand is None:
                default_cand = Candidate(default)
                extra = [default_cand]

        todo = cands + extra
        self._compile(kernel, call, todo)
        expected = reference_outputs(reference, call)
        for c in todo:
            if c.status == "pending":
                self._check_and_time(kernel, call, c, expected, timer)
        timed = [c for c in cands if c.status == "timed"]
        best = min(timed, key=lambda c: c.us) if timed else None
        default_us = default_cand.us if default_cand is not None and default_cand.status == "timed" else None
        present = tuple(a.name for a, v in zip(call.spec.args, call.args) if getattr(a, "optional", False)
                        and v is not None)
        nbytes = SPECS[op].bytes(call.T, call.n or 1, call.C or 1, call.act_dtype or call.dtype, present)
        return TuneResult(op, kernel.backend, call.dtype, call.n or 1, call.C or 1, call.T, cands + pruned, best,
                          default, default_us, getattr(timer, "method", type(timer).__name__), nbytes)


def store_result(store, res: TuneResult) -> Optional[dict]:
    """Record a result's best config in ``store`` (a :class:`.store.ConfigStore`); ``None`` if none passed."""
    if res.best is None:
        return None
    return store.put(res.op, res.backend, res.dtype, res.n, res.C, res.T, config=res.best.config, us=res.best.us,
                     gbps=res.gbps, default_config=res.default_config, default_us=res.default_us,
                     timing=res.timing, candidates=len(res.candidates))

