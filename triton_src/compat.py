"""Differences between the Triton releases in the supported range (pyproject: ``triton>=3.6``) that this
backend smooths over.

* Interpreter, triton < 3.7 with numpy >= 2.4: a scalar tensor used as an index (``range(c_start, c_end, ...)``
  in a kernel) is converted with ``int()`` of a one-element 1-D array, which numpy 2.4 refuses ("only
  0-dimensional arrays can be converted to Python scalars"); triton 3.7 squeezes the array first. The same
  conversion is installed on the older interpreter.
* Interpreter, every release: ``tl.dot`` is one ``np.matmul`` of the whole block, and numpy's BLAS picks its
  kernel by a row's position in the block (OpenBLAS 0.3.31 on AMD EPYC: rows 6-15 of every 16 are summed in
  another order), so a token's projection had different bits alone and inside a batch -- which a GPU's MMA,
  one fixed reduction order per output element, does not do. The interpreter's dot now multiplies row by
  row (each row a one-row ``np.matmul``): a row's result depends on that row alone, as on the GPU, and the
  batch-invariance tests mean the same on CPU as there.

Nothing changes on a GPU: both patches apply to the interpreter only (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import inspect

import numpy as np


def patch_interpreter_index() -> bool:
    """Install the squeezing ``__index__`` on an interpreter that lacks it. -> whether a patch was installed."""
    from triton.runtime import interpreter

    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_mhc_index_squeezed", False):
        return False
    try:
        source = inspect.getsource(orig)
    except (OSError, TypeError):
        return False
    if "int(self.handle.data)" not in source:   # this release already converts a 0-d value
        return False

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._mhc_index_squeezed = True
    interpreter._patch_lang_tensor = patched
    return True


def patch_interpreter_dot_rows() -> bool:
    """Make the interpreter's ``tl.dot`` row by row (module docstring). -> whether a patch was installed."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    orig = getattr(builder, "create_dot", None)
    if orig is None or getattr(orig, "_mhc_row_by_row", False):
        return False

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        res = orig(self, a, b, d, input_precision, max_num_imprecise_acc)   # conversions, dtype, the handle
        a_data, b_data = a.data, b.data
        if (a.dtype.primitive_bitwidth == 8 and a.dtype.is_floating()) or \
           (b.dtype.primitive_bitwidth == 8 and b.dtype.is_floating()):
            return res                          # fp8 operands: keep the release's own conversion
        out = np.empty_like(res.data)
        rows = a_data.shape[-2]
        for i in range(rows):
            out[..., i:i + 1, :] = np.matmul(a_data[..., i:i + 1, :], b_data, dtype=d.data.dtype)
        res.data = out + d.data
        return res

    create_dot._mhc_row_by_row = True
    builder.create_dot = create_dot
    return True


def patch_interpreter() -> None:
    """Every interpreter patch of this module (called when ``TRITON_INTERPRET=1``)."""
    patch_interpreter_index()
    patch_interpreter_dot_rows()
