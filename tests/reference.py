"""The brute-force reference of the noise statistics: a float64 loop of torch.autograd.grad."""

import gradnoise as gn


def loop_stats(model, loss, x, y) -> dict[str, tuple[float, float]]:
    """Per parameter: ``tr Σ`` (unbiased) and ``|G|²`` (``|ḡ|² − tr Σ / B``) of the batch,
    from per-example gradients computed one example at a time."""
    out = {}
    for k, v in gn.per_sample_grads_loop(model, loss, x, y).items():
        mean = v.mean(0)
        trace = float(((v - mean) ** 2).sum() / (v.shape[0] - 1))
        out[k] = (trace, float(mean.pow(2).sum()) - trace / v.shape[0])
    return out
