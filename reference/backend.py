"""Registers the PyTorch reference (``torch_ref``) as the ``reference`` backend for every op.

The reference serves any device PyTorch runs on and every dtype the contract allows,
float64 included (the mode ``torch.autograd.gradcheck`` needs); it has no tunable
parameters. Its composites are the shared ones (``mhc_kernels.composite``) over these
primitives. What it fuses: the composites that read the residual twice (``mhc_pre``,
``mhc_head`` and their backward) run on the residual widened to the mix dtype once, so their
primitives skip their own widening (on CPU each is a full-size allocation and pass, ~40% of
``mhc_pre``); the full-size outputs are rounded back once -- the same bits as the plain
composite (``tests/test_reference_numerics.py``). With the sublayer's norm (``out_norm_weight``) or an FP8
copy (``fp8_group``) they run the plain composite: the norm's statistic is that of the collapse rounded to
the residual dtype, and the FP8 codes are those of the rounded layer input.
"""

import functools

import torch

from mhc_kernels import composite
from mhc_kernels.registry import Kernel, register_kernel
from mhc_kernels.specs import ACT, SPECS

from . import torch_ref

PRIMITIVES = {
    "norm_fn": torch_ref.norm_fn_fwd,
    "norm_fn_bwd": torch_ref.norm_fn_bwd,
    "split_mixes": torch_ref.split_mixes_fwd,
    "split_mixes_bwd": torch_ref.split_mixes_bwd,
    "sinkhorn": torch_ref.sinkhorn_fwd,
    "sinkhorn_bwd": torch_ref.sinkhorn_bwd,
    "pre_apply_mix": torch_ref.pre_apply_mix_fwd,
    "pre_apply_mix_bwd": torch_ref.pre_apply_mix_bwd,
    "post": torch_ref.post_fwd,
    "post_bwd": torch_ref.post_bwd,
    "expand": torch_ref.expand_fwd,
    "expand_bwd": torch_ref.expand_bwd,
    "quantize_fp8": torch_ref.quantize_fp8_fwd,
}

for _op, _fn in PRIMITIVES.items():
    register_kernel(_op, "reference", _fn)

WIDENED_ONCE = ("mhc_pre", "mhc_pre_bwd", "mhc_head", "mhc_head_bwd")


def _widen_once(op: str, shared):
    """``shared`` (the composite's kernel function) run on the residual widened to the mix dtype, its
    activation-shaped outputs rounded back to the residual's dtype: the rounding each primitive would
    have done, so the same bits."""
    spec = SPECS[op]
    at = spec.arg_names.index("residual")
    norm_at = spec.arg_names.index("out_norm_weight") if "out_norm_weight" in spec.arg_names else None
    fp8_at = spec.arg_names.index("fp8_group") if "fp8_group" in spec.arg_names else None
    act_outputs = {i for i, o in enumerate(spec.outputs) if o.kind == ACT}

    def fn(*args, config=None):
        residual = args[at]
        if (norm_at is not None and args[norm_at] is not None) or (fp8_at is not None and args[fp8_at]):
            # the sublayer's norm takes its statistic from the collapse rounded to the residual dtype (and its
            # backward rounds g_u so), and the FP8 copy quantises the rounded layer input: the plain composite,
            # whose primitives round where the contract does
            return shared(*args, config=config)
        mix_dtype = torch.float64 if residual.dtype == torch.float64 else torch.float32
        outs = shared(*args[:at], residual.to(mix_dtype), *args[at + 1:], config=config)
        return tuple(o.to(residual.dtype) if i in act_outputs else o for i, o in enumerate(outs))

    fn.__name__ = f"reference_{op}_widened_once"
    return fn


composite.register_composites(
    "reference",
    extra_parts={composite.STREAM_WEIGHT_GRAD: Kernel(composite.STREAM_WEIGHT_GRAD, "reference",
                                                      torch_ref.stream_weight_grad)},
    wrappers={op: functools.partial(_widen_once, op) for op in WIDENED_ONCE})

