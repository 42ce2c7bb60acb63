"""``mhc-kernels demo``: a small transformer trained four ways on CPU -- plain residual,
unconstrained Hyper-Connections (HC), mHC and single-pass mHC (DeepSeek-V4.1) -- with loss,
gradient norm and Amax gain.

The model: token + position embedding, ``--layers`` pre-norm transformer layers (causal
attention and a GELU MLP, each behind its own RMSNorm), final RMSNorm, LM head. The three
variants share every sublayer weight (same seed) and the data; they differ only in the
residual connection:

* ``residual``: ``h = h + f(norm(h))``;
* ``HC``: ``n`` streams, :class:`~mhc_kernels.nn.MHCSite` with ``residual_mix="none"``
  (same parameters and pre/post mixes as mHC, the raw ``n x n`` residual matrix, no Sinkhorn);
* ``mHC``: :class:`~mhc_kernels.nn.MHCSite` (Sinkhorn-projected residual mix);
* ``mHC-sp``: single-pass mHC (contract §14): ``MHCSite(single_pass=True, sublayer_norm=True)``, each
  sublayer's input collapsed with the previous site's pre and normalised inside the op (the
  sublayer's own RMSNorm is left out), the final collapse with the last site's pre
  (:class:`~mhc_kernels.nn.MHCSinglePassHead`, no learned head).

The data is synthetic: each sequence is a walk on a fixed random sparse Markov chain whose
second half repeats the first, so the loss has an easy part (the chain) and a part that needs
attention (the copy). Every ``--interval`` steps a table shows, per variant, the mean training
loss, the gradient norm (before clipping at 1.0) and the Amax gain of the composite residual
mapping (largest over sites and tokens of the batch; forward = max row sum, backward = max
column sum; 1.0 for the plain residual by definition). Seeded: same seed, same numbers.

With ``--out DIR`` it writes ``results.json`` and, when matplotlib is installed
(``pip install 'mhc-kernels[report]'`` or ``pip install matplotlib``), ``amax_gain.png``: the
composite Amax gain across sites for HC and mHC at the end of training.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from mhc_kernels import diagnostics
from mhc_kernels.nn import MHCExpand, MHCHead, MHCSinglePassHead, MHCSite

VOCAB = 64
HALF = 16          # sequence = HALF tokens of a Markov walk, then the same HALF again
BATCH = 8
SUCCESSORS = 4     # out-degree of the random Markov chain
VARIANTS = ("residual", "HC", "mHC", "mHC-sp")


# -- data ------------------------------------------------------------------------------------
class Data:
    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        succ = torch.stack([torch.randperm(VOCAB, generator=self.gen)[:SUCCESSORS] for _ in range(VOCAB)])
        probs = torch.rand(VOCAB, SUCCESSORS, generator=self.gen) + 0.2
        self.trans = torch.zeros(VOCAB, VOCAB).scatter_(1, succ, probs / probs.sum(1, keepdim=True))

    def batch(self) -> torch.Tensor:
        tok = torch.randint(0, VOCAB, (BATCH,), generator=self.gen)
        walk = [tok]
        for _ in range(HALF - 1):
            tok = torch.multinomial(self.trans[tok], 1, generator=self.gen).squeeze(1)
            walk.append(tok)
        first = torch.stack(walk, 1)
        return torch.cat([first, first], 1)  # (BATCH, 2*HALF)


# -- model -----------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, C: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, C // head_dim)
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.out = nn.Linear(C, C, bias=False)

    def forward(self, x):
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, S, C))


def _mlp(C):
    return nn.Sequential(nn.Linear(C, 4 * C, bias=False), nn.GELU(), nn.Linear(4 * C, C, bias=False))


class TinyLM(nn.Module):
    def __init__(self, variant: str, layers: int, C: int, n: int, seed: int):
        super().__init__()
        self.variant = variant
        torch.manual_seed(seed)  # identical embedding, sublayers and head in every variant
        self.embed = nn.Embedding(VOCAB, C)
        self.pos = nn.Parameter(torch.randn(2 * HALF, C) * 0.02)
        self.sublayers = nn.ModuleList()
        for _ in range(layers):
            self.sublayers.append(nn.Sequential(nn.RMSNorm(C), Attention(C)))
            self.sublayers.append(nn.Sequential(nn.RMSNorm(C), _mlp(C)))
        for sub in self.sublayers:  # GPT-2 style: scale the residual-writing projections by depth
            last = sub[1].out if isinstance(sub[1], Attention) else sub[1][2]
            with torch.no_grad():
                last.weight.mul_(1 / math.sqrt(2 * layers))
        self.norm = nn.RMSNorm(C)
        self.lm_head = nn.Linear(C, VOCAB, bias=False)
        torch.manual_seed(seed + 1)
        if variant == "mHC-sp":
            self.expand = MHCExpand(n, single_pass=True)
            self.sites = nn.ModuleList(MHCSite(C, n, single_pass=True, sublayer_norm=True) for _ in self.sublayers)
            self.head = MHCSinglePassHead(C, n, final_norm=False)   # the model's final norm follows
        elif variant != "residual":
            mix = "none" if variant == "HC" else "sinkhorn"
            self.expand = MHCExpand(n)
            self.sites = nn.ModuleList(MHCSite(C, n, residual_mix=mix) for _ in self.sublayers)
            self.head = MHCHead(C, n)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        if self.variant == "residual":
            for sub in self.sublayers:
                h = h + sub(h)
        else:
            x = self.expand(h)
            for site, sub in zip(self.sites, self.sublayers):
                # single-pass: the site applies the sublayer's norm itself (sub[0], the RMSNorm, is skipped)
                x = site(x, sub[1]) if self.variant == "mHC-sp" else site(x, sub)
            h = self.head(x)
        return self.lm_head(self.norm(h))


# -- training ------------------------------------------------------------------------------------
class Run:
    def __init__(self, variant, args):
        self.variant = variant
        self.model = TinyLM(variant, args.layers, args.hidden, args.n, args.seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
        self.losses, self.gnorms = [], []
        self.history = []
        self.last_report = None

    def step(self, tokens, lr, observe: bool) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        ctx = diagnostics.collect(self.model) if observe else None
        if ctx is not None:
            ctx.__enter__()
        try:
            logits = self.model(tokens[:, :-1])
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.losses.append(loss.item())
        self.gnorms.append(float(gn))
        if ctx is not None and ctx.comb_mixes:
            self.last_report = ctx.report()


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"


def run(args) -> int:
    con = Console()
    con = Console(width=max(con.width, 100))
    torch.set_num_threads(max(1, args.threads))  # the many small mHC ops run faster (and reproducibly) on one
    steps = max(1, args.steps)
    interval = args.interval or max(1, steps // 5)
    t0 = time.perf_counter()
    runs = {v: Run(v, args) for v in VARIANTS}
    data = Data(args.seed)
    warmup = min(10, max(1, steps // 10))
    n_sites = 2 * args.layers
    con.print(f"[bold]mhc-kernels demo[/]: {args.layers} layers ({n_sites} sites), C={args.hidden}, n={args.n}, "
              f"batch {BATCH}x{2 * HALF - 1} tokens, vocab {VOCAB}, {steps} steps, lr {args.lr}, seed {args.seed}")
    for step in range(1, steps + 1):
        tokens = data.batch()
        lr = args.lr * min(1.0, step / warmup)
        observe = step % interval == 0 or step == steps
        for r in runs.values():
            r.step(tokens, lr, observe)
        if observe:
            tab = Table(title=f"step {step}/{steps}  ({time.perf_counter() - t0:.1f} s)")
            for col in ("variant", "loss (mean)", "grad norm (mean / max)", "Amax gain fwd", "Amax gain bwd"):
                tab.add_column(col, justify="right")
            for name, r in runs.items():
                since = r.history[-1]["step"] if r.history else 0  # mean over the steps since the last table
                ls, gs = r.losses[since:], r.gnorms[since:]
                rep = r.last_report
                fwd = rep.worst.forward_max if rep else 1.0
                bwd = rep.worst.backward_max if rep else 1.0
                rec = {"step": step, "loss": sum(ls) / len(ls), "grad_norm": sum(gs) / len(gs),
                       "grad_norm_max": max(gs), "amax_fwd": fwd, "amax_bwd": bwd}
                r.history.append(rec)
                tab.add_row(name, _fmt(rec["loss"]), f"{_fmt(rec['grad_norm'])} / {_fmt(rec['grad_norm_max'])}",
                            _fmt(fwd), _fmt(bwd))
            con.print(tab)
    elapsed = time.perf_counter() - t0
    con.print(f"Amax gain: the composite residual mapping H_L...H_1 over all {n_sites} sites, largest over sites and "
              f"tokens (forward: max |row| sum, backward: max |column| sum). The plain residual is 1 by definition.")
    con.print(f"done in {elapsed:.1f} s")
    if args.out:
        _write(args, runs, con, elapsed)
    else:
        con.print("pass --out DIR to save results.json (and amax_gain.png when matplotlib is installed)")
    return 0 if all(math.isfinite(r.losses[-1]) for r in runs.values() if r.variant != "HC") else 1


def _write(args, runs, con, elapsed) -> None:
    os.makedirs(args.out, exist_ok=True)
    res = {"config": {k: getattr(args, k) for k in ("steps", "seed", "layers", "hidden", "n", "lr")},
           "elapsed_s": elapsed, "variants": {}}
    for name, r in runs.items():
        res["variants"][name] = {"history": r.history,
                                 "final_layers": r.last_report.as_dict()["layers"] if r.last_report else None}
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    con.print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        con.print(escape("matplotlib is not installed, so no amax_gain.png: pip install 'mhc-kernels[report]' "
                         "(or pip install matplotlib)"))
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("HC", "tab:red"), ("mHC", "tab:blue"), ("mHC-sp", "tab:green")):
        rep = runs[name].last_report
        if rep is None:
            continue
        xs = [row.index + 1 for row in rep.layers]
        ax.plot(xs, [row.composite.forward_max for row in rep.layers], color=style, label=f"{name} forward")
        ax.plot(xs, [row.composite.backward_max for row in rep.layers], color=style, ls="--",
                label=f"{name} backward")
    ax.set_yscale("log")
    ax.set_xlabel("site (composite of sites 1..l)")
    ax.set_ylabel("Amax gain (max over tokens)")
    ax.set_title(f"composite residual mapping after {args.steps} steps")
    ax.legend()
    fig.tight_layout()
    png = os.path.join(args.out, "amax_gain.png")
    fig.savefig(png, dpi=120)
    con.print(f"wrote {png}")
