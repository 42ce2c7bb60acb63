"""Every public function and module of the API carries a usage example, and every example runs."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest
import torch

import mhc_kernels as mk

MODULES = ("mhc_kernels.functional", "mhc_kernels.registry", "mhc_kernels.ops", "mhc_kernels.nn",
           "mhc_kernels.recompute", "mhc_kernels.invariance")
PUBLIC_OBJECTS = [name for name in mk.__all__
                  if inspect.isfunction(getattr(mk, name)) and name != "eager_fastpath_enabled"]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    torch.manual_seed(0)
    globs = {"torch": torch, "mk": mk, **vars(mod)}
    with mk.use_backend("reference"):
        result = doctest.testmod(mod, globs=globs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module} failed (see above)"


@pytest.mark.parametrize("name", PUBLIC_OBJECTS + ["MHCSite", "MHCHead", "MHCExpand", "checkpoint_sites"])
def test_public_api_has_an_example(name):
    from mhc_kernels import nn, recompute

    obj = getattr(mk, name, None) or getattr(nn, name, None) or getattr(recompute, name)
    assert "Example::" in (obj.__doc__ or ""), f"{name}'s docstring has no usage example"
