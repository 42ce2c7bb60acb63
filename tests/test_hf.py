"""mhc_kernels.hf: mHC in a tiny randomly initialised LlamaForCausalLM (no downloads), both dataflows."""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import mhc_kernels.hf as hf  # noqa: E402
from mhc_kernels.errors import MHCInputError  # noqa: E402
from mhc_kernels.nn import MHCHead, MHCSinglePassHead, MHCSite  # noqa: E402

V = 128
MODES = {"classic": dict(single_pass=False), "single_pass": dict(single_pass=True)}


def _config(**kw) -> LlamaConfig:
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              vocab_size=V, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=None, **kw)
    return LlamaConfig(**kw)


def _stock(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(_config()).float()


def _mhc(mode: str, seed: int = 0, perturb: bool = True, **kw) -> LlamaForCausalLM:
    model = hf.to_mhc(_stock(seed), n=4, **MODES[mode], **kw)
    if perturb:
        _perturb(model)
    return model


def _perturb(model, seed: int = 1, size: float = 0.3) -> None:
    """Move the mHC parameters away from their initialisation, so the mHC math matters in the comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (MHCSite, MHCHead, MHCSinglePassHead)):
                for p in m.parameters(recurse=False):
                    p.add_(torch.randn(p.shape, generator=g) * size)


def _mhc_params(model) -> dict:
    return {k: p for k, p in model.named_parameters() if "_site." in k or "mhc_head." in k}


def _ids(B: int = 2, S: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, V, (B, S), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _checkpointing(model, enable: bool, **kw) -> None:
    with warnings.catch_warnings():  # 5.x: gradient_checkpointing_enable/disable are deprecated aliases
        warnings.simplefilter("ignore", FutureWarning)
        if enable:
            model.gradient_checkpointing_enable(**kw)
        else:
            model.gradient_checkpointing_disable()


# -- initialisation, forward, interface ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode,kw", [("classic", {}), ("single_pass", {}), ("single_pass", {"fuse_norms": False})],
                         ids=["classic", "single_pass", "single_pass_unfused"])
def test_init_matches_stock_model(mode, kw):
    stock = _stock()
    ids = _ids()
    ref = _logits(stock, ids)
    model = hf.to_mhc(stock, n=4, **MODES[mode], **kw)
    out = _logits(model, ids)
    diff = (out - ref).abs().max().item()
    # measured: ~1.8e-3 in all three (logits up to ~0.66): the sites' 1% perturbations of a plain residual
    assert diff < 1e-2, diff
    assert diff > 0, "the mHC sites did not run"
    assert hf.is_mhc(model) and model.config.mhc["n"] == 4 and model.config.mhc["single_pass"] is MODES[mode][
        "single_pass"]
    layer = model.model.layers[0]
    assert isinstance(layer, transformers.models.llama.modeling_llama.LlamaDecoderLayer)  # hooks & plans still apply
    assert {"LlamaDecoderLayer", "MHCLlamaDecoderLayer"} <= set(model._no_split_modules)  # device_map keeps it whole
    fused = mode == "single_pass" and kw.get("fuse_norms", True)
    assert (layer.attn_site.out_norm_weight is not None) == fused
    assert isinstance(layer.input_layernorm, torch.nn.Identity) == fused
    # hidden states between layers are the n streams; the last is the normed (B, S, C)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    assert [tuple(h.shape) for h in hs] == [(2, 12, 64), (2, 12, 4, 64), (2, 12, 64)]


def test_classic_keeps_every_stock_parameter_name():
    stock_keys = set(_stock().state_dict())
    keys = set(_mhc("classic").state_dict())
    assert stock_keys <= keys
    assert {k for k in keys - stock_keys} == {k for k in keys if "_site." in k or "mhc_head." in k}


def test_to_mhc_copies_the_config():
    cfg = _config()
    a = LlamaForCausalLM(cfg)
    hf.to_mhc(a)
    assert not hasattr(cfg, "mhc") and a.config is not cfg
    assert all(m.config is a.config for m in a.modules() if hasattr(m, "config"))
    b = LlamaForCausalLM(cfg)  # another model from the same config object stays a plain one
    assert hf.check_model(b) is None


@pytest.mark.parametrize("mode", MODES)
def test_training_steps_reduce_the_loss(mode):
    model = _mhc(mode, perturb=False).train()
    ids = _ids(B=4, S=16, seed=3)
    before = {k: p.detach().clone() for k, p in _mhc_params(model).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _mhc_params(model).values())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(not torch.equal(p, before[k]) for k, p in _mhc_params(model).items())


@pytest.mark.parametrize("mode", MODES)
def test_generate_with_and_without_cache_agree(mode):
    model = _mhc(mode).eval()
    ids = _ids(B=1, S=5, seed=4)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert with_cache.shape == (1, 11)
    assert torch.equal(with_cache, without), (with_cache, without)
    # the cached step's logits are the full forward's
    with torch.no_grad():
        first = model(ids[:, :-1], use_cache=True)
        # transformers 5.x names the cache `cache`, 4.x `past_key_values`
        name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        step = model(ids[:, -1:], use_cache=True, **{name: getattr(first, name)}).logits[:, -1]
        full = model(ids).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


# -- gradient checkpointing ---------------------------------------------------------------------------------------
def _run_counted(model, ids):
    """One forward + backward; returns (mlp calls in forward, mlp calls in backward, bytes saved for backward
    outside checkpointed regions, gradients)."""
    calls = [0]
    handles = [layer.mlp.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
               for layer in model.model.layers]
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids, use_cache=True).loss
    fwd = calls[0]
    loss.backward()
    for h in handles:
        h.remove()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return fwd, calls[0] - fwd, saved[0], grads


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("mode", MODES)
def test_gradient_checkpointing_recomputes_the_mhc_layers(mode, reentrant):
    ids = _ids(B=2, S=16, seed=5)
    model = _mhc(mode)
    n_layers = len(model.model.layers)
    fwd, bwd, saved_plain, grads_plain = _run_counted(model, ids)
    assert (fwd, bwd) == (n_layers, 0)  # without checkpointing nothing is recomputed (the test can fail)
    _checkpointing(model, True, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    fwd, bwd, saved_ckpt, grads_ckpt = _run_counted(model, ids)
    assert (fwd, bwd) == (n_layers, n_layers), "every mHC decoder layer is recomputed once in backward"
    assert saved_ckpt < 0.5 * saved_plain, (saved_ckpt, saved_plain)
    assert grads_ckpt.keys() == grads_plain.keys() and any("_site." in k for k in grads_ckpt)
    for k in grads_plain:  # the chain state's gradient (pre included) goes through the checkpoint
        torch.testing.assert_close(grads_ckpt[k], grads_plain[k], rtol=1e-5, atol=1e-6, msg=k)
    _checkpointing(model, False)
    assert _run_counted(model, ids)[1] == 0


# -- saving and loading -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip(mode, tmp_path):
    model = _mhc(mode)
    ids = _ids()
    want = _logits(model, ids)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mhc"] == model.config.mhc
    assert hf.mhc_config(tmp_path) == model.config.mhc
    loaded = hf.from_pretrained(tmp_path)
    assert type(loaded) is LlamaForCausalLM and hf.is_mhc(loaded)
    assert hf.check_model(loaded) == model.config.mhc
    assert torch.equal(_logits(loaded, ids), want)
    # the stock class loads it as a plain Llama, dropping the mHC weights: detected and refused downstream
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = LlamaForCausalLM.from_pretrained(tmp_path)
    assert not hf.is_mhc(stock) and hf.mhc_config(stock) == model.config.mhc
    assert (_logits(stock, ids) - want).abs().max() > 1e-3
    with pytest.raises(hf.MHCModelError, match="stock from_pretrained"):
        hf.check_model(stock)
    with pytest.raises(hf.MHCModelError, match="stock from_pretrained"):
        hf.to_mhc(stock)


def test_from_pretrained_bf16_keeps_mhc_parameters_float32(tmp_path):
    model = _mhc("classic")
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert {p.dtype for p in _mhc_params(loaded).values()} == {torch.float32}
    for k, p in _mhc_params(loaded).items():
        assert torch.equal(p, dict(model.named_parameters())[k]), k
    out = _logits(loaded, _ids())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_from_pretrained_refuses_plain_and_incomplete_checkpoints(tmp_path):
    plain = tmp_path / "plain"
    _stock().save_pretrained(plain)
    with pytest.raises(hf.MHCModelError, match="not an mHC checkpoint"):
        hf.from_pretrained(plain)
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    _mhc("single_pass").save_pretrained(broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp_site.fn"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.MHCModelError, match=r"model\.layers\.1\.mlp_site\.fn"):
        hf.from_pretrained(broken)
    config = json.loads((broken / "config.json").read_text())
    config["mhc"]["format"] = 99
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.MHCModelError, match="format 99"):
        hf.from_pretrained(broken)


# -- bad input ----------------------------------------------------------------------------------------------------
def test_refuses_models_that_are_not_llama_like():
    with pytest.raises(hf.MHCModelError, match="PreTrainedModel"):
        hf.to_mhc(torch.nn.Linear(4, 4))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                                                n_positions=16))
    with pytest.raises(MHCInputError, match=r"model\.model\.layers.*self_attn.*GPT2LMHeadModel"):
        hf.to_mhc(gpt2)
    with pytest.raises(TypeError):  # MHCModelError is both
        hf.to_mhc(gpt2)
    model = _stock()
    model.model.layers[1].pre_feedforward_layernorm = torch.nn.Identity()  # a Gemma-2-like sandwich norm
    with pytest.raises(hf.MHCModelError, match=r"decoder layer 1 .*extra modules \['pre_feedforward_layernorm'\]"):
        hf.to_mhc(model)
    assert not hf.is_mhc(model) and hf.mhc_config(model) is None  # nothing was changed


def test_refuses_a_second_conversion_and_bad_arguments():
    model = hf.to_mhc(_stock())
    with pytest.raises(hf.MHCModelError, match="already an mHC model"):
        hf.to_mhc(model)
    with pytest.raises(MHCInputError, match="n"):
        hf.to_mhc(_stock(), n=0)
    with pytest.raises(MHCInputError, match="sinkhorn_iters"):
        hf.to_mhc(_stock(), sinkhorn_iters=0)


class _OnePlusWeightNorm(torch.nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + w)`` -- not the plain RMSNorm a single-pass site fuses."""

    def __init__(self, C):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.zeros(C)), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def test_single_pass_refuses_to_fuse_a_norm_that_is_not_plain_rmsnorm():
    model = _stock()
    model.model.layers[0].post_attention_layernorm = _OnePlusWeightNorm(64)
    with pytest.raises(hf.MHCModelError, match="post_attention_layernorm.*fuse_norms=False"):
        hf.to_mhc(model, single_pass=True)
    assert not hf.is_mhc(model)
    hf.to_mhc(model, single_pass=True, fuse_norms=False)  # kept as a module, it is just a sublayer
    assert torch.isfinite(_logits(model, _ids())).all()


def test_import_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "mhc_kernels.hf")
    with pytest.raises(ImportError, match=r"pip install 'mhc-kernels\[hf\]'"):
        importlib.import_module("mhc_kernels.hf")
