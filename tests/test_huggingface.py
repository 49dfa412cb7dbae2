"""The transformers integration: a GPT-2 built from a config (nothing downloaded) in
gradient_stats and the Monitor, and GradNoiseTrainerCallback inside Trainer with gradient
accumulation and clipping: training bitwise unchanged, records equal to gradient_stats."""

import copy

import pytest
import torch
from torch import nn

import gradnoise as gn

transformers = pytest.importorskip("transformers", reason="the huggingface extra is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from gradnoise.huggingface import GradNoiseTrainerCallback  # noqa: E402


def lm_loss(out, labels):
    """The causal-LM loss of GPT-2 from outputs.logits (what the model computes with labels)."""
    logits = out.logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


class TinyLM(nn.Module):
    """A Trainer-compatible model every layer of which has a rule (the Monitor's hooks mode)."""

    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.embed, self.norm, self.head = nn.Embedding(vocab, dim), nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.norm(self.embed(input_ids)))
        out = transformers.modeling_outputs.CausalLMOutput(logits=logits)
        if labels is not None:
            out.loss = lm_loss(out, labels)
        return out


class Recording(GradNoiseTrainerCallback):
    """Keeps a copy of the model and the step's batch before each measurement."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.snapshots = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        xs, ys = torch.cat([x for x, _ in self._batches]), torch.cat([y for _, y in self._batches])
        self.snapshots.append((copy.deepcopy(model), xs, ys))
        super().on_pre_optimizer_step(args, state, control, model=model, **kwargs)


def train(make, callback, tmp_path):
    torch.manual_seed(0)
    model = make()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 50, (64, 12), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        max_grad_norm=0.05, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback] if callback else []).train()
    return model


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    # (no dropout: the reference would draw other masks than the monitor's own pass)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("make, mode", [(TinyLM, "hooks"), (gpt2, "separate")], ids=["tiny-lm", "gpt2"])
def test_trainer_callback(make, mode, tmp_path):
    """With clipping active (max_grad_norm small) and two accumulation steps: the run is
    bitwise identical with the callback, and each record equals gradient_stats of the
    unclipped gradient at that step. GPT-2 takes ``**kwargs``: Trainer divides its loss by
    its own count of label tokens (12 per row, where 11 are predicted), not the mean that
    ``lm_loss`` computes, so the callback measures it in a separate pass."""
    plain = train(make, None, tmp_path)
    cb = Recording(lm_loss, strict=True)
    watched = train(make, cb, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), watched.parameters(), strict=True))
    assert cb.monitor.mode == mode and len(cb.history) == 3
    for rec, (model, xs, ys) in zip(cb.history, cb.snapshots, strict=True):
        ref = gn.gradient_stats(model, lm_loss, xs, ys)
        assert rec["batch_size"] == 16
        assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-4)
        assert rec["grad_norm_sq"] == pytest.approx(ref.grad_norm_sq, rel=1e-3, abs=1e-4 * ref.trace_cov)


def test_gpt2_from_a_config_in_gradient_stats():
    """The README recipe: loss_fn reads outputs.logits; the fast engine equals vmap, with
    GPT-2's Conv1D projections on the rule."""
    torch.manual_seed(0)
    model = gpt2().double()
    x = torch.randint(0, 50, (6, 10), generator=torch.Generator().manual_seed(1))
    fast = gn.gradient_stats(model, lm_loss, x, x, method="fast")
    ref = gn.gradient_stats(model, lm_loss, x, x, method="vmap")
    assert fast.trace_cov == pytest.approx(ref.trace_cov, rel=1e-10)
    assert fast.per_param["transformer.h.0.attn.c_attn.weight"].method == "fast"
    # wpe(position_ids[None]) is off the batch: expanded along its leading 1 (engine.broadcast)
    assert fast.per_param["transformer.wpe.weight"].method == "fast"
