"""Claim 13: the noise scale of the layer-normalisation parameters alone tracks the whole
transformer's (Gray et al. 2024, arXiv:2411.00999, "Normalization Layer Per-Example
Gradients are Sufficient to Predict Gradient Noise Scale in Transformers").

A character-level decoder (token and position embeddings, pre-norm blocks with causal
self-attention, a tied head) trained with AdamW on text shipped with Python (the source of
a few standard-library modules: no download). Two monitors watch the same steps:
``gn.Monitor(scope="all")`` (every parameter) and ``gn.Monitor(scope="norms")`` (the
LayerNorm parameters only, hooked alone). Both record tr Σ, |G|² and B_simple of the same
batch every ``every`` steps; the time of a training step with each (and with none) is
measured on the same model, interleaved.
"""

from __future__ import annotations

import importlib
import inspect
import time
from dataclasses import dataclass

import torch
from torch import nn

import gradnoise as gn
from gradnoise.tasks import CausalBlock, TokenLoss

from .. import common

NAME = "layernorm_gns"
SOURCES = ("argparse", "textwrap", "difflib", "json.decoder", "string", "fractions")


def corpus() -> tuple[torch.Tensor, int]:
    """The characters of a few standard-library modules' source, as ids."""
    text = "".join(inspect.getsource(importlib.import_module(m)) for m in SOURCES)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text]), len(chars)


class CharGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, T: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.Sequential(*(CausalBlock(d, heads) for _ in range(layers)))
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.lnf(self.blocks(x)))


@dataclass(frozen=True)
class Config:
    steps: int = 1500
    batch: int = 32
    seq: int = 64
    dim: int = 96
    layers: int = 3
    heads: int = 4
    lr: float = 2e-3
    every: int = 5
    seeds: tuple = (0, 1)
    timing_steps: int = 30


QUICK = {"steps": 30, "every": 5, "seeds": (0,), "timing_steps": 3, "dim": 32, "layers": 1}


def batch_of(ids: torch.Tensor, cfg: Config, g: torch.Generator):
    start = torch.randint(0, ids.shape[0] - cfg.seq - 1, (cfg.batch,), generator=g)
    rows = torch.stack([ids[s : s + cfg.seq + 1] for s in start.tolist()])
    return rows[:, :-1], rows[:, 1:]


def timing(model, loss_fn, ids, cfg: Config) -> dict:
    """Median ms of an AdamW step with no monitor, with scope='norms' and with scope='all'
    (each monitor measuring every step), interleaved on copies of the same model."""
    import copy

    g = torch.Generator().manual_seed(7)
    setups = {}
    for label in ("plain", "norms", "all"):
        m = copy.deepcopy(model)
        mon = None if label == "plain" else gn.Monitor(m, loss_fn, every=1, scope=label)
        setups[label] = (m, torch.optim.AdamW(m.parameters(), lr=cfg.lr), mon)
    times: dict[str, list[float]] = {k: [] for k in setups}
    for _ in range(cfg.timing_steps + 1):
        x, y = batch_of(ids, cfg, g)
        for label, (m, opt, mon) in setups.items():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(m(x), y).backward()
            if mon is not None:
                mon.step(x, y)
            opt.step()
            times[label].append(time.perf_counter() - t0)
    for _, _, mon in setups.values():
        if mon is not None:
            mon.close()
    return {k: 1e3 * float(torch.tensor(v[1:]).median()) for k, v in times.items()}  # the first: tracing


def body(cfg: Config) -> dict:
    ids, vocab = corpus()
    loss_fn = TokenLoss()
    runs = []
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        model = CharGPT(vocab, cfg.dim, cfg.layers, cfg.heads, cfg.seq)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
        full = gn.Monitor(model, loss_fn, every=cfg.every, per_layer=False)
        norms = gn.Monitor(model, loss_fn, every=cfg.every, per_layer=False, scope="norms")
        g = torch.Generator().manual_seed(seed + 100)
        for _ in range(cfg.steps):
            x, y = batch_of(ids, cfg, g)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            full.step(x, y, optimizer=opt, loss=loss)
            norms.step(x, y, optimizer=opt, loss=loss)
            opt.step()
        keep = ("step", "loss", "trace_cov", "grad_norm_sq", "b_simple")
        runs.append({
            "seed": seed, "modes": [full.mode, norms.mode], "errors": full.errors + norms.errors,
            "all": [{k: r.get(k) for k in keep} for r in full.history.records],
            "norms": [{k: r.get(k) for k in keep} for r in norms.history.records],
        })  # fmt: skip
        full.close()
        norms.close()
    torch.manual_seed(0)
    ms = timing(CharGPT(vocab, cfg.dim, cfg.layers, cfg.heads, cfg.seq), loss_fn, ids, cfg)
    return {"vocab": vocab, "characters": int(ids.shape[0]), "runs": runs, "step_ms": ms}


def main(argv=None):
    return common.main(NAME, Config, QUICK, body, __doc__, argv)


if __name__ == "__main__":
    main()
