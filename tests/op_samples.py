"""Sample arguments (schema order) for every ``torch.ops.mhc`` op, forward and backward, at the test suite's
default small shape: :func:`mhc_kernels.reference.cases.op_args` (the one input recipe) with the optional
tensors present (``norm_weight``, ``mhc_pre_bwd``'s ``grad_residual``), so the optional paths are exercised.
Shared by the opcheck and backend tests.
"""

import torch

from mhc_kernels.reference import cases


def op_args(name, lead=(3,), n=2, C=5, dtype=torch.float32, norm_weight=True, device="cpu", consts=None):
    """Arguments for ``torch.ops.mhc.<name>`` in schema order."""
    return cases.op_args(name, lead, n, C, dtype, device, norm_weight=norm_weight, consts=consts, seed=7,
                         optional=True)


def resolved_config(backend, op, *args):
    """The config the core resolves (``registry.config_for``) when ``backend`` serves ``op`` with ``args``
    (canonical, schema order): what a test passes to a kernel module's launch wrapper it calls directly."""
    from mhc_kernels import registry
    from mhc_kernels.specs import SPECS
    from mhc_kernels.validation import bind

    return registry.config_for(registry.get_kernel(op, backend), bind(SPECS[op], args))
