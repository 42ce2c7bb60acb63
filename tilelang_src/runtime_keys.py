"""The TileLang kernels the run time will ask for, found by replaying calls on CPU with stub kernels.

A TileLang kernel is compiled per ``(kernel, n, C, dtype, config, constants, target)``
(:func:`.common._compiled`). What those are for a call follows from rules spread over the
backend: the config depends on ``T`` (split counts, tail layouts) and on the GPU's SM count
(``norm_fn``'s ``split_K``); the mix kernels are keyed ``C = 1, float32``; some kernels carry
constants (Sinkhorn iterations, ``rows``, the collapse kind); the optional arguments present
(norm weight, the sublayer's out-norm weight, the carried pre) pick variants. Instead of
restating those rules, :func:`recording` runs the real thing -- the registry, the config
resolution and the launch wrappers, exactly as at run time -- on CPU tensors, with
``common._compiled`` replaced by a recorder whose kernels do nothing (no compile, no math),
planning for the target GPU's SM count. What it records is then built for a real arch
(:func:`build`; ``tilelang.compile`` fills TileLang's disk cache, which a GPU run with the same
target reads) or for the CPU emulator.

Replays (each runs under :func:`recording`): :func:`replay_shapes` -- every public op forward and
backward at the given shapes, with every combination of its optional weights
(``mhc-kernels compile``); :func:`replay_check` -- what ``mhc-kernels check`` runs on a device;
:func:`replay_bench_quick` -- the TileLang rows of ``bench --quick``; :func:`replay_serving` -- those of
``selftest``'s serving stage. The stub kernels leave the
outputs unwritten, so nothing data-dependent may follow a replay: the recorded keys are the
only result. Configs stored by the tuner for a named GPU are not applied (the replay resolves
defaults, as a GPU without a tuned-config file does).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from . import EMULATE_ENV, common

# SM counts the configs are planned for when no GPU is present (norm_fn's split_K fills 2 CTAs per SM)
ARCH_SMS = {"sm_80": 108, "sm_86": 84, "sm_89": 128, "sm_90": 132, "sm_90a": 132, "sm_100": 148, "sm_100a": 148}
_DTYPES = {name: dt for dt, name in common.DTYPES.items()}
_OPTIONAL_WEIGHTS = ("norm_weight", "out_norm_weight", "prev_pre")


@dataclass(frozen=True)
class Key:
    """One compiled TileLang kernel: what :func:`.common._compiled` is called with, less the target."""

    kernel: str
    n: int
    C: int
    dtype: str       # "bfloat16" | "float16" | "float32"
    config: tuple    # sorted (key, value) pairs
    consts: tuple    # sorted (name, value) pairs

    def as_json(self) -> dict:
        return {"kernel": self.kernel, "n": self.n, "C": self.C, "dtype": self.dtype,
                "config": dict(self.config), "consts": dict(self.consts)}

    @classmethod
    def from_json(cls, d: dict) -> "Key":
        return cls(d["kernel"], int(d["n"]), int(d["C"]), d["dtype"], tuple(sorted(d["config"].items())),
                   tuple(sorted(d["consts"].items())))

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config + self.consts)


def _noop_kernel(*args, **kwargs):
    return None


@contextlib.contextmanager
def recording(sms: int = ARCH_SMS["sm_90a"]):
    """Record instead of compile: yields the list the keys are appended to (first-seen order, no repeats).

    Inside, the TileLang backend serves CPU tensors (the emulator switch is on), every kernel is a no-op, and
    configs are planned for ``sms`` streaming multiprocessors. The registry's caches are cleared on entry and
    exit, so no config resolved here outlives the block.
    """
    from mhc_kernels import registry

    keys: list[Key] = []
    seen: set[Key] = set()

    def record(name, n, C, dtype, cfg, consts, target):
        k = Key(name, int(n), int(C), common.dtype_name(dtype), tuple(cfg), tuple(consts))
        if k not in seen:
            seen.add(k)
            keys.append(k)
        return _noop_kernel

    saved = (common._compiled, common.SMS_OVERRIDE, os.environ.get(EMULATE_ENV))
    common._compiled, common.SMS_OVERRIDE = record, int(sms)
    os.environ[EMULATE_ENV] = "1"
    registry.clear_caches()
    try:
        yield keys
    finally:
        common._compiled, common.SMS_OVERRIDE = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop(EMULATE_ENV, None)
        else:
            os.environ[EMULATE_ENV] = saved[2]
        registry.clear_caches()


def _run_forward_backward(op: str, inputs: dict) -> Optional[str]:
    """Run ``op`` (forward, then backward with zero output grads) on the TileLang backend; None, or why it was
    not served (an unsupported shape is not an error of the replay)."""
    import mhc_kernels as mk
    from mhc_kernels.errors import BackendError, MHCError
    from mhc_kernels.reference import cases

    case = cases.CASES[op]
    diff = [k for k in case.differentiable if inputs.get(k) is not None]
    leaves = {k: v.detach().clone().requires_grad_() if k in diff else v for k, v in inputs.items()}
    try:
        with mk.use_backend("tilelang"):
            outs = case.run(mk, leaves)
            outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,))
                    if isinstance(o, torch.Tensor) and o.requires_grad]
            if outs and outs[0].numel():
                torch.autograd.backward(outs, [torch.zeros_like(o) for o in outs])
    except (BackendError, MHCError) as e:
        return f"{op}: {str(e).splitlines()[0]}"
    return None


def _variants(inputs: dict) -> Iterable[dict]:
    """``inputs`` with every subset of its optional weights left out (each picks kernel variants)."""
    present = [k for k in _OPTIONAL_WEIGHTS if inputs.get(k) is not None]
    for r in range(len(present) + 1):
        for dropped in itertools.combinations(present, r):
            yield {k: (None if k in dropped else v) for k, v in inputs.items()}


def replay_shapes(shapes: Iterable[tuple], ops: Optional[Iterable[str]] = None) -> list[str]:
    """Every op of ``reference.cases.CASES`` (or ``ops``) forward and backward at each ``(T, n, C, dtype[,
    constants])``, with every combination of its optional weights. Call inside :func:`recording`. -> notes on
    calls the TileLang backend does not serve."""
    from mhc_kernels.reference import cases

    notes = []
    for shape in shapes:
        T, n, C, dtype = shape[:4]
        consts = shape[4] if len(shape) > 4 else None
        for op in ops or cases.CASES:
            # a few generated tokens, repeated up to T: the keys depend on the sizes, never on the values
            base = cases.op_inputs(op, int(T), int(n), int(C), dtype, "cpu", norm_weight=True, consts=consts, tile=8)
            for inputs in _variants(base):
                why = _run_forward_backward(op, inputs)
                if why is not None:
                    notes.append(f"T={T} n={n} C={C}: {why}")
            for why in _run_fp8_copies(op, base):
                notes.append(f"T={T} n={n} C={C}: {why}")
    return list(dict.fromkeys(notes))


def _run_fp8_copies(op: str, inputs: dict) -> list[str]:
    """A boundary op (``cases.FP8_BOUNDARY_OPS``) with all its weights, forward, writing the FP8 copy in each
    group that divides C: its tail is a kernel of its own (the ``fp8_group`` constant). -> why not served."""
    from mhc_kernels import ops
    from mhc_kernels.errors import BackendError, MHCError
    from mhc_kernels.reference import cases
    from mhc_kernels.registry import use_backend
    from mhc_kernels.specs import FP8_GROUPS, SPECS

    if op not in cases.FP8_BOUNDARY_OPS:
        return []
    C = inputs["residual"].shape[-1]
    notes = []
    for group in FP8_GROUPS:
        if C % group:
            continue
        args = [group if a == "fp8_group" else inputs[a] for a in SPECS[op].arg_names]
        try:
            with torch.no_grad(), use_backend("tilelang"):
                ops.BODIES[op](*args)
        except (BackendError, MHCError) as e:
            notes.append(f"{op} fp8_group={group}: {str(e).splitlines()[0]}")
    return notes


def replay_check(device_cases: str = "cuda", ops: Optional[list] = None) -> None:
    """What ``mhc-kernels check --backends tilelang`` runs with ``device_cases``'s case table (``"cuda"``:
    the GPU's shapes; ``"cpu"``: the emulator's). Call inside :func:`recording`."""
    from mhc_kernels.commands import check

    check.run_checks("cpu", ["tilelang"], ops, cases_device=device_cases)


def replay_bench_quick() -> None:
    """The TileLang measurements of ``mhc-kernels bench --quick`` (its ops, token counts, n, C, dtype), each
    called once. Call inside :func:`recording`."""
    from mhc_kernels.bench import runner
    from mhc_kernels.commands.bench import QUICK, resolve_ops

    cfg = runner.SweepConfig(targets=resolve_ops(None), backends=["tilelang"], baselines=[],
                             tokens=list(QUICK["tokens"]), ns=list(QUICK["n"]), hiddens=list(QUICK["hidden"]),
                             dtype=torch.bfloat16, device="cpu", budget_s=0.0, min_repeats=1, max_repeats=1,
                             warmup=0)
    runner.run_sweep(cfg)


def replay_serving() -> None:
    """The TileLang measurements of ``selftest``'s serving stage: ``bench --decode`` (its boundaries at every
    decode token count) and the boundary ops at ``SERVING``'s size with the FP8 copy and in batch-invariant mode.
    Call inside :func:`recording`."""
    from mhc_kernels.bench import decode, runner
    from mhc_kernels.commands.bench import resolve_ops
    from mhc_kernels.commands.selftest import SERVING
    from mhc_kernels.registry import use_backend

    with torch.no_grad(), use_backend("tilelang"):
        for op in decode.DECODE_OPS:
            for T in decode.DECODE_TOKENS:
                decode.boundary_fn(op, T, decode.DECODE_N, decode.DECODE_C, torch.bfloat16, "cpu")()
    cfg = runner.SweepConfig(targets=resolve_ops(list(SERVING["ops"])), backends=["tilelang"], baselines=[],
                             tokens=[SERVING["tokens"]], ns=[SERVING["n"]], hiddens=[SERVING["hidden"]],
                             dtype=torch.bfloat16, device="cpu", budget_s=0.0, min_repeats=1, max_repeats=1,
                             warmup=0, batch_invariant=True, fp8=True)
    runner.run_sweep(cfg)


# plans of --fill-cache: what each run on a GPU will ask for
PLANS: dict[str, tuple[str, ...]] = {
    "check": ("check",),
    "bench": ("bench",),
    "selftest": ("check", "bench", "shapes:smoke", "serving"),
    "gpu-tests": ("check", "bench", "shapes:smoke", "shapes:gpu"),
}
# the shapes of the GPU test tiers (tests/test_tilelang_gpu.py and the gpu_smoke tests), (T, n, C, dtype[, consts]):
# every op forward and backward, every optional-weight variant
BF16 = torch.bfloat16
SMOKE_SHAPES = [(1, 4, 4096, BF16), (4096, 4, 4096, BF16), (1, 4, 7168, BF16), (257, 4, 7168, BF16),
                (4096, 4, 7168, BF16), (300, 4, 4096, BF16), (5, 4, 201, BF16), (0, 2, 1280, BF16)]
GPU_SHAPES = SMOKE_SHAPES + [
    (16384, 4, 4096, BF16), (37, 4, 1280, BF16), (13, 4, 200, BF16), (1, 1, 4096, BF16), (1000, 2, 4096, BF16),
    (257, 8, 4096, BF16), (3, 8, 200, BF16)] + [
    (33, 4, 4096, dt, {"sinkhorn_iters": 3}) for dt in (torch.bfloat16, torch.float16, torch.float32)]


def record_plan(plan: str, sms: int, device_cases: str = "cuda", ops: Optional[list] = None,
                progress: Optional[Callable[[str], None]] = None) -> tuple[list[Key], list[str]]:
    """-> (the keys of ``plan`` (a name of :data:`PLANS`), notes). ``device_cases`` picks check's case table."""
    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r}; known: {', '.join(PLANS)}")
    notes: list[str] = []
    with recording(sms) as keys:
        for part in PLANS[plan]:
            if progress:
                progress(part)
            if part == "check":
                replay_check(device_cases, ops)
            elif part == "bench":
                replay_bench_quick()
            elif part == "serving":
                replay_serving()
            elif part == "shapes:smoke":
                notes += replay_shapes(SMOKE_SHAPES, ops)
            elif part == "shapes:gpu":
                notes += replay_shapes(GPU_SHAPES, ops)
        return list(keys), notes


def record_shapes(shapes: Iterable[tuple], sms: int, ops: Optional[list] = None) -> tuple[list[Key], list[str]]:
    """-> (the keys every op forward and backward asks for at ``shapes`` ``(T, n, C, dtype)``, notes)."""
    with recording(sms) as keys:
        notes = replay_shapes(shapes, ops)
        return list(keys), notes


def build(keys: Iterable[Key], target, progress: Optional[Callable[[int, Key, float], None]] = None) -> list[dict]:
    """Compile each key for ``target`` (``{"kind": "cuda", "arch": ...}``, or :data:`.common.EMULATED`) the way the
    run time does -- :func:`.common._compiled`, so TileLang's disk cache (or the emulator's) keeps the result.
    -> one record per key: ``{"kernel", "key", "seconds", "ok", "error", "sync_warnings"}`` (the ThreadSync warnings
    TileLang printed while lowering it, :func:`.aot.sync_warnings`: a build it took from its disk cache has none)."""
    from . import aot

    aot._load_all()
    out = []
    for i, k in enumerate(keys):
        t0 = time.perf_counter()
        rec = {"kernel": k.kernel, "key": k.as_json(), "seconds": 0.0, "ok": True, "error": None, "sync_warnings": []}
        try:
            with aot.sync_warnings(rec["sync_warnings"]):
                common._compiled(k.kernel, k.n, k.C, k.torch_dtype, k.config, k.consts, repr(target))
        except Exception as e:  # noqa: BLE001 -- a failed kernel is a record
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[-800:]}")
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        out.append(rec)
        if progress:
            progress(i, k, rec["seconds"])
    return out


def save(path: str, keys: list[Key]) -> None:
    with open(path, "w") as f:
        json.dump([k.as_json() for k in keys], f, indent=1)


def load(path: str) -> list[Key]:
    with open(path) as f:
        return [Key.from_json(d) for d in json.load(f)]
