"""The engine's own forward of ``nn.MultiheadAttention`` calls, with their projections in
view.

``MultiheadAttention`` applies its weights inside ``F.multi_head_attention_forward``, one
overridable function whose inside no hook or ``TorchFunctionMode`` sees; its rule
(:mod:`gradnoise.rules.attention`) therefore recomputes the projections and one attention
forward and backward per call. In the engine's own forward pass — not the user's, whose
numbers must stay bitwise as they are — :class:`AttentionCapture` (a
``TorchFunctionMode``) runs the common self-attention case itself instead: the packed input
projection, scaled dot-product attention and the output projection, the same computation
in the same layout as torch's, and records the two projections' inputs and outputs. Hooks
on those outputs then give each projection's norms as a Linear layer's, with nothing
recomputed. Any other call (separate ``q``/``k``/``v`` inputs or weights, a key-padding
mask, attention weights requested, ``bias_k``, dropout in training) runs torch's own
function and keeps the rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionCapture", "Projection"]

# (parameter prefix, input as [B, T, ·], the output tensor, its gradient → [B, T, ·])
Projection = tuple[str, Tensor, Tensor, Callable[[Tensor], Tensor]]

_PARAMS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
           "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
           "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
           "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")  # fmt: skip
_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
             "use_separate_proj_weight": False, "static_k": None, "static_v": None, "is_causal": False}  # fmt: skip


class AttentionCapture(TorchFunctionMode):
    """Runs simple self-attention calls of ``F.multi_head_attention_forward`` itself and
    records, per call, its two projections (:attr:`calls`: in order, keyed by the
    ``in_proj_weight`` tensor's id)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, list[Projection]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            a = {**_DEFAULTS, **dict(zip(_PARAMS, args, strict=False)), **kwargs}
            if _simple(a):
                return self._self_attention(a)
        return func(*args, **kwargs)

    def _self_attention(self, a: dict) -> tuple[Tensor, None]:
        x, H = a["query"], a["num_heads"]
        T, B, E = x.shape
        qkv = F.linear(x, a["in_proj_weight"], a["in_proj_bias"])  # [T, B, 3E]
        q, k, v = (t.reshape(T, B * H, E // H).transpose(0, 1).view(B, H, T, E // H) for t in qkv.split(E, dim=-1))
        mask = a["attn_mask"]
        if a["is_causal"]:  # torch's own: the hint replaces the mask when no weights are returned
            mask = None
        elif mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(mask, float("-inf"))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=a["is_causal"])
        ctx = ctx.permute(2, 0, 1, 3).reshape(T * B, E)
        y = F.linear(ctx, a["out_proj_weight"], a["out_proj_bias"])
        first = lambda t: t.transpose(0, 1)  # noqa: E731  [T, B, ·] → [B, T, ·]
        rows = lambda t: t.view(T, B, t.shape[-1]).transpose(0, 1)  # noqa: E731  [T·B, ·] → [B, T, ·]
        self.calls.append((id(a["in_proj_weight"]), [
            ("in_proj_", first(x.detach()), qkv, first), ("out_proj.", rows(ctx.detach()), y, rows),
        ]))  # fmt: skip
        return y.view(T, B, E), None


def _simple(a: dict) -> bool:
    """Self-attention with packed weights, no key-padding mask, no attention weights
    returned, no extra keys, no dropout, and an attention mask absent or ``[T, T]``."""
    q, mask = a["query"], a["attn_mask"]
    return (
        a["key"] is q and a["value"] is q and q.dim() == 3 and not a["use_separate_proj_weight"]
        and a["in_proj_weight"] is not None and a["bias_k"] is None and a["bias_v"] is None and not a["add_zero_attn"]
        and (a["dropout_p"] == 0.0 or not a["training"]) and a["key_padding_mask"] is None and not a["need_weights"]
        and a["static_k"] is None and a["static_v"] is None
        and (mask is None or (mask.dim() == 2 and mask.shape == (q.shape[0], q.shape[0])))
        and (not a["is_causal"] or mask is not None)  # torch refuses the hint without a mask
    )  # fmt: skip
