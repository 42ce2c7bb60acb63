"""Correctness cases: inputs for every public operator, its oracle answers, and the tolerances.

One place defines, per operator, how to build inputs of a given shape and dtype,
how to call the public function, what the NumPy float64 oracle says the outputs
are, and what autograd through the float64 transcription says the gradients are.
The test suite, ``mhc-kernels check`` and the tuner's correctness gate all use it,
so every backend is judged by the same rules.

Tolerances (:data:`TOLERANCES`) are per *output* dtype. An element passes when

    |actual - expected| <= atol * scale + rtol * |expected| + SLACK * naive_err

with ``scale`` the largest ``|expected|`` of that tensor (for gradients: the largest
magnitude over the exact gradient and two copies computed with the upstream gradient's
sign flipped at random per token, which estimates sqrt(sum_t a_t^2) for a sum over
tokens of terms a_t -- the size of float32 rounding noise in that sum even when the
terms cancel). ``rtol`` covers the final
rounding of a stored result (bf16 allows a little over one ulp, because Triton's
interpreter truncates instead of rounding); ``atol * scale`` covers float32
accumulation error in sums. ``naive_err`` is the largest error, on the same tensor,
of the plain transcription evaluated at the contract's working precision (residual
dtype storage, float32 math): where the contract itself is ill-conditioned (the
RMSNorm derivative at K = 1, a gradient that passes through a bf16 intermediate,
a bf16 rounding that flips before a projection) no implementation can beat that,
and a backend may be at most ``SLACK`` times worse than it. Bugs show up as errors
of order one, far outside both terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from . import oracle, transcription

TOLERANCES = {
    torch.bfloat16: (1e-2, 1e-4),
    torch.float16: (2e-3, 1e-4),
    torch.float32: (2e-5, 2e-5),
    torch.float64: (1e-9, 1e-9),
}

DEFAULT_CONSTS = dict(norm_eps=1e-6, pre_eps=1e-6, post_mult=2.0, sinkhorn_iters=20, sinkhorn_eps=1e-6,
                      out_norm_eps=1e-6)
# Non-default constants large enough that a misplaced eps or multiplier is visible in float32.
LOUD_CONSTS = dict(norm_eps=0.5, pre_eps=0.03, post_mult=1.5, sinkhorn_iters=3, sinkhorn_eps=0.02, out_norm_eps=0.3)


SLACK = 4.0


@dataclass
class Mismatch:
    name: str
    max_abs_err: float
    worst_ratio: float  # max of |err| / allowed; <= 1 passes
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.worst_ratio <= 1.0


def _as_f64(a, device) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(a, dtype=np.float64), device=device)


def error_ratio(actual: torch.Tensor, expected, dtype: torch.dtype, *, naive=None, scale: Optional[float] = None,
                factor: float = 1.0) -> tuple[float, float, Optional[tuple], str]:
    """The tolerance rule (see the module docstring), in torch on ``actual``'s device (so a GPU run checks on
    the GPU). ``expected`` and ``naive`` may be arrays or tensors; ``factor`` scales ``rtol`` and ``atol``.
    -> ``(max |actual - expected|, max of |err| / allowed (<= 1 passes), index of the worst element or
    None, what went wrong when nothing could be compared)``."""
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    rtol, atol = rtol * factor, atol * factor
    dev = actual.device
    exp = _as_f64(expected, dev)
    act = _as_f64(actual, dev)
    if act.shape != exp.shape:
        return float("inf"), float("inf"), None, f"shape {tuple(act.shape)} != expected {tuple(exp.shape)}"
    if act.numel() == 0:
        return 0.0, 0.0, None, ""
    if not bool(torch.isfinite(act).all()):
        return float("inf"), float("inf"), None, "non-finite values"
    slack = 0.0
    if naive is not None:
        nv = _as_f64(naive, dev)
        if nv.shape == exp.shape and bool(torch.isfinite(nv).all()):
            slack = SLACK * float((nv - exp).abs().max())
    ref = max(float(exp.abs().max()), scale or 0.0) or 1.0
    err = (act - exp).abs()
    ratio = err / (atol * ref + rtol * exp.abs() + slack)
    flat = int(torch.argmax(ratio))
    idx = tuple(int(k) for k in np.unravel_index(flat, tuple(ratio.shape)))
    return float(err.max()), float(ratio.reshape(-1)[flat]), idx, ""


def compare(name: str, actual: torch.Tensor, expected, dtype: Optional[torch.dtype] = None,
            naive=None, scale: Optional[float] = None) -> Mismatch:
    """Compare a tensor with a float64 expectation under the tolerance of ``dtype`` (default: its own).

    ``naive`` (optional) is the same quantity from the working-precision transcription;
    ``scale`` (optional) overrides the magnitude ``atol`` is relative to; see the module docstring.
    """
    err, ratio, idx, why = error_ratio(actual, expected, dtype or actual.dtype, naive=naive, scale=scale)
    if idx is None:
        return Mismatch(name, err, ratio, why)
    got, exp = float(actual.detach()[idx]), float(_as_f64(expected, "cpu")[idx])
    return Mismatch(name, err, ratio, f"worst at {idx}: got {got:.8g}, expected {exp:.8g}")


# -- input generation -------------------------------------------------------------
def _randn(gen, shape, dtype, device, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def _rand(gen, shape, dtype, device, lo=0.0, hi=1.0):
    return (lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=device)


def _mix_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def site_params(gen, n, C, dtype, device, *, rows=None, norm_weight=False, head=False):
    """fn, scale, base (and norm_weight) with mixes of order one, so the nonlinearities matter."""
    md = _mix_dtype(dtype)
    K = n * C
    rows = n if head else (rows or n * (n + 2))
    p = {
        "fn": _randn(gen, (rows, K), md, device, K ** -0.5),
        "scale": _rand(gen, (1,) if head else (3,), md, device, 0.3, 1.2),
        "base": _randn(gen, (rows,), md, device, 0.5),
        "norm_weight": _rand(gen, (K,), md, device, 0.5, 1.5) if norm_weight else None,
    }
    return p


def _residual(gen, lead, n, C, dtype, device):
    stream_gain = torch.linspace(0.8, 1.6, n, dtype=torch.float64)[:, None]
    x = torch.randn(tuple(lead) + (n, C), generator=gen, dtype=torch.float64) * stream_gain
    return x.to(dtype=dtype, device=device)


@dataclass
class OpCase:
    """How to exercise one public operator."""

    name: str
    make: Callable  # (gen, lead, n, C, dtype, device, norm_weight, consts) -> dict of named inputs
    run: Callable  # (mhc_kernels module, inputs) -> tuple of outputs
    oracle: Callable  # (inputs) -> tuple of float64 arrays
    transcription: Callable  # (inputs as float64 tensors) -> tuple of tensors
    differentiable: tuple[str, ...]
    uses: tuple[str, ...] = field(default_factory=tuple)  # which constants it takes
    # Index of an output that a later stage of the op reads back from storage (post_pre's
    # new residual); the oracle evaluates that stage at the backend's stored values.
    stored_output: Optional[int] = None
    # Inputs whose gradient flows through a gradient stored in the residual dtype (post_pre's
    # post half reads the bf16 gradient of the stored new residual): held to that dtype's tolerance.
    grads_through_act: tuple[str, ...] = ()
    # Inputs whose exact gradient is a difference of much larger terms by construction, with a function
    # (float64 inputs, float64 upstream gradients) -> the size of those terms, which then sets the gradient's
    # tolerance scale: the carried pre's gradient through a scale-invariant RMSNorm (at n = 1 it is zero but
    # for the eps, and float32 can only reproduce it to the size of the cancelling terms).
    grad_scales: dict = field(default_factory=dict)


def _consts(inputs, names):
    return {k: inputs[k] for k in names}


_PRE_CONSTS = ("norm_eps", "pre_eps", "post_mult", "sinkhorn_iters", "sinkhorn_eps")
_SPLIT_CONSTS = ("pre_eps", "post_mult", "sinkhorn_iters", "sinkhorn_eps")


def _make_norm_fn(gen, lead, n, C, dtype, device, nw, consts):
    p = site_params(gen, n, C, dtype, device, norm_weight=nw)
    return {"residual": _residual(gen, lead, n, C, dtype, device), "fn": p["fn"], "norm_weight": p["norm_weight"],
            "norm_eps": consts["norm_eps"]}


def _make_split(gen, lead, n, C, dtype, device, nw, consts):
    md = _mix_dtype(dtype)
    p = site_params(gen, n, C, dtype, device)
    d = {"mixes": _randn(gen, tuple(lead) + (n * (n + 2),), md, device, 1.5), "scale": p["scale"],
         "base": p["base"]}
    d.update(_consts(consts, _SPLIT_CONSTS))
    return d


def _make_sinkhorn(gen, lead, n, C, dtype, device, nw, consts):
    md = _mix_dtype(dtype)
    return {"logits": _randn(gen, tuple(lead) + (n, n), md, device, 1.5), "iters": consts["sinkhorn_iters"],
            "eps": consts["sinkhorn_eps"]}


def _make_apply(gen, lead, n, C, dtype, device, nw, consts):
    md = _mix_dtype(dtype)
    return {"residual": _residual(gen, lead, n, C, dtype, device),
            "pre_mix": _rand(gen, tuple(lead) + (n,), md, device, 0.0, 1.0)}


def _post_inputs(gen, lead, n, C, dtype, device):
    md = _mix_dtype(dtype)
    return {"layer_output": _randn(gen, tuple(lead) + (C,), dtype, device),
            "residual": _residual(gen, lead, n, C, dtype, device),
            "post_mix": _rand(gen, tuple(lead) + (n,), md, device, 0.0, 2.0),
            "comb_mix": _rand(gen, tuple(lead) + (n, n), md, device, 0.0, 1.0 / n * 2)}


def _make_post(gen, lead, n, C, dtype, device, nw, consts):
    return _post_inputs(gen, lead, n, C, dtype, device)


def _make_pre_head(gen, lead, n, C, dtype, device, nw, consts):
    p = site_params(gen, n, C, dtype, device, norm_weight=nw)
    d = {"residual": _residual(gen, lead, n, C, dtype, device), **p}
    d.update(_consts(consts, _PRE_CONSTS))
    return d


def _out_norm(gen, n, C, dtype, device, nw, consts):
    """The sublayer's RMSNorm of the layer input (mhc_pre, post_pre): a weight with ``nw`` (a site of a model with
    norms), none without -- and none at ``n = 1``, where the norm makes the layer input independent of the pre
    (scale invariance): every gradient through the pre is then the float32 / bf16 rounding noise of two cancelling
    terms, fed into the projection's gradients, and no tolerance relative to the result is meaningful (the
    single-pass cases measure that regime on ``d prev_pre`` alone, with ``grad_scales``)."""
    w = _rand(gen, (C,), _mix_dtype(dtype), device, 0.5, 1.5) if nw and n > 1 else None
    return {"out_norm_weight": w, "out_norm_eps": consts["out_norm_eps"]}


def _make_pre(gen, lead, n, C, dtype, device, nw, consts):
    d = _make_pre_head(gen, lead, n, C, dtype, device, nw, consts)
    d.update(_out_norm(gen, n, C, dtype, device, nw, consts))
    return d


def _make_expand(gen, lead, n, C, dtype, device, nw, consts):
    return {"hidden": _randn(gen, tuple(lead) + (C,), dtype, device), "n": n}


def _make_head(gen, lead, n, C, dtype, device, nw, consts):
    p = site_params(gen, n, C, dtype, device, norm_weight=nw, head=True)
    return {"residual": _residual(gen, lead, n, C, dtype, device), **p, "norm_eps": consts["norm_eps"],
            "pre_eps": consts["pre_eps"]}


def _make_post_pre_head(gen, lead, n, C, dtype, device, nw, consts):
    d = _post_inputs(gen, lead, n, C, dtype, device)
    d.update(site_params(gen, n, C, dtype, device, norm_weight=nw))
    d.update(_consts(consts, _PRE_CONSTS))
    return d


def _make_post_pre(gen, lead, n, C, dtype, device, nw, consts):
    d = _make_post_pre_head(gen, lead, n, C, dtype, device, nw, consts)
    d.update(_out_norm(gen, n, C, dtype, device, nw, consts))
    return d


_SP_CONSTS = _PRE_CONSTS + ("out_norm_eps",)


def _sp_extras(gen, lead, n, C, dtype, device, nw):
    """The single-pass extras: the carried pre and the sublayer's norm weight -- both present with ``nw``
    (a middle site of a model with norms), both absent without (the first site, no norm)."""
    md = _mix_dtype(dtype)
    return {"prev_pre": _rand(gen, tuple(lead) + (n,), md, device, 0.2, 1.0) if nw else None,
            "out_norm_weight": _rand(gen, (C,), md, device, 0.5, 1.5) if nw else None}


def _make_pre_sp(gen, lead, n, C, dtype, device, nw, consts):
    d = _make_pre_head(gen, lead, n, C, dtype, device, nw, consts)
    d.update(_sp_extras(gen, lead, n, C, dtype, device, nw))
    d["out_norm_eps"] = consts["out_norm_eps"]
    return d


def _make_post_pre_sp(gen, lead, n, C, dtype, device, nw, consts):
    d = _make_post_pre_head(gen, lead, n, C, dtype, device, nw, consts)
    d.update(_sp_extras(gen, lead, n, C, dtype, device, nw))
    d["out_norm_eps"] = consts["out_norm_eps"]
    return d


def _make_head_sp(gen, lead, n, C, dtype, device, nw, consts):
    md = _mix_dtype(dtype)
    return {"residual": _residual(gen, lead, n, C, dtype, device),
            "pre": _rand(gen, tuple(lead) + (n,), md, device, 0.2, 1.0),
            "out_norm_weight": _rand(gen, (C,), md, device, 0.5, 1.5) if nw else None,
            "out_norm_eps": consts["out_norm_eps"]}


def _collapse_grad_scale(pre_key: str, layer_input_at: int):
    """The terms of d pre[i] = rho <x_i, w g> - (rho^3 / C) <u, w g> <x_i, u> (the gradient of a collapse
    followed by the scale-invariant RMSNorm) taken in absolute value: what float32 rounding is relative to,
    since the difference cancels (to zero but for the eps at n = 1). ``layer_input_at``: the output index of
    the normalised collapse, without the stored new residual."""
    def scale(d, grads):
        if d.get(pre_key) is None or d.get("out_norm_weight") is None or d["residual"].numel() == 0:
            return 0.0
        stored = d.get("stored") is not None
        x = d["stored"] if stored else d["residual"]
        x, pre, w = (t.detach().to(torch.float64).cpu() for t in (x, d[pre_key], d["out_norm_weight"]))
        g = grads[layer_input_at + (1 if stored else 0)].to(torch.float64).cpu()
        u = (pre.unsqueeze(-1) * x).sum(-2)
        rho = torch.rsqrt(u.square().mean(-1) + float(d["out_norm_eps"]))
        wg = (w * g).abs()
        first = rho.unsqueeze(-1) * (x.abs() * wg.unsqueeze(-2)).sum(-1)
        coef = rho.pow(3) / u.shape[-1] * (u.abs() * wg).sum(-1)
        second = coef.unsqueeze(-1) * (x.abs() * u.abs().unsqueeze(-2)).sum(-1)
        return float((first + second).max())

    return scale


def _sp_keywords(d):
    return dict(norm_weight=d["norm_weight"], out_norm_weight=d["out_norm_weight"], **_consts(d, _SP_CONSTS))


class _Stored(torch.autograd.Function):
    """The new residual as the backend stored it: the backend's own stored values stand in
    for the exact ones (the next pre reads those), and the gradient reaching it is rounded to
    the storage dtype, as autograd does for a tensor of that dtype."""

    @staticmethod
    def forward(t, stored):
        return stored.to(device=t.device, dtype=t.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[1].dtype

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).to(g.dtype), None


def _stored_as(d):
    """``store`` hook for post_pre: use the backend's stored new residual (``d["stored"]``)."""
    if d.get("stored") is None:
        return None
    return lambda t: _Stored.apply(t, d["stored"]) if isinstance(t, torch.Tensor) else oracle.f64(d["stored"])


CASES: dict[str, OpCase] = {}


def _case(c: OpCase):
    CASES[c.name] = c


_case(OpCase(
    "norm_fn", _make_norm_fn,
    lambda mk, d: (mk.norm_fn(d["residual"], d["fn"], norm_weight=d["norm_weight"], norm_eps=d["norm_eps"]),),
    lambda d: (oracle.norm_fn(d["residual"], d["fn"], d["norm_weight"], d["norm_eps"]),),
    lambda d: (transcription.norm_fn(d["residual"], d["fn"], d["norm_weight"], d["norm_eps"]),),
    ("residual", "fn", "norm_weight"), ("norm_eps",)))
_case(OpCase(
    "split_mixes", _make_split,
    lambda mk, d: mk.split_mixes(d["mixes"], d["scale"], d["base"], **_consts(d, _SPLIT_CONSTS)),
    lambda d: oracle.split_mixes(d["mixes"], d["scale"], d["base"], **_consts(d, _SPLIT_CONSTS)),
    lambda d: transcription.split_mixes(d["mixes"], d["scale"], d["base"], **_consts(d, _SPLIT_CONSTS)),
    ("mixes", "scale", "base"), _SPLIT_CONSTS))
_case(OpCase(
    "sinkhorn", _make_sinkhorn,
    lambda mk, d: (mk.sinkhorn(d["logits"], iters=d["iters"], eps=d["eps"]),),
    lambda d: (oracle.sinkhorn(d["logits"], d["iters"], d["eps"]),),
    lambda d: (transcription.sinkhorn(d["logits"], d["iters"], d["eps"]),),
    ("logits",), ("sinkhorn_iters", "sinkhorn_eps")))
_case(OpCase(
    "pre_apply_mix", _make_apply,
    lambda mk, d: (mk.pre_apply_mix(d["residual"], d["pre_mix"]),),
    lambda d: (oracle.pre_apply_mix(d["residual"], d["pre_mix"]),),
    lambda d: (transcription.pre_apply_mix(d["residual"], d["pre_mix"]),),
    ("residual", "pre_mix")))
_case(OpCase(
    "post", _make_post,
    lambda mk, d: (mk.mhc_post(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"]),),
    lambda d: (oracle.post(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"]),),
    lambda d: (transcription.post(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"]),),
    ("layer_output", "residual", "post_mix", "comb_mix")))
_case(OpCase(
    "mhc_pre", _make_pre,
    lambda mk, d: mk.mhc_pre(d["residual"], d["fn"], d["scale"], d["base"], **_sp_keywords(d)),
    lambda d: oracle.mhc_pre(d["residual"], d["fn"], d["scale"], d["base"], **_sp_keywords(d)),
    lambda d: transcription.mhc_pre(d["residual"], d["fn"], d["scale"], d["base"], **_sp_keywords(d)),
    ("residual", "fn", "scale", "base", "norm_weight", "out_norm_weight"), _SP_CONSTS))
_case(OpCase(
    "expand", _make_expand,
    lambda mk, d: (mk.expand(d["hidden"], d["n"]),),
    lambda d: (oracle.expand(d["hidden"], d["n"]),),
    lambda d: (transcription.expand(d["hidden"], d["n"]),),
    ("hidden",)))
_case(OpCase(
    "mhc_head", _make_head,
    lambda mk, d: (mk.mhc_head(d["residual"], d["fn"], d["scale"], d["base"], norm_weight=d["norm_weight"],
                               norm_eps=d["norm_eps"], pre_eps=d["pre_eps"]),),
    lambda d: (oracle.mhc_head(d["residual"], d["fn"], d["scale"], d["base"], d["norm_weight"], d["norm_eps"],
                               d["pre_eps"]),),
    lambda d: (transcription.mhc_head(d["residual"], d["fn"], d["scale"], d["base"], d["norm_weight"],
                                      d["norm_eps"], d["pre_eps"]),),
    ("residual", "fn", "scale", "base", "norm_weight"), ("norm_eps", "pre_eps")))
_case(OpCase(
    "post_pre", _make_post_pre,
    lambda mk, d: mk.post_pre(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"], d["fn"], d["scale"],
                              d["base"], **_sp_keywords(d)),
    lambda d: oracle.post_pre(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"], d["fn"], d["scale"],
                              d["base"], **_sp_keywords(d), store=_stored_as(d)),
    lambda d: transcription.post_pre(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"], d["fn"],
                                     d["scale"], d["base"], **_sp_keywords(d), store=_stored_as(d)),
    ("layer_output", "residual", "post_mix", "comb_mix", "fn", "scale", "base", "norm_weight", "out_norm_weight"),
    _SP_CONSTS,
    stored_output=0, grads_through_act=("layer_output", "residual", "post_mix", "comb_mix")))


_case(OpCase(
    "mhc_pre_sp", _make_pre_sp,
    lambda mk, d: mk.mhc_pre_sp(d["residual"], d["prev_pre"], d["fn"], d["scale"], d["base"], **_sp_keywords(d)),
    lambda d: oracle.mhc_pre_sp(d["residual"], d["prev_pre"], d["fn"], d["scale"], d["base"], **_sp_keywords(d)),
    lambda d: transcription.mhc_pre_sp(d["residual"], d["prev_pre"], d["fn"], d["scale"], d["base"],
                                       **_sp_keywords(d)),
    ("residual", "prev_pre", "fn", "scale", "base", "norm_weight", "out_norm_weight"), _SP_CONSTS,
    grad_scales={"prev_pre": _collapse_grad_scale("prev_pre", 0)}))
_case(OpCase(
    "post_pre_sp", _make_post_pre_sp,
    lambda mk, d: mk.post_pre_sp(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"], d["prev_pre"],
                                 d["fn"], d["scale"], d["base"], **_sp_keywords(d)),
    lambda d: oracle.post_pre_sp(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"], d["prev_pre"],
                                 d["fn"], d["scale"], d["base"], store=_stored_as(d), **_sp_keywords(d)),
    lambda d: transcription.post_pre_sp(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"],
                                        d["prev_pre"], d["fn"], d["scale"], d["base"], store=_stored_as(d),
                                        **_sp_keywords(d)),
    ("layer_output", "residual", "post_mix", "comb_mix", "prev_pre", "fn", "scale", "base", "norm_weight",
     "out_norm_weight"), _SP_CONSTS,
    stored_output=0, grads_through_act=("layer_output", "residual", "post_mix", "comb_mix"),
    grad_scales={"prev_pre": _collapse_grad_scale("prev_pre", 0)}))
_case(OpCase(
    "mhc_head_sp", _make_head_sp,
    lambda mk, d: (mk.mhc_head_sp(d["residual"], d["pre"], out_norm_weight=d["out_norm_weight"],
                                  out_norm_eps=d["out_norm_eps"]),),
    lambda d: (oracle.mhc_head_sp(d["residual"], d["pre"], d["out_norm_weight"], d["out_norm_eps"]),),
    lambda d: (transcription.mhc_head_sp(d["residual"], d["pre"], d["out_norm_weight"], d["out_norm_eps"]),),
    ("residual", "pre", "out_norm_weight"), ("out_norm_eps",), grad_scales={"pre": _collapse_grad_scale("pre", 0)}))


FP8_NAMES = {128: "e4m3_g128", 32: "e4m3_g32"}


def fp8_width(C: int) -> int:
    """The width a quantize_fp8 case uses for a requested ``C``: rounded up to whole groups of 128 (any group
    then fits, and the schema's default group 128 works)."""
    return max(128, -(-C // 128) * 128)


def _make_quantize(gen, lead, n, C, dtype, device, nw, consts):
    """A layer input of whole FP8 groups (``fp8_width``; groups of 32 for an odd ``C``, else 128) with magnitudes
    over 16 decades across tokens (8 in fp16), an all-zero first group, and values at the e4m3 rounding ties of
    its scale."""
    Cq = fp8_width(C)
    group = 32 if C % 2 else 128        # an odd requested C exercises the E8M0 groups of 32
    T = int(np.prod(lead)) if lead else 1
    span = 4 if dtype == torch.float16 else 8       # within fp16's range
    mag = torch.logspace(-span, span, max(T, 1), dtype=torch.float64)[:T].reshape(tuple(lead) + (1,))
    x = torch.randn(tuple(lead) + (Cq,), generator=gen, dtype=torch.float64) * mag
    if x.numel():
        flat = x.reshape(-1, Cq)
        flat[0, :group] = 0.0
        if T > 1:   # exact ties of the grid: 448 * (k + 1/2) / 8 over a group whose amax is 448
            ties = [448.0] + [(8 + k % 8 + 0.5) * 2.0 ** (k % 5 - 2) for k in range(1, group)]
            flat[1, :group] = torch.tensor(ties, dtype=torch.float64)
    return {"x": x.to(dtype=dtype, device=device), "group": group}


_case(OpCase(
    "quantize_fp8", _make_quantize,
    lambda mk, d: mk.quantize_fp8(d["x"], FP8_NAMES[d["group"]]),
    lambda d: oracle.quantize_fp8(d["x"], d["group"]),
    lambda d: transcription.quantize_fp8(d["x"], d["group"]),
    ()))


RECOMPUTE_OP = "multilayer_recompute"
DEFAULT_LAYERS = 3  # sites of a multilayer_recompute input unless told otherwise
_RECOMPUTE_ARGS = ("residual", "layer_outputs", "pre_mix", "post_mix", "comb_mix")


def _make_recompute(gen, lead, n, C, dtype, device, nw, consts):
    """x_0, the sublayer outputs and the saved mixes of ``consts["layers"]`` sites. The comb mixes are doubly
    stochastic-ish (as Sinkhorn makes them), so the residual stays O(1) over the layers and the tolerance is
    meaningful at every depth."""
    L = consts["layers"]
    md = _mix_dtype(dtype)
    logits = torch.randn((L,) + lead + (n, n), generator=gen, dtype=torch.float64)
    return {
        "residual": _residual(gen, lead, n, C, dtype, device),
        "layer_outputs": _randn(gen, (L,) + lead + (C,), dtype, device),
        "pre_mix": _rand(gen, (L,) + lead + (n,), md, device, 0.0, 1.0),
        "post_mix": _rand(gen, (L,) + lead + (n,), md, device, 0.0, 2.0),
        "comb_mix": torch.from_numpy(oracle.sinkhorn(logits, 20, 1e-6)).to(dtype=md, device=device),
    }


def _recompute_args(d):
    return [d[k] for k in _RECOMPUTE_ARGS]


_case(OpCase(
    RECOMPUTE_OP, _make_recompute,
    lambda mk, d: mk.multilayer_recompute(*_recompute_args(d)),
    lambda d: oracle.multilayer_recompute(*_recompute_args(d), stored=d.get("stored")),
    lambda d: transcription.multilayer_recompute(*_recompute_args(d), stored=d.get("stored")),
    (), stored_output=0))


def make_inputs(op: str, lead, n: int, C: int, dtype: torch.dtype, device="cpu", *, norm_weight=False,
                consts: Optional[dict] = None, seed: int = 0, L: int = DEFAULT_LAYERS) -> dict:
    """Named inputs for ``op`` with leading dims ``lead`` (a tuple; ``()`` for none); ``L`` layers for
    ``multilayer_recompute``."""
    gen = torch.Generator().manual_seed(seed)
    c = dict(DEFAULT_CONSTS)
    c.update(consts or {})
    c["layers"] = L
    d = CASES[op].make(gen, tuple(lead), n, C, dtype, torch.device(device), norm_weight, c)
    if op in FP8_BOUNDARY_OPS:
        d.setdefault("fp8_group", 0)   # no FP8 copy (test_fp8 covers it)
    return d


# The boundary ops that can also write the FP8 copy of their layer input (argument ``fp8_group``).
FP8_BOUNDARY_OPS = ("mhc_pre", "post_pre", "mhc_pre_sp", "post_pre_sp")


# -- one input recipe for every op, forward or backward (tests, tuner and bench) -------------------------
# Backward-op arguments that are not "grad_<forward output>" (the one alias table).
GRAD_ALIASES = {("sinkhorn_bwd", "grad"): "grad_comb_mix"}


def _tiled(v: torch.Tensor, T: int, at: int) -> torch.Tensor:
    """``v`` repeated along its token axis ``at`` up to ``T`` tokens."""
    t0 = v.shape[at]
    if t0 == T:
        return v
    reps = [1] * v.dim()
    reps[at] = -(-T // t0)
    return v.repeat(reps).narrow(at, 0, T).contiguous()


def _token_axis(op: str, name: str):
    """Where the token dims sit in argument or output ``name`` of ``op`` (``grad_<output>``: the output's)."""
    from mhc_kernels.specs import SPECS

    spec = SPECS[op]
    for t in spec.tensor_args + spec.outputs:
        if t.name == name or "grad_" + t.name == name:
            if t.shape and t.shape[0] == "*":
                return 0
            if len(t.shape) > 1 and t.shape[:2] == ("L", "*"):
                return 1
    return None


def _leads(T_or_lead, tile):
    """-> (lead dims, the lead dims to generate, T): with ``tile`` a long single token dim is generated short."""
    lead = (T_or_lead,) if isinstance(T_or_lead, int) else tuple(T_or_lead)
    T = lead[0] if len(lead) == 1 else None
    gen = (max(1, min(T, tile)),) if tile is not None and T is not None and T > tile else lead
    return lead, gen, T


def _placed(op: str, d: dict, lead, gen_lead, T, device) -> dict:
    """``d``'s tensors on ``device``, repeated along their token axis up to ``T`` where generated short."""
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            at = _token_axis(op, k) if gen_lead != lead else None
            v = (_tiled(v, T, at) if at is not None else v).to(device)
        out[k] = v
    return out


def _forward_inputs(op, lead, n, C, dtype, device, *, norm_weight, consts, seed, L):
    return make_inputs(op, lead, n, C, dtype, device, norm_weight=norm_weight, consts=consts, seed=seed, L=L)


def backward_pool(fwd_op: str, T_or_lead, n: int, C: int, dtype: torch.dtype, device="cpu", *, norm_weight=False,
                  consts=None, seed: int = 0, tile: Optional[int] = None, L: int = DEFAULT_LAYERS) -> dict:
    """Forward inputs of ``fwd_op``, the reference forward's outputs (by spec output name) and a random upstream
    gradient ``grad_<output>`` for every non-auxiliary output (in its dtype); ``tile`` as for :func:`op_inputs`."""
    from mhc_kernels import ops, registry
    from mhc_kernels.specs import SPECS

    lead, gen_lead, T = _leads(T_or_lead, tile)
    d = _forward_inputs(fwd_op, gen_lead, n, C, dtype, "cpu", norm_weight=norm_weight, consts=consts, seed=seed, L=L)
    spec = SPECS[fwd_op]
    with torch.no_grad(), registry.use_backend("reference"):
        outs = ops.BODIES[fwd_op](*[d[a] for a in spec.arg_names])
    outs = (outs,) if isinstance(outs, torch.Tensor) else outs
    gen = torch.Generator().manual_seed(seed + 1)
    pool = dict(d)
    for o, t in zip(spec.outputs, outs):
        pool[o.name] = t
        if not o.aux:
            pool["grad_" + o.name] = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
    return _placed(fwd_op, pool, lead, gen_lead, T, device)


def op_inputs(op: str, T_or_lead, n: int, C: int, dtype: torch.dtype, device="cpu", *, norm_weight=False,
              consts: Optional[dict] = None, seed: int = 0, optional: bool = False, tile: Optional[int] = None,
              L: int = DEFAULT_LAYERS) -> dict:
    """Named arguments (schema names) of any op, forward or backward, with leading dims ``T_or_lead`` (an int
    ``T`` or a tuple) on ``device``: the one input recipe of the tests, the tuner and the benchmarks.

    Forward ops take :func:`make_inputs` (``multilayer_recompute``: :func:`make_recompute_inputs` with ``L``
    layers). A backward op ``<op>_bwd`` takes its forward's inputs, the reference forward's outputs (the
    saved ``mixes``/``rstd``) and random upstream gradients (:func:`backward_pool`; names by
    :data:`GRAD_ALIASES`); an optional tensor that is not a forward output (``mhc_pre_bwd``'s
    ``grad_residual``) is random with ``optional=True``, else ``None``. With ``tile``, at most ``tile`` tokens
    are generated on the CPU and repeated along the token axis up to ``T`` on ``device`` (no float64 staging
    of huge shapes; a single leading dim only).
    """
    from mhc_kernels.specs import ACT, SPECS, TensorArg

    lead, gen_lead, T = _leads(T_or_lead, tile)
    if not op.endswith("_bwd"):
        d = _forward_inputs(op, gen_lead, n, C, dtype, "cpu", norm_weight=norm_weight, consts=consts, seed=seed, L=L)
        return _placed(op, d, lead, gen_lead, T, device)
    spec = SPECS[op]
    pool = backward_pool(op[:-len("_bwd")], gen_lead, n, C, dtype, norm_weight=norm_weight, consts=consts,
                         seed=seed, L=L)
    gen = torch.Generator().manual_seed(seed + 2)
    d = {}
    for a in spec.args:
        key = GRAD_ALIASES.get((op, a.name), a.name)
        if key in pool:
            d[a.name] = pool[key]
        elif isinstance(a, TensorArg) and a.optional:
            shape = tuple(gen_lead) + tuple(n if s == "n" else C for s in a.shape[1:])
            dt = dtype if a.kind == ACT else _mix_dtype(dtype)
            d[a.name] = torch.randn(shape, generator=gen, dtype=torch.float64).to(dt) if optional else None
        else:
            raise KeyError(f"{op}: no input for argument {a.name!r}")
    return _placed(op, d, lead, gen_lead, T, device)


def op_args(op: str, T_or_lead, n: int, C: int, dtype: torch.dtype, device="cpu", **kw) -> tuple:
    """:func:`op_inputs` in schema order (what ``torch.ops.mhc.<op>`` takes)."""
    from mhc_kernels.specs import SPECS

    d = op_inputs(op, T_or_lead, n, C, dtype, device, **kw)
    return tuple(d[a] for a in SPECS[op].arg_names)


# Where the oracle runs. Small shapes: the NumPy float64 oracle on the CPU (the contract's own arithmetic). Large
# shapes on a GPU: the float64 transcription in torch *on the device* -- copying a T=16384 site to the CPU and
# evaluating it there costs about a minute and ~24 GB per test, more than the kernels under test. On CPU-sized
# cases the two agree to within rounding (test_reference_numerics checks it per op); the stored intermediate of
# post_pre is taken unrounded from a second pass, as the NumPy oracle does.
ORACLE_ENV = "MHC_KERNELS_ORACLE"              # auto (default) | numpy | device
DEVICE_ORACLE_MIN_ELEMENTS = 1 << 22           # auto: a CUDA input this large moves the oracle to the device


def oracle_device(inputs: dict) -> Optional[torch.device]:
    """The device the float64 torch oracle runs on for ``inputs``, or None for the NumPy oracle on the CPU.

    ``MHC_KERNELS_ORACLE=numpy`` always answers None, ``device`` always the inputs' device (CPU included: how the
    device path is tested without a GPU); ``auto`` the inputs' CUDA device when a tensor input has at least
    :data:`DEVICE_ORACLE_MIN_ELEMENTS` elements."""
    import os

    mode = os.environ.get(ORACLE_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "numpy", "device"):
        raise ValueError(f"{ORACLE_ENV} must be auto, numpy or device; got {mode!r}")
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    if mode == "numpy" or not tensors:
        return None
    dev = tensors[0].device
    if mode == "device":
        return dev
    big = max(v.numel() for v in tensors) >= DEVICE_ORACLE_MIN_ELEMENTS
    return dev if dev.type == "cuda" and big else None


def _naive_inputs(inputs: dict, device=None) -> dict:
    """The inputs as the working-precision transcription takes them (on ``device``, default CPU; same dtypes)."""
    dev = device if device is not None else "cpu"
    return {k: v.detach().to(dev) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _f64(v, device):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.detach().to(device=device, dtype=torch.float64)
    return v.detach().to(device) if isinstance(v, torch.Tensor) else v


def _transcribed(case: OpCase, d: dict) -> list[torch.Tensor]:
    """``case.transcription(d)`` (no autograd). A stored intermediate (``case.stored_output``: post_pre's new
    residual) is the backend's own value in the pass that evaluates the later stages at it, so its own value comes
    from a second pass without it: else a wrong stored output would be its own expectation (the oracle) or its
    own slack (the working-precision transcription)."""
    with torch.no_grad():
        out = list(case.transcription(d))
        if case.stored_output is not None and d.get("stored") is not None:
            out[case.stored_output] = case.transcription(dict(d, stored=None))[case.stored_output]
    return out


def device_oracle(case: OpCase, inputs: dict, device) -> list[torch.Tensor]:
    """The forward outputs by the float64 transcription on ``device`` (the oracle of large shapes on a GPU); the
    stored intermediate exact, as the NumPy oracle gives it (:func:`_transcribed`)."""
    return _transcribed(case, {k: _f64(v, device) for k, v in inputs.items()})


def check_forward(mk, op: str, inputs: dict) -> list[Mismatch]:
    """Run the public op and compare every output with the oracle (:func:`oracle_device` says which)."""
    case = CASES[op]
    outs = case.run(mk, inputs)
    dev = oracle_device(inputs)
    inputs = _with_stored(case, inputs, outs, dev)
    expected = case.oracle(inputs) if dev is None else device_oracle(case, inputs, dev)
    naive = _transcribed(case, _naive_inputs(inputs, dev))
    return [compare(f"{op}.out{i}", o, e, naive=nv) for i, (o, e, nv) in enumerate(zip(outs, expected, naive))]


def check_backward(mk, op: str, inputs: dict, seed: int = 1) -> list[Mismatch]:
    """Backward of the public op vs autograd through the float64 transcription.

    The upstream gradients are random values stored in each output's dtype; the
    oracle sees exactly the same (upcast) values.
    """
    case = CASES[op]
    if not case.differentiable:  # multilayer_recompute: forward only
        return []
    diff = [k for k in case.differentiable if inputs.get(k) is not None]
    leaves = {k: v.detach().clone().requires_grad_() if k in diff else v for k, v in inputs.items()}
    outs = case.run(mk, leaves)
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).to(o.device) for o in outs]
    torch.autograd.backward(outs, grads)
    dev = oracle_device(inputs)          # None: the CPU
    inputs = _with_stored(case, inputs, outs, dev)

    def transcription_grads(cast, token_sign=None):
        d = _naive_inputs(inputs, dev)
        d.update({k: cast(d[k]).requires_grad_() for k in diff})
        d.update({k: cast(v) for k, v in d.items() if k not in diff and isinstance(v, torch.Tensor)})
        ref_outs = case.transcription(d)
        up = [cast(g.detach().to(dev or "cpu")) for g in grads]
        if token_sign is not None:
            token_sign = token_sign.to(dev or "cpu")
            up = [u * token_sign.reshape(token_sign.shape + (1,) * (u.dim() - token_sign.dim())) for u in up]
        torch.autograd.backward(ref_outs, up)
        return {k: d[k].grad for k in diff}

    f64 = lambda t: t.to(torch.float64)  # noqa: E731
    exact = transcription_grads(f64)                 # the gradient oracle
    naive = transcription_grads(lambda t: t)         # working precision, for the slack
    lead = tuple(outs[0].shape[:outs[0].dim() - _trailing_dims(op)])
    flipped = [transcription_grads(f64, torch.randint(0, 2, lead, generator=gen).to(torch.float64) * 2 - 1)
               for _ in range(2)]
    res = []
    for k in diff:
        got = leaves[k].grad
        if got is None:
            res.append(Mismatch(f"{op}.d_{k}", float("inf"), float("inf"), "no gradient"))
            continue
        scale = max((float(f[k].abs().max()) if f[k].numel() else 0.0) for f in flipped)
        if k in case.grad_scales:
            scale = max(scale, case.grad_scales[k](inputs, grads))
        tol_dtype = inputs["residual"].dtype if k in case.grads_through_act else inputs[k].dtype
        res.append(compare(f"{op}.d_{k}", got, exact[k], dtype=tol_dtype, naive=naive[k], scale=scale))
    return res


def _with_stored(case: OpCase, inputs: dict, outs, device=None) -> dict:
    """For ops whose later stages read a stored intermediate output, hand the oracle that output (on ``device``,
    default the CPU)."""
    if case.stored_output is None:
        return inputs
    return dict(inputs, stored=outs[case.stored_output].detach().to(device or "cpu"))


def _trailing_dims(op: str) -> int:
    """Number of non-token dims of the op's first public output."""
    from mhc_kernels.specs import SPECS

    return len(SPECS[op].outputs[0].shape) - 1


# -- multilayer_recompute (contract §8; forward-only: it has no autograd, so no backward check) -------------
def make_recompute_inputs(lead, n: int, C: int, L: int, dtype: torch.dtype, device="cpu", *, seed: int = 0) -> dict:
    """Inputs of ``multilayer_recompute`` for ``L`` sites (:func:`make_inputs` with ``L``)."""
    return make_inputs(RECOMPUTE_OP, lead, n, C, dtype, device, seed=seed, L=L)


def check_recompute(fn: Callable, inputs: dict) -> list[Mismatch]:
    """Run ``fn(residual, layer_outputs, pre_mix, post_mix, comb_mix)`` and compare with the oracle.

    contract §8 stores each x_{l+1} in the residual dtype before it is read again, so the oracle
    continues each layer from the residual the backend stored: the expected x_{l+1} and layer
    input l are exact functions of the backend's x_l, each layer is checked on its own (to the
    dtype's tolerance), and one-ulp storage differences -- e.g. the Triton interpreter truncates
    fp32 -> bf16 where a GPU rounds to nearest -- are not compounded across layers.
    """
    case = CASES[RECOMPUTE_OP]
    outs = fn(*(inputs[k] for k in _RECOMPUTE_ARGS))
    dev = oracle_device(inputs)
    inputs = _with_stored(case, inputs, outs, dev)
    expected = case.oracle(inputs) if dev is None else device_oracle(case, inputs, dev)
    naive = _transcribed(case, _naive_inputs(inputs, dev))
    return [compare(f"{RECOMPUTE_OP}.{label}", o, e, naive=nv)
            for label, o, e, nv in zip(("residuals", "layer_inputs"), outs, expected, naive)]
