"""Registers the Triton kernels as the ``triton`` backend.

Every primitive op maps to a launch wrapper with the reference's signature plus the
``config`` the core resolves (see :mod:`.common`). The composites (``mhc_head``,
``multilayer_recompute`` and every backward) are the shared ones of :mod:`mhc_kernels.composite`
over these kernels (the fusion of the two-pass site is inside the primitives: ``norm_fn_bwd`` adds
the collapse's gradient and an incoming residual gradient before its single rounding, so a site's
backward writes one residual-gradient tensor), except the forward boundaries, which are two launches
at every T (``single_pass.py``: a main loop, then one boundary tail kernel): ``mhc_pre_sp`` and
``post_pre_sp`` read the residual once, ``mhc_pre`` and ``post_pre`` twice (their collapse needs this
site's pre); and ``mhc_head_sp``, whose collapse and RMSNorm are one kernel (``mix.collapse_norm_fwd``).
The registry serves CUDA tensors with them, and CPU tensors when ``TRITON_INTERPRET=1`` (the probe in
``__init__``).
"""

from __future__ import annotations

import functools

from mhc_kernels import composite
from mhc_kernels.registry import Kernel, register_kernel

from . import common, fp8, mix, norm_fn, single_pass, sinkhorn

# op -> (module, launch wrapper); each module declares config_space(op, call) / default_config(op, call)
# Each kernel module and the primitive ops it serves; an op's launch wrapper is ``<op>_fwd`` for a forward
# op and ``<op>`` for a backward one (``norm_fn_fwd``, ``norm_fn_bwd``, ...).
MODULES = {
    norm_fn: ("norm_fn", "norm_fn_bwd"),
    sinkhorn: ("split_mixes", "split_mixes_bwd", "sinkhorn", "sinkhorn_bwd"),
    mix: ("pre_apply_mix", "pre_apply_mix_bwd", "post", "post_bwd", "expand", "expand_bwd"),
    fp8: ("quantize_fp8",),
}
PRIMITIVES = {op: (mod, getattr(mod, op if op.endswith("_bwd") else f"{op}_fwd"))
              for mod, ops in MODULES.items() for op in ops}

_RUN_SINKHORN = {"split_mixes", "split_mixes_bwd", "sinkhorn", "sinkhorn_bwd"}


def _supports(op):
    def supports(call):
        reason = common.supports_call(call)
        if reason is None and op in _RUN_SINKHORN:
            reason = sinkhorn.supports(call)
        return reason

    return supports


for _op, (_mod, _fn) in PRIMITIVES.items():
    register_kernel(_op, "triton", _fn, supports=_supports(_op),
                    config_space=functools.partial(_mod.config_space, _op),
                    default_config=functools.partial(_mod.default_config, _op))

# the forward boundaries in two launches (single_pass.py), overriding the shared composites; single-pass mHC's
# read the residual once
FUSED = {"mhc_pre_sp": single_pass.mhc_pre_sp_fwd, "post_pre_sp": single_pass.post_pre_sp_fwd,
         "mhc_pre": single_pass.mhc_pre_fwd, "post_pre": single_pass.post_pre_fwd}
# the collapse with the sublayer's RMSNorm in one kernel (mhc_head_sp)
OWN_CONFIG = {"mhc_head_sp": (mix, mix.collapse_norm_fwd)}

composite.register_composites(
    "triton",
    extra_parts={composite.STREAM_WEIGHT_GRAD: Kernel(
        composite.STREAM_WEIGHT_GRAD, "triton", mix.stream_weight_grad,
        supports=_supports(composite.STREAM_WEIGHT_GRAD),
        default_config=functools.partial(mix.default_config, composite.STREAM_WEIGHT_GRAD))},
    overrides={**{op: dict(fn=fn, supports=_supports("split_mixes"),
                           config_space=functools.partial(single_pass.config_space, op),
                           default_config=functools.partial(single_pass.default_config, op),
                           check_config=functools.partial(single_pass.check_config, op))
                  for op, fn in FUSED.items()},
               **{op: dict(fn=fn, supports=_supports(op), config_space=functools.partial(mod.config_space, op),
                           default_config=functools.partial(mod.default_config, op))
                  for op, (mod, fn) in OWN_CONFIG.items()}})
