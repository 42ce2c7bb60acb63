"""The README's promises: its usage example runs and its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_usage_example_runs_and_trains():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["residual"].shape == (8, 4, 1024)
    for name in ("fn", "scale", "base"):
        g = scope[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci
    m = re.search(r"^Run the tests.*?```bash\n(.*?)\n```", README, re.S | re.M)
    assert m and "pytest" in m.group(1)


def test_documented_cli_commands_exist():
    from mhc_kernels.cli import COMMANDS

    for cmd in re.findall(r"^mhc-kernels (\w[\w-]*)", README, re.M):
        assert cmd in COMMANDS, cmd


def test_nn_example_runs_and_trains():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    nn_blocks = [b for b in blocks if "mhc_kernels.nn" in b]
    assert nn_blocks, "README has no mhc_kernels.nn example"
    scope: dict = {}
    exec(compile(nn_blocks[0], "README.md", "exec"), scope)
    assert scope["out"].shape == (2, 16, scope["C"])
    grads = [p.grad for p in scope["blocks"].parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_single_pass_example_runs_and_every_site_gets_gradients():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "mhc_pre_sp" in b]
    assert blocks, "README has no single-pass example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["final"].shape == (8, 256)
    for site in scope["heads"]:
        for name, p in site.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert scope["heads"][0]["fn"].grad.abs().sum() > 0   # site 0 reaches the loss only through its pre
    assert all(w.grad is not None for w in scope["norms"])


def test_hf_example_runs(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("transformers")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "mhc_kernels import hf" in b]
    assert blocks, "README has no mhc_kernels.hf example"
    monkeypatch.chdir(tmp_path)                 # it saves a model
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    from mhc_kernels import hf

    assert hf.is_mhc(scope["model"]) and (tmp_path / "mhc-llama" / "config.json").exists()
