"""Backend registry: ``(op, backend) -> kernel``, backend selection and the public controls.

Backends (``reference``, ``triton``, ``tilelang``) live in their own packages and
register their kernels here with :func:`register_kernel` when first loaded. The
core never imports a backend at import time: each backend package exposes a cheap
``unavailable_reason(device)`` probe (it must not import triton or tilelang) and a
``load()`` that imports and registers the kernels.

Selection for one validated call (see :func:`select`):

* a forced backend (``use_backend(...)`` or ``MHC_KERNELS_BACKEND``) must serve the
  call or a :class:`~mhc_kernels.errors.BackendError` says why -- never a silent
  fallback;
* otherwise the first backend in the device's priority list that is available, has
  a kernel for the op and whose ``supports`` accepts the call: on CUDA
  ``tilelang, triton, reference``; elsewhere ``reference`` (then ``triton``, which
  serves CPU tensors only under ``TRITON_INTERPRET=1`` and only when forced in
  practice, since the reference accepts everything).

Selections are cached per (op, device, dtype, n, C, forced backend), so the hot
path costs one dict lookup.

Configs are resolved here too, once per call, and passed down (:func:`run`,
:func:`config_for`): an explicit config (the tuner's candidates) wins, else the tuned
entry stored for the call's shape (CUDA only; ``mhc_kernels.tuned``), else the kernel's
default heuristic. The resolved config is cached per (op, backend, device, dtype, T, n,
C, rows, iters) beside the selection cache, so a kernel's launch wrapper never looks
anything up and a repeated call costs two dict lookups.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import torch

from . import invariance, tuned
from .errors import BackendError

BACKENDS = ("tilelang", "triton", "reference")
_PACKAGES = {
    "reference": "mhc_kernels.reference",
    "triton": "mhc_kernels.triton_src",
    "tilelang": "mhc_kernels.tilelang_src",
}
_PRIORITY = {
    "cuda": ("tilelang", "triton", "reference"),
}
_DEFAULT_PRIORITY = ("reference", "triton")
ENV_VAR = "MHC_KERNELS_BACKEND"


@dataclass
class Kernel:
    """One backend's implementation of one op.

    ``fn(*args, config=...)`` takes the op's arguments in schema order, already
    canonical (leading dims flattened to ``T``, contiguous) and returns the outputs
    with a leading ``T`` dim; a kernel without tunables (the reference) takes no
    ``config``. Call it as ``kernel(*args, config=cfg)``. ``supports(call)`` returns
    ``None`` when the kernel can serve the call, else a one-line reason.
    ``config_space(call)`` and ``default_config(call)`` describe the kernel's tunable
    parameters (``None`` for the reference); ``check_config(call, config)`` (optional)
    says why a config cannot serve a call it was not tuned for (a stored entry is then
    ignored for that call, and the tuner prunes it). ``parts`` names, for a composite,
    the kernels its config holds sub-configs for.
    """

    op: str
    backend: str
    fn: Callable[..., Any]
    supports: Optional[Callable[[Any], Optional[str]]] = None
    config_space: Optional[Callable[[Any], list]] = None
    default_config: Optional[Callable[[Any], dict]] = None
    check_config: Optional[Callable[[Any, dict], Optional[str]]] = None
    parts: dict = field(default_factory=dict)

    @property
    def tunable(self) -> bool:
        return self.default_config is not None

    def __call__(self, *args, config=None, **kwargs):
        if self.tunable:
            return self.fn(*args, config=config, **kwargs)
        return self.fn(*args, **kwargs)

    def reason_unsupported(self, call) -> Optional[str]:
        return None if self.supports is None else self.supports(call)


_KERNELS: dict[tuple[str, str], Kernel] = {}
_LOADED: dict[str, Optional[str]] = {}   # backend -> None (loaded) or the import error text
_SELECT_CACHE: dict[tuple, Kernel] = {}
_CONFIG_CACHE: dict[tuple, Optional[dict]] = {}
_CONFIG_CACHE_LIMIT = 1 << 16
_FORCED: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("mhc_kernels_backend", default=None)


def dtype_and_streams_reason(call, who: str, dtypes: tuple, max_n: int, why_max_n: str) -> Optional[str]:
    """The support rule the GPU backends share: ``who`` (e.g. ``"Triton kernels"``) serve residuals of
    ``dtypes`` and at most ``max_n`` streams (``why_max_n`` says why). None when ``call`` fits, else the
    reason, naming the backend that serves the rest."""
    if call.dtype not in dtypes:
        return (f"{who} take bf16/fp16/fp32 residuals (float32 mixes); got {call.dtype} "
                f"-- the reference backend serves float64")
    if call.n is not None and call.n > max_n:
        return f"{who} support n <= {max_n} streams ({why_max_n}); got n={call.n} -- the reference backend serves it"
    return None


def register_kernel(op: str, backend: str, fn: Callable[..., Any], **kwargs) -> Kernel:
    """Register (or replace) ``backend``'s kernel for ``op``. Called by backend packages."""
    return add_kernel(Kernel(op=op, backend=backend, fn=fn, **kwargs))


def add_kernel(k: Kernel) -> Kernel:
    """Register (or replace) the kernel ``k`` for ``(k.op, k.backend)``."""
    if k.backend not in BACKENDS:
        raise BackendError(f"unknown backend {k.backend!r}; known: {', '.join(BACKENDS)}")
    _KERNELS[(k.op, k.backend)] = k
    clear_caches()
    return k


def clear_caches() -> None:
    """Forget every cached selection and resolved config (kernels registered, configs stored)."""
    _SELECT_CACHE.clear()
    _CONFIG_CACHE.clear()


tuned.on_clear(_CONFIG_CACHE.clear)  # a new tuned-config file changes the resolved configs


def kernels(backend: Optional[str] = None) -> list[Kernel]:
    """Registered kernels (loading the backend first when one is named)."""
    if backend is not None:
        _load(backend)
    return [k for (op, b), k in sorted(_KERNELS.items()) if backend is None or b == backend]


def get_kernel(op: str, backend: str) -> Optional[Kernel]:
    _load(backend)
    return _KERNELS.get((op, backend))


def registered(op: str, backend: str) -> Optional[Kernel]:
    """The kernel registered so far (no loading: for a backend registering its composites)."""
    return _KERNELS.get((op, backend))


def _package(backend: str):
    return importlib.import_module(_PACKAGES[backend])


def _load(backend: str) -> Optional[str]:
    """Import a backend's kernels once; returns None or why it could not be loaded."""
    if backend not in _LOADED:
        try:
            _package(backend).load()
            _LOADED[backend] = None
        except Exception as e:  # a broken optional toolchain must not break the others
            _LOADED[backend] = f"failed to load: {type(e).__name__}: {e}"
    return _LOADED[backend]


def unavailable_reason(backend: str, device: torch.device | str) -> Optional[str]:
    """None if ``backend`` can run on ``device``, else a one-line reason."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    device = torch.device(device)
    reason = _package(backend).unavailable_reason(device)
    if reason is None:
        reason = _load(backend)
    return reason


class BackendStatus(NamedTuple):
    name: str
    available: bool
    reason: str  # empty when available


def available_backends(device: torch.device | str | None = None) -> dict[str, BackendStatus]:
    """Every backend, in the device's priority order, with whether it can run there and why not.

    ``device`` defaults to ``cuda`` when a CUDA device is present, else ``cpu``.

    Example::

        >>> status = mk.available_backends("cpu")
        >>> status["reference"].available
        True
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    order = _PRIORITY.get(device.type, _DEFAULT_PRIORITY)
    order = order + tuple(b for b in BACKENDS if b not in order)
    out = {}
    for b in order:
        r = unavailable_reason(b, device)
        out[b] = BackendStatus(b, r is None, r or "")
    return out


def forced_backend() -> Optional[str]:
    """The backend forced by ``use_backend`` (innermost wins) or else by ``MHC_KERNELS_BACKEND``."""
    b = _FORCED.get()
    if b is None:
        b = os.environ.get(ENV_VAR) or None
        if b is not None and b not in BACKENDS:
            raise BackendError(f"{ENV_VAR}={b!r} is not a backend; choose one of {', '.join(BACKENDS)} "
                               f"or leave it unset for automatic selection")
    elif b == "auto":
        b = None
    return b


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force every mHC op called inside the block onto backend ``name``.

    ``None`` or ``"auto"`` restores automatic selection (overriding
    ``MHC_KERNELS_BACKEND``). A forced backend that cannot serve a call raises
    :class:`~mhc_kernels.errors.BackendError`; it never falls back silently. The
    choice applies to calls made inside the block: a ``backward()`` run after the
    block selects its kernels afresh.

    Example::

        >>> x, w = torch.randn(8, 4, 64), torch.full((8, 4), 0.25)
        >>> with mk.use_backend("reference"):
        ...     layer_input = mk.pre_apply_mix(x, w)
    """
    if name is not None and name != "auto" and name not in BACKENDS:
        raise BackendError(f"use_backend({name!r}): unknown backend; choose one of {', '.join(BACKENDS)}, "
                           f"None or 'auto'")
    token = _FORCED.set("auto" if name is None else name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def _describe(call) -> str:
    parts = [str(call.device), str(call.dtype).replace("torch.", "")]
    if call.n is not None:
        parts.append(f"n={call.n}")
    if call.C is not None:
        parts.append(f"C={call.C}")
    return ", ".join(parts)


def _why_not(backend: str, call) -> Optional[str]:
    reason = unavailable_reason(backend, call.device)
    if reason is not None:
        return reason
    k = _KERNELS.get((call.spec.name, backend))
    if k is None:
        return f"it has no kernel for op '{call.spec.name}'"
    return k.reason_unsupported(call)


def select(call) -> Kernel:
    """The kernel that serves ``call`` (a :class:`~mhc_kernels.validation.Call`)."""
    forced = forced_backend()
    key = (call.spec.name, call.device, call.dtype, call.n, call.C, call.alignment, forced)
    k = _SELECT_CACHE.get(key)
    if k is not None:
        return k
    if forced is not None:
        reason = _why_not(forced, call)
        if reason is not None:
            raise BackendError(f"mhc.{call.spec.name}: backend '{forced}' is forced but cannot serve this call "
                               f"({_describe(call)}): {reason}")
        k = _KERNELS[(call.spec.name, forced)]
    else:
        reasons = []
        for b in _PRIORITY.get(call.device.type, _DEFAULT_PRIORITY):
            reason = _why_not(b, call)
            if reason is None:
                k = _KERNELS[(call.spec.name, b)]
                break
            reasons.append(f"{b}: {reason}")
        else:
            raise BackendError(f"mhc.{call.spec.name}: no backend can serve this call ({_describe(call)}): "
                               + "; ".join(reasons))
    _SELECT_CACHE[key] = k
    return k


def _merged(default: dict, stored: dict) -> dict:
    """``stored`` over ``default``, part by part for a composite's nested sub-configs."""
    out = dict(default)
    for k, v in stored.items():
        out[k] = _merged(default[k], v) if isinstance(v, dict) and isinstance(default.get(k), dict) else v
    return out


def config_for(kernel: Kernel, call) -> Optional[dict]:
    """The config ``kernel`` runs ``call`` with: the stored (tuned) one, else its default; ``None`` for an
    untunable kernel. Cached; treat the result as read-only."""
    if not kernel.tunable:
        return None
    if _batch_invariant(kernel):   # every T runs the config of one fixed token count (invariance.py)
        call = invariance.config_call(call)
    key = (kernel.op, kernel.backend, call.device, call.dtype, call.T, call.n, call.C, call.rows, call.iters)
    try:
        return _CONFIG_CACHE[key]
    except (KeyError, TypeError):  # TypeError: symbolic sizes (tracing) are not hashable keys
        pass
    cfg = kernel.default_config(call)
    if call.device.type == "cuda":
        hit = tuned.lookup(kernel.op, kernel.backend, call.device, call.dtype, call.n or 1, call.C or 1, call.T)
        if hit is not None:
            cand = _merged(cfg, hit)
            if kernel.check_config is None or kernel.check_config(call, cand) is None:
                cfg = cand
    if len(_CONFIG_CACHE) < _CONFIG_CACHE_LIMIT:
        try:
            _CONFIG_CACHE[key] = cfg
        except TypeError:
            pass
    return cfg


def _batch_invariant(kernel: Kernel) -> bool:
    """Whether ``kernel`` runs in batch-invariant mode now (forward ops only: invariance.py)."""
    return not kernel.op.endswith("_bwd") and invariance.batch_invariant_enabled()


def run(call):
    """Serve one validated call: select the kernel, resolve its config, run it. -> the kernel's outputs.
    In batch-invariant mode a reference forward kernel runs on fixed token chunks (invariance.py)."""
    k = select(call)
    if not k.tunable and _batch_invariant(k):
        return invariance.run_in_chunks(k, call)
    return k(*call.args, config=config_for(k, call))


def which_backend(op: str, *args) -> str:
    """The backend that would serve ``torch.ops.mhc.<op>(*args)`` right now (validates the args; trailing
    arguments with a schema default may be left out).

    Example::

        >>> mk.which_backend("pre_apply_mix", torch.randn(8, 4, 64), torch.full((8, 4), 0.25))
        'reference'
    """
    from .specs import SPECS
    from .validation import bind, complete

    spec = SPECS[op]
    return select(bind(spec, complete(spec, args, {}), flatten=False)).backend
