"""Tied input and output embeddings (nanoGPT, GPT-2): per-example squared norms of a weight
shared by an ``nn.Embedding`` and an ``nn.Linear`` head, without the ``B × V × d``
per-example gradients.

Example ``i``'s gradient of the shared weight is the sum of the two layers' gradients,
``g_i = E_i + L_i``, so ``|g_i|² = |E_i|² + |L_i|² + 2⟨E_i, L_i⟩``. The layers' own rules give
the first two terms; the cross term needs no ``V × d`` product either. With ``x_it`` the
example's token ids, ``e_it`` the gradient at the embedding's output, ``h_is`` the head's
input and ``δ_is`` the gradient at its output (``V`` logits),
``E_i = Σ_t onehot(x_it) e_itᵀ`` and ``L_i = Σ_s δ_is h_isᵀ``, so

.. math:: ⟨E_i, L_i⟩ = \\sum_{s,t} δ_{is}[x_{it}] \\, ⟨h_{is}, e_{it}⟩,

one gather of the logits' gradient at the token ids and one ``T × T`` product per example
(cost ``B·T²·d``). The two layers' output gradients arrive at different times in the
backward pass, so the first to arrive leaves its part (:class:`TiedParts`) for the second.

The per-element variance needs ``Σ_i g_i² = Σ_i E_i² + Σ_i L_i² + 2 Σ_i E_i ⊙ L_i``. Again
the layers' rules give the first two terms. ``E_i`` is zero outside the rows ``x_it``, so
the cross term is ``Σ_{i,t} e_it ⊙ L_i[x_it]``, added into row ``x_it``, with
``L_i[x_it] = Σ_s δ_is[x_it] h_is``: the same gather, one more ``T × T`` product per
example, and one scatter into ``V × d``.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TiedParts", "tied_pair"]


def tied_pair(owners: list[tuple[str, str]], modules: dict[str, nn.Module]) -> tuple[str, str] | None:
    """``(embedding, head)`` when a weight's owners (module name, local name) are exactly one
    ``nn.Embedding`` and one ``nn.Linear``, as ``weight`` of both; else ``None``."""
    if len(owners) != 2 or any(local != "weight" for _, local in owners):
        return None
    kinds = {type(modules[m]): m for m, _ in owners}
    emb, head = kinds.get(nn.Embedding), kinds.get(nn.Linear)
    return None if emb is None or head is None else (emb, head)


class TiedParts:
    """What each layer of a tied pair leaves for the cross term.

    Args:
        padding_idx: the embedding's padding row (no gradient from the embedding), if any.
    """

    __slots__ = ("ids", "padding_idx", "head", "embedding")

    def __init__(self, padding_idx: int | None) -> None:
        self.ids: Tensor | None = None  # [B, T], set from the embedding's forward pass
        self.padding_idx = padding_idx
        self.head: tuple[Tensor, Tensor] | None = None  # (h [B, S, d], δ at the ids [B, S, T])
        self.embedding: Tensor | None = None  # e [B, T, d]

    def set_ids(self, ids: Tensor) -> None:
        """The embedding's token ids (its input in the forward pass), ``[B, ...]``."""
        self.ids = ids.reshape(ids.shape[0], -1)

    def add_head(self, a: Tensor, d: Tensor) -> None:
        """The head's input and output gradient; of the latter (``[B, S, V]``, the largest
        tensor of a language model's backward pass) only its columns at the ids are kept."""
        B = a.shape[0]
        h, delta = a.reshape(B, -1, a.shape[-1]), d.reshape(B, -1, d.shape[-1])
        self.head = h, delta.gather(2, self.ids.unsqueeze(1).expand(-1, delta.shape[1], -1))

    def add_embedding(self, d: Tensor) -> None:
        """The embedding's output gradient."""
        e = d.reshape(self.ids.shape[0], self.ids.shape[1], -1)
        if self.padding_idx is not None:  # the padding row gets no gradient from the embedding
            e = e * (self.ids != self.padding_idx).unsqueeze(-1)
        self.embedding = e

    def cross(self, rows: int | None = None) -> tuple[Tensor, Tensor | None] | None:
        """``⟨E_i, L_i⟩`` per example and, given the weight's ``rows`` (``V``), ``Σ_i E_i ⊙ L_i``
        ``[V, d]``, once both parts are in (then released); else ``None``."""
        if self.head is None or self.embedding is None:
            return None
        (h, at_ids), e = self.head, self.embedding
        self.head = self.embedding = None
        per_example = (at_ids * (h @ e.transpose(1, 2))).flatten(1).sum(1)
        if rows is None:
            return per_example, None
        at_rows = at_ids.transpose(1, 2) @ h  # L_i[x_it] = Σ_s δ_is[x_it] h_is, [B, T, d]
        summed = e.new_zeros(rows, e.shape[-1])
        return per_example, summed.index_add_(0, self.ids.reshape(-1), (e * at_rows).reshape(-1, e.shape[-1]))
