"""Claim 11 (seeds 000, 002): memory grows linearly in B, and the rule
max B ≈ (memory − model) / per-example memory predicts what fits.

For the MNIST-1D MLP and CNN: the peak resident memory of one training step measured in a
fresh process at each batch size (Linux /proc peak RSS), a linear fit, and the
per-example memory gn.per_example_memory estimates from two small batches; the rule's
prediction at the largest batch is compared with the measured probe there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from .. import common

NAME = "memory"

PROBE = """
import json, re, sys, torch
from torch import nn
from gradnoise.tasks import mnist1d_mlp, mnist1d_cnn
torch.set_num_threads(1)
name, B = sys.argv[1], int(sys.argv[2])
model = mnist1d_mlp() if name == "mlp" else mnist1d_cnn()
x, y = torch.randn(B, 40), torch.randint(0, 10, (B,))
def rd(f):
    return int(re.search(f + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = rd("VmRSS")
nn.CrossEntropyLoss()(model(x), y).backward()
print(json.dumps({"peak": rd("VmHWM") - before}))
"""


@dataclass(frozen=True)
class Config:
    batch_sizes: tuple = (64, 256, 1024, 4096, 16384)
    models: tuple = ("mlp", "cnn")


QUICK = {"batch_sizes": (64, 512, 2048)}


def body(cfg: Config) -> dict:
    import torch
    from torch import nn

    import gradnoise as gn
    from gradnoise.tasks import mnist1d_cnn, mnist1d_mlp

    out = {}
    for name in cfg.models:
        peaks = []
        for B in cfg.batch_sizes:
            res = subprocess.run([sys.executable, "-c", PROBE, name, str(B)], capture_output=True, text=True, check=True)
            peaks.append(json.loads(res.stdout.strip().splitlines()[-1])["peak"])
        b = np.array(cfg.batch_sizes, dtype=float)
        slope, intercept = np.polyfit(b[:-1], np.array(peaks[:-1], dtype=float), 1)
        pred_last = slope * b[-1] + intercept
        model = mnist1d_mlp() if name == "mlp" else mnist1d_cnn()
        fixed, per = gn.per_example_memory(model, nn.CrossEntropyLoss(), torch.randn(256, 40), torch.randint(0, 10, (256,)), sizes=(64, 256))
        r = np.corrcoef(b, peaks)[0, 1]
        out[name] = {
            "batch_sizes": list(cfg.batch_sizes), "peak_bytes": peaks,
            "fit_bytes_per_example": slope, "fit_fixed_bytes": intercept, "linearity_r": r,
            "predicted_peak_at_largest": pred_last, "measured_peak_at_largest": peaks[-1],
            "gn_bytes_per_example": per, "gn_fixed_bytes": fixed,
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        }  # fmt: skip
    return out


def main(argv=None):
    return common.main(NAME, Config, QUICK, body, __doc__, argv)


if __name__ == "__main__":
    main()
