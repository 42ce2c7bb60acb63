"""Op specs: the one declaration of every operator's arguments, outputs and cost.

Each :class:`OpSpec` lists the operator's arguments in schema order (tensors with
a symbolic shape and a dtype class, scalars with a value class) and its outputs.
Everything else is derived from it:

* the ``torch.library`` schema of ``torch.ops.mhc.<name>`` (:meth:`OpSpec.schema`),
* input validation and the flattening of leading dims (``mhc_kernels.validation``),
* the fake (meta) implementations, which only evaluate the output shapes,
* the minimum bytes moved (:meth:`OpSpec.bytes`: every input read once, every
  output written once) and the FLOPs (:meth:`OpSpec.flops`), used by the
  benchmarks, the roofline report and the tuner.

Shape symbols (the contract, reference/README.md §1): ``*`` the leading (token) dims, ``n`` the
number of streams, ``C`` the hidden width, ``m = n*(n+2)`` the number of mixes,
``K = n*C`` the flattened residual width; integers are literal sizes. Two symbols
are *free*: bound by the first tensor argument that has them, not by the primary
tensor -- ``r`` the row count of a projection ``fn`` (``m`` for a site's mixes, ``n``
for the head's weights, any count for ``norm_fn``), and ``L`` a leading layer dim
(``multilayer_recompute``: ``(L, *, ...)`` tensors hold one slice per layer).

Dtype classes: ``act`` is the residual's dtype (bf16, fp16, fp32; fp64 on the
reference backend) and every tensor of class ``act`` in one call shares it;
``mix`` is float32, or float64 when the call's residual is float64 (the
all-float64 mode that ``torch.autograd.gradcheck`` needs).

FLOP convention: a multiply-add counts 2, and every other arithmetic operation
(including ``exp``, ``rsqrt`` and divisions) counts 1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional, Union

import torch

Sym = Union[str, int]

ACT = "act"
MIX = "mix"
FP8 = "fp8"        # float8_e4m3fn codes (outputs only)
FP8_BITS = "fp8_bits"  # the same codes as their uint8 bytes (outputs of differentiable ops; see _FP8_OUTPUTS)
FP8_SCALE = "fp8_scale"  # FP8 scales as stored: float32 (groups of 128) or the E8M0 byte as uint8 (groups of 32)

# Scalar value classes.
EPS = "eps"        # finite float >= 0 (an offset that may be zero: pre_eps)
POS = "pos"        # finite float > 0 (a guard against 0/0 or rsqrt(0): norm_eps, sinkhorn_eps; post_mult)
ITERS = "iters"    # int in [1, MAX_SINKHORN_ITERS]
COUNT = "count"    # int >= 1 that binds the stream count n (expand)
GROUP = "group"    # int in FP8_GROUPS: the FP8 quantisation group along C (binds G = C / group)
FP8_OPT = "fp8_opt"  # 0 (no FP8 copy) or an int in FP8_GROUPS: a boundary's FP8 layer input (binds Q, G)

# Sinkhorn rounds are unrolled into the GPU kernels (each count compiles its own TileLang kernel) and
# replayed in reverse by the backward; far past convergence (a few dozen rounds for the logits the
# gains produce) more rounds only cost time, and 10**9 would hang.
MAX_SINKHORN_ITERS = 1000

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FREE_SYMBOLS = ("r", "L", "G", "Q")

# FP8 layer-input formats (contract §15): the public name -> the group along C. A group of 128 has a float32
# scale (amax / 448, the Hopper FP8 GEMM convention), a group of 32 a power-of-two scale (E8M0, Blackwell MX).
FP8_FORMATS = {"e4m3_g128": 128, "e4m3_g32": 32}
FP8_GROUPS = tuple(sorted(FP8_FORMATS.values()))
FP8_DTYPE = torch.float8_e4m3fn


def fp8_scale_dtype(group: int) -> torch.dtype:
    """The dtype the kernels store FP8 scales in: the E8M0 byte (``uint8``: the biased exponent of the power of
    two, 0xFF for NaN; the public functions return its ``float8_e8m0fnu`` view) for groups of 32, else float32
    (groups of 128, and the empty scales of a boundary without an FP8 copy)."""
    return torch.uint8 if group == 32 else torch.float32


def fp8_group_of(C: int, G: int) -> int:
    """The FP8 group that ``G`` scales per token over ``C`` columns imply (``C`` is whole groups; 0: no scales)."""
    return C // G if G else 0


@dataclass(frozen=True)
class TensorArg:
    name: str
    shape: tuple[Sym, ...]
    kind: str
    optional: bool = False
    # Outputs only: an auxiliary output (saved per-token statistics such as the
    # raw mixes and rstd) that the public function drops and autograd treats as
    # non-differentiable.
    aux: bool = False


@dataclass(frozen=True)
class ScalarArg:
    name: str
    kind: str
    default: Union[float, int, None] = None  # the schema default (the contract's constants); None: required


Arg = Union[TensorArg, ScalarArg]


def mix_count(n):
    """m = n*(n+2): n pre-mix + n post-mix + n*n residual-mix logits."""
    return n * (n + 2)


def stream_count(m: int) -> int:
    """n from m = n*(n+2) (the inverse of :func:`mix_count`)."""
    return math.isqrt(int(m) + 1) - 1


def next_pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def prev_pow2(x: int) -> int:
    """The largest power of two <= ``x`` (1 for ``x <= 1``)."""
    return 1 << (max(int(x), 1).bit_length() - 1)


# The short dtype names of the CLI, the config store and the reports.
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
DTYPES_BY_NAME = {name: dt for dt, name in DTYPE_NAMES.items()}
ACT_DTYPE_NAMES = tuple(DTYPE_NAMES[dt] for dt in (torch.bfloat16, torch.float16, torch.float32))


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (other dtypes: their torch name without the prefix)."""
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def dim_value(sym: Sym, n, C, sizes=None):
    """Size of one non-leading shape symbol (works on SymInts as well as ints); ``sizes`` binds the
    free symbols (``r``, ``L``)."""
    if isinstance(sym, int):
        return sym
    if sym == "n":
        return n
    if sym == "C":
        return C
    if sym == "m":
        return mix_count(n)
    if sym == "K":
        return n * C
    if sym in FREE_SYMBOLS and sizes is not None and sym in sizes:
        return sizes[sym]
    raise KeyError(f"unknown shape symbol {sym!r}")


def token_axis(shape) -> Optional[int]:
    """Where the token dims sit in a tensor of this shape template: 0, 1 behind a layer dim ``L``, or None
    (a parameter: no token dims)."""
    if shape and shape[0] == "*":
        return 0
    if len(shape) > 1 and shape[0] == "L" and shape[1] == "*":
        return 1
    return None


def default_sizes(n, C=None) -> dict:
    """Free symbols' values where a cost model is asked without them: a site's ``m`` rows, one layer, FP8
    groups of 128 (of 32 when C is not a multiple of 128) and a full row of FP8 codes (``Q = C``; the boundary
    ops' FP8 outputs are optional, so they count only when named in ``present``)."""
    out = {"r": mix_count(n), "L": 1}
    if C is not None:
        out["G"] = max(1, C // 128 if C % 128 == 0 else C // 32)
        out["Q"] = C
    return out


def fp8_sizes(C, group: int) -> dict:
    """The FP8 symbols a boundary call binds: ``Q`` code columns and ``G`` scales per token -- ``C`` and
    ``C / group`` with an FP8 copy, both 0 without one (``group == 0``)."""
    if not group:
        return {"Q": 0, "G": 0}
    return {"Q": C, "G": C // group}


def format_template(shape: tuple[Sym, ...]) -> str:
    """``("*", "n", "C")`` -> ``(..., n, C)``; ``("m",)`` -> ``(m,)``; ``("r", "K")`` -> ``(rows, K)``."""
    names = {"*": "...", "r": "rows", "G": "C/group", "Q": "C"}
    parts = [names.get(s, str(s)) if isinstance(s, str) else str(s) for s in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


@dataclass(frozen=True)
class OpSpec:
    name: str
    args: tuple[Arg, ...]
    outputs: tuple[TensorArg, ...]
    primary: str
    flops_fn: Callable[..., float]
    summary: str
    # Whether the op has an autograd formula (``mhc_kernels.ops``): every forward op but
    # multilayer_recompute (which runs inside backward); backward ops are not differentiated again.
    differentiable: bool = True

    # -- derived views (cached: validation reads them on every call) -------------
    @cached_property
    def tensor_args(self) -> tuple[TensorArg, ...]:
        return tuple(a for a in self.args if isinstance(a, TensorArg))

    @cached_property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @cached_property
    def primary_index(self) -> int:
        return self.arg_names.index(self.primary)

    def arg(self, name: str) -> Arg:
        for a in self.args:
            if a.name == name:
                return a
        raise KeyError(name)

    @cached_property
    def has_act(self) -> bool:
        return any(a.kind == ACT for a in self.tensor_args)

    @cached_property
    def defaults(self) -> dict:
        """The schema defaults: of the trailing arguments that have one (optional tensors: ``None``;
        scalars: the contract's constants). An argument before a required one keeps no default."""
        out = {}
        for a in reversed(self.args):
            if isinstance(a, TensorArg) and a.optional:
                out[a.name] = None
            elif isinstance(a, ScalarArg) and a.default is not None:
                out[a.name] = a.default
            else:
                break
        return out

    @cached_property
    def required(self) -> tuple[str, ...]:
        """Names of the arguments a call must give (those without a schema default)."""
        return tuple(n for n in self.arg_names if n not in self.defaults)

    def schema(self) -> str:
        """The torch.library schema string, e.g. ``(Tensor residual, ..., float norm_eps=1e-06) -> (Tensor, ...)``."""
        parts = []
        for a in self.args:
            if isinstance(a, TensorArg):
                p = f"Tensor{'?' if a.optional else ''} {a.name}"
            elif a.kind in (ITERS, COUNT, GROUP, FP8_OPT):
                p = f"int {a.name}"
            else:
                p = f"float {a.name}"
            if a.name in self.defaults:
                d = self.defaults[a.name]
                p += "=None" if d is None else f"={d!r}"
            parts.append(p)
        outs = ", ".join("Tensor" for _ in self.outputs)
        ret = outs if len(self.outputs) == 1 else f"({outs})"
        return f"({', '.join(parts)}) -> {ret}"

    # -- cost model ------------------------------------------------------------
    def tensor_numel(self, t: TensorArg, T: int, n: int, C: int, sizes=None) -> int:
        sizes = sizes or default_sizes(n, C)
        numel = 1
        for s in t.shape:
            numel *= T if s == "*" else dim_value(s, n, C, sizes)
        return numel

    def bytes(self, T: int, n: int, C: int, dtype: torch.dtype, present: tuple[str, ...] = (), **sizes) -> int:
        """Minimum bytes moved: every input read once and every output written once.

        ``dtype`` is the residual (``act``) dtype; ``mix`` tensors are float32, or
        float64 alongside a float64 residual. Optional inputs count only when
        named in ``present``. ``sizes`` binds the free symbols (``r``: fn's rows,
        default ``m``; ``L``: layers, default 1).
        """
        sizes = {**default_sizes(n, C), **sizes}
        act = torch.empty((), dtype=dtype).element_size()
        mix = 8 if dtype == torch.float64 else 4
        if not self.has_act:
            mix = act  # ops without a residual (split_mixes, sinkhorn): dtype is the mix dtype
        total = 0
        for t in self.tensor_args + self.outputs:
            if t.optional and t.name not in present:
                continue
            if t.kind == FP8_SCALE:
                width = fp8_scale_dtype(fp8_group_of(C, sizes["G"])).itemsize
            else:
                width = act if t.kind == ACT else 1 if t.kind in (FP8, FP8_BITS) else mix
            total += self.tensor_numel(t, T, n, C, sizes) * width
        return total

    def flops(self, T: int, n: int, C: int, iters: int = 20, **sizes) -> float:
        """FLOPs of one call (``sizes`` as for :meth:`bytes`)."""
        sizes = {**default_sizes(n), **sizes}
        return float(self.flops_fn(T, n, C, iters, sizes))


# -- building blocks -----------------------------------------------------------
def _t(name, shape, kind=MIX, optional=False, aux=False):
    return TensorArg(name, tuple(shape), kind, optional, aux)


def _residual(name="residual"):
    return _t(name, ("*", "n", "C"), ACT)


def _hidden(name):
    return _t(name, ("*", "C"), ACT)


# the contract's constants, with their defaults
_NORM_EPS = ScalarArg("norm_eps", POS, 1e-6)
_PRE_EPS = ScalarArg("pre_eps", EPS, 1e-6)
_POST_MULT = ScalarArg("post_mult", POS, 2.0)
_ITERS = ScalarArg("sinkhorn_iters", ITERS, 20)
_SK_EPS = ScalarArg("sinkhorn_eps", POS, 1e-6)
_SPLIT_CONSTS = (_PRE_EPS, _POST_MULT, _ITERS, _SK_EPS)


# -- FLOP models (per the contract; see the module docstring's convention) --
def _f_norm(T, n, C, rows):
    K = n * C
    return 2 * T * K * rows + 2 * T * K + 2 * T * rows + 3 * T


def _f_norm_bwd(T, n, C, rows):
    K = n * C
    return 4 * T * K * rows + 4 * T * K + 4 * T * rows


def _f_sinkhorn(T, n, iters):
    # softmax (exp, sum, divide) + eps, then per round a sum and a divide over n*n
    return T * n * n * (4 + 4 * iters - 2)


def _f_split(T, n, iters):
    return T * (2 * mix_count(n) + 8 * n) + _f_sinkhorn(T, n, iters)


def _f_split_bwd(T, n, iters):
    return T * (4 * mix_count(n) + 8 * n) + 3 * _f_sinkhorn(T, n, iters)


def _f_apply(T, n, C):
    return 2 * T * n * C


def _f_post(T, n, C):
    return T * n * C * (2 * n + 1)


SPECS: dict[str, OpSpec] = {}


def _register(spec: OpSpec) -> OpSpec:
    if spec.name.endswith("_bwd"):  # backward ops are not differentiated again
        spec = dataclasses.replace(spec, differentiable=False)
    SPECS[spec.name] = spec
    return spec


_register(OpSpec(
    "norm_fn",
    (_residual(), _t("fn", ("r", "K")), _t("norm_weight", ("K",), optional=True), _NORM_EPS),
    (_t("mixes", ("*", "r")), _t("rstd", ("*",), aux=True)),
    "residual",
    lambda T, n, C, I, z: _f_norm(T, n, C, z["r"]),
    "reordered RMSNorm projection: mixes = (x_flat @ fn^T) * rsqrt(mean(x_flat^2) + eps); fn may have any row "
    "count (n*(n+2) for a site)",
))
_register(OpSpec(
    "norm_fn_bwd",
    (_t("grad_mixes", ("*", "r")), _residual(), _t("fn", ("r", "K")), _t("norm_weight", ("K",), optional=True),
     _t("mixes", ("*", "r")), _t("rstd", ("*",))),
    (_residual("d_residual"), _t("d_fn", ("r", "K"))),
    "residual",
    lambda T, n, C, I, z: _f_norm_bwd(T, n, C, z["r"]),
    "norm_fn backward; d_fn is the gradient of the folded projection fn * norm_weight",
))
_register(OpSpec(
    "split_mixes",
    (_t("mixes", ("*", "m")), _t("scale", (3,)), _t("base", ("m",))) + _SPLIT_CONSTS,
    (_t("pre_mix", ("*", "n")), _t("post_mix", ("*", "n")), _t("comb_mix", ("*", "n", "n"))),
    "mixes",
    lambda T, n, C, I, z: _f_split(T, n, I),
    "scale/bias the mixes, sigmoid the pre/post mixes, Sinkhorn-project the residual mix",
))
_register(OpSpec(
    "split_mixes_bwd",
    (_t("grad_pre_mix", ("*", "n")), _t("grad_post_mix", ("*", "n")), _t("grad_comb_mix", ("*", "n", "n")),
     _t("mixes", ("*", "m")), _t("scale", (3,)), _t("base", ("m",)), _POST_MULT, _ITERS, _SK_EPS),
    (_t("d_mixes", ("*", "m")), _t("d_scale", (3,)), _t("d_base", ("m",))),
    "mixes",
    lambda T, n, C, I, z: _f_split_bwd(T, n, I),
    "split_mixes backward (Sinkhorn recomputed and run in reverse)",
))
_register(OpSpec(
    "sinkhorn",
    (_t("logits", ("*", "n", "n")), ScalarArg("iters", ITERS, 20), ScalarArg("eps", POS, 1e-6)),
    (_t("comb_mix", ("*", "n", "n")),),
    "logits",
    lambda T, n, C, I, z: _f_sinkhorn(T, n, I),
    "Sinkhorn-Knopp projection of exp(logits) with eps guards, I row/column rounds",
))
_register(OpSpec(
    "sinkhorn_bwd",
    (_t("grad", ("*", "n", "n")), _t("logits", ("*", "n", "n")), ScalarArg("iters", ITERS, 20),
     ScalarArg("eps", POS, 1e-6)),
    (_t("d_logits", ("*", "n", "n")),),
    "logits",
    lambda T, n, C, I, z: 3 * _f_sinkhorn(T, n, I),
    "exact gradient of the unrolled Sinkhorn iterations",
))
_register(OpSpec(
    "pre_apply_mix",
    (_residual(), _t("pre_mix", ("*", "n"))),
    (_hidden("layer_input"),),
    "residual",
    lambda T, n, C, I, z: _f_apply(T, n, C),
    "collapse the streams: layer_input = sum_i pre_mix_i * x_i",
))
_register(OpSpec(
    "pre_apply_mix_bwd",
    (_hidden("grad_layer_input"), _residual(), _t("pre_mix", ("*", "n"))),
    (_residual("d_residual"), _t("d_pre_mix", ("*", "n"))),
    "residual",
    lambda T, n, C, I, z: 3 * T * n * C,
    "pre_apply_mix backward",
))
_register(OpSpec(
    "post",
    (_hidden("layer_output"), _residual(), _t("post_mix", ("*", "n")), _t("comb_mix", ("*", "n", "n"))),
    (_residual("new_residual"),),
    "residual",
    lambda T, n, C, I, z: _f_post(T, n, C),
    "merge: out_i = post_mix_i * y + sum_j comb_mix[j, i] * x_j",
))
_register(OpSpec(
    "post_bwd",
    (_residual("grad_new_residual"), _hidden("layer_output"), _residual(), _t("post_mix", ("*", "n")),
     _t("comb_mix", ("*", "n", "n"))),
    (_hidden("d_layer_output"), _residual("d_residual"), _t("d_post_mix", ("*", "n")),
     _t("d_comb_mix", ("*", "n", "n"))),
    "residual",
    lambda T, n, C, I, z: T * C * (4 * n * n + 4 * n),
    "post backward",
))
# The sublayer's RMSNorm of the layer input (contract §6, §14): an optional weight (C,) and its eps. The FLOPs
# of the ops that take it leave the norm out (4 per element: a small, separate term of a memory-bound op), as
# bytes leave out absent optional tensors.
_OUT_NORM_WEIGHT = _t("out_norm_weight", ("C",), optional=True)
_OUT_NORM_EPS = ScalarArg("out_norm_eps", POS, 1e-6)
# The FP8 copy of the layer input (contract §15), written by the kernel that writes the layer input: 0 (none),
# 128 (e4m3_g128) or 32 (e4m3_g32). Its outputs are (..., C) codes and (..., C/group) scales with a group, and
# (..., 0) of each without one; they are auxiliary (not differentiable) and optional in the cost model. The codes
# are the float8_e4m3fn bytes as uint8 and the scales float32 (group 128) or E8M0 bytes as uint8 (group 32:
# fp8_scale_dtype); the public functions return the float8 views of them (free, no launch). PyTorch's custom-op
# tooling (opcheck's AOT-autograd check, aot_autograd's tangents) reduces every output of a differentiable op,
# which float8 tensors do not support.
_FP8_GROUP = ScalarArg("fp8_group", FP8_OPT, 0)
_FP8_OUTPUTS = (_t("fp8_codes", ("*", "Q"), FP8_BITS, optional=True, aux=True),
                _t("fp8_scales", ("*", "G"), FP8_SCALE, optional=True, aux=True))
_MHC_PRE_OUTPUTS = (_hidden("layer_input"), _t("post_mix", ("*", "n")), _t("comb_mix", ("*", "n", "n")),
                    _t("mixes", ("*", "m"), aux=True), _t("rstd", ("*",), aux=True),
                    _t("out_rstd", ("*",), aux=True)) + _FP8_OUTPUTS
_PRE_PARAMS = (_t("fn", ("m", "K")), _t("scale", (3,)), _t("base", ("m",)), _t("norm_weight", ("K",), optional=True),
               _OUT_NORM_WEIGHT)
_PRE_CONSTS = (_NORM_EPS,) + _SPLIT_CONSTS + (_OUT_NORM_EPS, _FP8_GROUP)
_register(OpSpec(
    "mhc_pre",
    (_residual(),) + _PRE_PARAMS + _PRE_CONSTS,
    _MHC_PRE_OUTPUTS,
    "residual",
    lambda T, n, C, I, z: _f_norm(T, n, C, mix_count(n)) + _f_split(T, n, I) + _f_apply(T, n, C),
    "norm_fn -> split_mixes -> pre_apply_mix (then the sublayer's RMSNorm when out_norm_weight is given); also "
    "returns the raw mixes, rstd and out_rstd saved for backward",
))
_register(OpSpec(
    "mhc_pre_bwd",
    (_hidden("grad_layer_input"), _t("grad_post_mix", ("*", "n")), _t("grad_comb_mix", ("*", "n", "n")),
     _residual()) + _PRE_PARAMS
    + (_t("mixes", ("*", "m")), _t("rstd", ("*",)), _t("out_rstd", ("*",), optional=True),
       _t("grad_residual", ("*", "n", "C"), ACT, optional=True)) + _SPLIT_CONSTS,
    (_residual("d_residual"), _t("d_fn", ("m", "K")), _t("d_scale", (3,)), _t("d_base", ("m",)),
     _t("d_out_norm_weight", ("C",))),
    "residual",
    lambda T, n, C, I, z: (_f_norm_bwd(T, n, C, mix_count(n)) + _f_split_bwd(T, n, I) + 3 * T * n * C),
    "mhc_pre backward; grad_residual (optional) is a gradient already flowing into the residual, added in; "
    "out_rstd is needed (and read) only with out_norm_weight; d_out_norm_weight is zeros without a weight",
))
_register(OpSpec(
    "expand",
    (_hidden("hidden"), ScalarArg("n", COUNT)),
    (_residual("residual"),),
    "hidden",
    lambda T, n, C, I, z: 0,
    "copy the embedding into n identical streams",
))
_register(OpSpec(
    "expand_bwd",
    (_residual("grad_residual"),),
    (_hidden("d_hidden"),),
    "grad_residual",
    lambda T, n, C, I, z: T * n * C,
    "expand backward: sum over the streams",
))
_HEAD_ARGS = (_residual(), _t("fn", ("n", "K")), _t("scale", (1,)), _t("base", ("n",)),
              _t("norm_weight", ("K",), optional=True))
_register(OpSpec(
    "mhc_head",
    _HEAD_ARGS + (_NORM_EPS, _PRE_EPS),
    (_hidden("out"), _t("mixes", ("*", "n"), aux=True), _t("rstd", ("*",), aux=True)),
    "residual",
    lambda T, n, C, I, z: _f_norm(T, n, C, n) + 8 * T * n + _f_apply(T, n, C),
    "final collapse before the LM head: out = sum_i (sigmoid(norm_fn(x) * scale + base) + pre_eps)_i * x_i",
))
_register(OpSpec(
    "mhc_head_bwd",
    (_hidden("grad_out"),) + _HEAD_ARGS + (_t("mixes", ("*", "n")), _t("rstd", ("*",)), _PRE_EPS),
    (_residual("d_residual"), _t("d_fn", ("n", "K")), _t("d_scale", (1,)), _t("d_base", ("n",))),
    "residual",
    lambda T, n, C, I, z: _f_norm_bwd(T, n, C, n) + 12 * T * n + 3 * T * n * C,
    "mhc_head backward; d_fn is the gradient of the folded projection fn * norm_weight",
))
_register(OpSpec(
    "post_pre",
    (_hidden("layer_output"), _residual(), _t("post_mix", ("*", "n")), _t("comb_mix", ("*", "n", "n")))
    + _PRE_PARAMS + _PRE_CONSTS,
    (_residual("new_residual"),) + _MHC_PRE_OUTPUTS,
    "residual",
    lambda T, n, C, I, z: (_f_post(T, n, C) + _f_norm(T, n, C, mix_count(n)) + _f_split(T, n, I)
                           + _f_apply(T, n, C)),
    "post of sublayer l fused with mhc_pre of sublayer l+1 (the new residual is written once)",
))
_register(OpSpec(
    "multilayer_recompute",
    (_residual(), _t("layer_outputs", ("L", "*", "C"), ACT), _t("pre_mix", ("L", "*", "n")),
     _t("post_mix", ("L", "*", "n")), _t("comb_mix", ("L", "*", "n", "n"))),
    (_t("residuals", ("L", "*", "n", "C"), ACT), _t("layer_inputs", ("L", "*", "C"), ACT)),
    "residual",
    lambda T, n, C, I, z: z["L"] * _f_apply(T, n, C) + (z["L"] - 1) * _f_post(T, n, C),  # the last post is not run
    "rebuild L consecutive sites' residuals and layer inputs from the first residual (forward only: it runs "
    "inside backward)",
    differentiable=False,
))

# -- single-pass mHC (contract §14): the sublayer input collapsed with the previous site's pre --------------
_SP_PRE_ARGS = (_residual(), _t("prev_pre", ("*", "n"), optional=True)) + _PRE_PARAMS
_SP_CONSTS = _PRE_CONSTS
_SP_PRE_OUTPUTS = (_hidden("layer_input"), _t("pre", ("*", "n")), _t("post_mix", ("*", "n")),
                   _t("comb_mix", ("*", "n", "n")), _t("mixes", ("*", "m"), aux=True), _t("rstd", ("*",), aux=True),
                   _t("out_rstd", ("*",), aux=True)) + _FP8_OUTPUTS


def _f_pre_sp(T, n, C, I):
    return _f_norm(T, n, C, mix_count(n)) + _f_split(T, n, I) + _f_apply(T, n, C)


_register(OpSpec(
    "mhc_pre_sp", _SP_PRE_ARGS + _SP_CONSTS, _SP_PRE_OUTPUTS, "residual",
    lambda T, n, C, I, z: _f_pre_sp(T, n, C, I),
    "single-pass pre: this site's (pre, post_mix, comb_mix) from the residual, and the layer input collapsed "
    "with the previous site's pre (one-hot on stream 0 when absent), optionally RMS-normalised; the residual "
    "read once ((n+1)*C elements per token)",
))
_register(OpSpec(
    "mhc_pre_sp_bwd",
    (_hidden("grad_layer_input"), _t("grad_pre", ("*", "n")), _t("grad_post_mix", ("*", "n")),
     _t("grad_comb_mix", ("*", "n", "n"))) + _SP_PRE_ARGS
    + (_t("mixes", ("*", "m")), _t("rstd", ("*",)), _t("out_rstd", ("*",)),
       _t("grad_residual", ("*", "n", "C"), ACT, optional=True)) + _SPLIT_CONSTS,
    (_residual("d_residual"), _t("d_prev_pre", ("*", "n")), _t("d_fn", ("m", "K")), _t("d_scale", (3,)),
     _t("d_base", ("m",)), _t("d_out_norm_weight", ("C",))),
    "residual",
    lambda T, n, C, I, z: _f_norm_bwd(T, n, C, mix_count(n)) + _f_split_bwd(T, n, I) + 3 * T * n * C,
    "mhc_pre_sp backward: takes the next site's gradient of this site's pre, returns the previous site's; "
    "d_fn is the gradient of fn * norm_weight; d_prev_pre / d_out_norm_weight are zeros when absent",
))
_register(OpSpec(
    "post_pre_sp",
    (_hidden("layer_output"), _residual(), _t("post_mix", ("*", "n")), _t("comb_mix", ("*", "n", "n")))
    + _SP_PRE_ARGS[1:] + _SP_CONSTS,
    (_residual("new_residual"),) + _SP_PRE_OUTPUTS,
    "residual",
    lambda T, n, C, I, z: _f_post(T, n, C) + _f_pre_sp(T, n, C, I),
    "post of site s-1 fused with mhc_pre_sp of site s on the stored new residual: residual and layer output "
    "read once, new residual and layer input written once ((2n+2)*C elements per token)",
))
_register(OpSpec(
    "mhc_head_sp",
    (_residual(), _t("pre", ("*", "n")), _OUT_NORM_WEIGHT, _OUT_NORM_EPS),
    (_hidden("out"), _t("out_rstd", ("*",), aux=True)),
    "residual",
    lambda T, n, C, I, z: _f_apply(T, n, C),
    "single-pass head: the final residual collapsed with the last site's pre, optionally RMS-normalised (the "
    "model's final norm)",
))
_register(OpSpec(
    "mhc_head_sp_bwd",
    (_hidden("grad_out"), _residual(), _t("pre", ("*", "n")), _t("out_norm_weight", ("C",), optional=True),
     _t("out_rstd", ("*",))),
    (_residual("d_residual"), _t("d_pre", ("*", "n")), _t("d_out_norm_weight", ("C",))),
    "residual",
    lambda T, n, C, I, z: 3 * T * n * C,
    "mhc_head_sp backward (d_out_norm_weight is zeros without a weight)",
))

# -- FP8 copy of the layer input (contract §15) --------------------------------------------------------------
_register(OpSpec(
    "quantize_fp8",
    (_hidden("x"), ScalarArg("group", GROUP, 128)),
    (_t("codes", ("*", "C"), FP8), _t("scales", ("*", "G"), FP8_SCALE)),
    "x",
    lambda T, n, C, I, z: 7 * T * C,   # finite test, |x|, the group max, x / scale, saturation (2), rounding
    "e4m3 codes of x with one scale per group of `group` elements along C (128: float32 amax/448; 32: a power "
    "of two, stored as its E8M0 byte), from x's stored values; not differentiable (a copy for the next FP8 GEMM)",
    differentiable=False,
))

# Forward ops (each exposed as a public function; all but multilayer_recompute differentiable) and the
# backward ops their autograd formulas call.
FORWARD_OPS = tuple(name for name in SPECS if not name.endswith("_bwd"))
BACKWARD_OPS = tuple(name for name in SPECS if name.endswith("_bwd"))
