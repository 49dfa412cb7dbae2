"""Per-layer rules, one layer family per module, registered in :mod:`.registry`.

To add a layer family: write ``rules/<family>.py`` with its ``norms`` and ``grads`` (tested
against materialised per-example gradients in float64, ``tests/test_rules.py``), call
:func:`~gradnoise.rules.registry.register`, and import the module here.
"""

from gradnoise.rules import attention, conv, conv1d_hf, embedding, linear, norm  # noqa: F401  (registers)
from gradnoise.rules._common import weighted_norms
from gradnoise.rules.conv import conv_moments, conv_prefers_moments
from gradnoise.rules.linear import (
           dense_linear_moments,
           dense_moments,
           dense_norms,
           linear_gram_norms,
           prefers_gram,
           shared_output_norms,
)
from gradnoise.rules.registry import RULES, Rule, register, rule_for

__all__ = ["RULES", "Rule", "conv_moments", "conv_prefers_moments", "dense_linear_moments", "dense_moments", "dense_norms", "linear_gram_norms", "prefers_gram", "register", "rule_for",
           "shared_output_norms", "weighted_norms"]  # fmt: skip
