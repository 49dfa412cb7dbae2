"""The engine's own forward of ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` calls, with their gates
in view.

torch runs a recurrence in one fused kernel (``torch._VF.lstm`` and its kin) whose gates no
hook sees, so the RNNs' per-example norms would need the recurrence run again
(:func:`~gradnoise.engine.rnn.rnn_norms`). In the engine's own forward pass — not the
user's, whose numbers must stay bitwise as they are — :class:`RNNCapture` (a
``TorchFunctionMode``) runs the call unrolled instead (:func:`~gradnoise.engine.rnn.unroll`,
torch's formulas and weights), and records each layer's gate parts: hooks on them give the
gates' gradients in the engine's one backward pass, and the norms follow as a Linear
layer's on a sequence. Dropout between layers in training runs torch's own kernel (and the
recompute path), as do projected LSTMs (``proj_size``, measured by module vmap) and packed
sequences (recomputed, each example to its own length, :func:`~gradnoise.engine.rnn.unroll`).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from gradnoise.engine.lstm_recurrence import WeightGrads
from gradnoise.engine.rnn import Unrolled, unroll

__all__ = ["RNNCapture"]

_KINDS = {torch._VF.lstm: "lstm", torch._VF.gru: "gru", torch._VF.rnn_tanh: "rnn_tanh", torch._VF.rnn_relu: "rnn_relu"}


class RNNCapture(TorchFunctionMode):
    """Runs batched calls of torch's recurrences itself and records, per call, its
    :class:`~gradnoise.engine.rnn.Unrolled` parts and the switch of its LSTM weights'
    gradients (:attr:`calls`: in order, keyed by the first weight tensor's id)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, list[Unrolled], WeightGrads]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _KINDS.get(func)
        # the batched form: (input, hx, weights, has_biases, layers, dropout, train, bidirectional,
        # batch_first); the packed one has the batch sizes second and its weights third
        if kind is not None and not kwargs and len(args) == 9 and isinstance(args[3], bool):
            x, hx, weights, has_biases, layers, dropout, train, bidirectional, batch_first = args
            plain = len(weights) == layers * (2 if bidirectional else 1) * (4 if has_biases else 2)  # no proj_size
            if x.dim() == 3 and plain and (dropout == 0.0 or not train):
                return self._run(kind, x, hx, list(weights), has_biases, layers, bidirectional, batch_first)
        return func(*args, **(kwargs or {}))

    def _run(self, kind, x, hx, weights, has_biases, layers, bidirectional, batch_first):
        wanted = WeightGrads()
        out, finals, parts = unroll(kind, x if batch_first else x.transpose(0, 1), hx, weights, has_biases, layers,
                                    bidirectional, wanted)  # fmt: skip
        self.calls.append((id(weights[0]), parts, wanted))
        out = out if batch_first else out.transpose(0, 1)
        return (out, *finals) if kind == "lstm" else (out, finals)
