"""Built-in tasks: analytic linear regression (closed forms), MNIST-1D, and a layer zoo.

No task downloads anything: MNIST-1D is generated locally with
``mnist1d.data.make_dataset`` (Greydanus 2020; default 4000/1000 split), the rest is
synthetic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "LinearRegression",
    "Task",
    "TASKS",
    "get_task",
    "mnist1d_data",
    "mnist1d_mlp",
    "mnist1d_cnn",
    "tiny_transformer",
    "CausalBlock",
    "TokenLoss",
    "bn_cnn",
    "gn_cnn",
]


# ---------------------------------------------------------------- analytic linear regression


@dataclass(frozen=True)
class LinearRegression:
    """``y = w*ᵀx + σε`` with ``x ~ N(0, diag(λ))``, ``ε ~ N(0, 1)``; model ``ŷ = wᵀx``;
    loss ``nn.MSELoss()``, i.e. ``ℓ = (wᵀx − y)²``.

    With ``u = w − w*`` and ``Λ = diag(λ)``, Isserlis' theorem gives (``g = 2 r x``,
    ``r = uᵀx − σε``)::

        L   = uᵀΛu + σ²                 G = 2Λu          H = 2Λ
        Σ   = 4[(uᵀΛu + σ²)Λ + ΛuuᵀΛ]
        tr Σ = 4[(uᵀΛu + σ²) tr Λ + |Λu|²]          |G|² = 4|Λu|²
        tr(HΣ) = 8[(uᵀΛu + σ²) tr Λ² + uᵀΛ³u]       GᵀHG = 8 uᵀΛ³u
        B_simple = tr Σ / |G|²     B_noise = tr(HΣ) / GᵀHG     λ_max = 2 max λ

    Attributes:
        eigenvalues: the input variances ``λ`` (``d`` of them).
        w_star: the true weights.
        w: the weights at which the statistics are evaluated.
        sigma: label-noise standard deviation.
    """

    eigenvalues: tuple[float, ...]
    w_star: tuple[float, ...]
    w: tuple[float, ...]
    sigma: float

    @classmethod
    def make(cls, dim: int = 8, *, sigma: float = 0.5, distance: float = 1.0, seed: int = 0):
        """A random instance: ``λ`` log-spaced in ``[0.1, 1]``, ``|w − w*| = distance``."""
        rng = np.random.default_rng(seed)
        lam = np.logspace(-1, 0, dim)
        w_star = rng.standard_normal(dim)
        u = rng.standard_normal(dim)
        u *= distance / np.linalg.norm(u)
        return cls(tuple(lam), tuple(w_star), tuple(w_star + u), float(sigma))

    @property
    def dim(self) -> int:
        return len(self.eigenvalues)

    def _arrays(self):
        lam = np.asarray(self.eigenvalues, dtype=np.float64)
        u = np.asarray(self.w, dtype=np.float64) - np.asarray(self.w_star, dtype=np.float64)
        return lam, u, float(u @ (lam * u)) + self.sigma**2

    def model(self, dtype: torch.dtype = torch.float64) -> nn.Linear:
        """``nn.Linear(d, 1, bias=False)`` with weight ``w``."""
        m = nn.Linear(self.dim, 1, bias=False).to(dtype)
        with torch.no_grad():
            m.weight.copy_(torch.tensor(self.w, dtype=dtype).unsqueeze(0))
        return m

    loss_fn = staticmethod(lambda: nn.MSELoss())

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64):
        """``n`` i.i.d. examples ``(x [n, d], y [n, 1])``."""
        lam = torch.tensor(self.eigenvalues, dtype=dtype)
        x = torch.randn(n, self.dim, generator=generator, dtype=dtype) * lam.sqrt()
        eps = torch.randn(n, 1, generator=generator, dtype=dtype)
        y = x @ torch.tensor(self.w_star, dtype=dtype).unsqueeze(1) + self.sigma * eps
        return x, y

    @property
    def loss(self) -> float:
        return self._arrays()[2]

    @property
    def gradient(self) -> np.ndarray:
        lam, u, _ = self._arrays()
        return 2 * lam * u

    @property
    def hessian(self) -> np.ndarray:
        return np.diag(2 * np.asarray(self.eigenvalues))

    @property
    def covariance(self) -> np.ndarray:
        lam, u, loss = self._arrays()
        lu = lam * u
        return 4 * (loss * np.diag(lam) + np.outer(lu, lu))

    @property
    def trace_cov(self) -> float:
        return float(np.trace(self.covariance))

    @property
    def grad_norm_sq(self) -> float:
        return float(self.gradient @ self.gradient)

    @property
    def b_simple(self) -> float:
        return self.trace_cov / self.grad_norm_sq

    @property
    def b_noise(self) -> float:
        h, g = self.hessian, self.gradient
        return float(np.trace(h @ self.covariance) / (g @ h @ g))

    @property
    def lambda_max(self) -> float:
        return 2 * max(self.eigenvalues)


# ---------------------------------------------------------------- MNIST-1D


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(seed: int, num_samples: int):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    data = make_dataset(args)  # generated locally; never the download path
    return data["x"], data["y"], data["x_test"], data["y_test"]


def mnist1d_data(seed: int = 42, num_samples: int = 5000, dtype: torch.dtype = torch.float32):
    """MNIST-1D ``(x_train [N, 40], y_train [N], x_test, y_test)`` generated locally.

    The default (seed 42, 5000 samples, 80 % train) is the published 4000/1000 split.
    """
    x, y, xt, yt = _mnist1d_arrays(seed, num_samples)
    as_x = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    as_y = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    return as_x(x), as_y(y), as_x(xt), as_y(yt)


def mnist1d_mlp(hidden: int = 512) -> nn.Module:
    """The MNIST-1D MLP: 40-512-512-10 with ReLU (288,778 parameters)."""
    return nn.Sequential(
        nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


class _Unsqueeze(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1) if x.dim() == 2 else x


def mnist1d_cnn(channels: int = 25, norm: Callable[[int], nn.Module] | None = None) -> nn.Module:
    """The MNIST-1D CNN of Greydanus (2020): three Conv1d (stride 2) + ReLU, then Linear.

    Args:
        channels: convolution channels (25 in the paper).
        norm: optional normalisation layer factory after each convolution.
    """
    layers: list[nn.Module] = [_Unsqueeze()]
    c_in = 1
    for k in (5, 3, 3):
        layers.append(nn.Conv1d(c_in, channels, k, stride=2, padding=1))
        if norm is not None:
            layers.append(norm(channels))
        layers.append(nn.ReLU())
        c_in = channels
    layers += [nn.Flatten(), nn.Linear(channels * 5, 10)]
    return nn.Sequential(*layers)


def bn_cnn(channels: int = 16) -> nn.Module:
    """MNIST-1D CNN with BatchNorm1d after each convolution."""
    return mnist1d_cnn(channels, norm=nn.BatchNorm1d)


def gn_cnn(channels: int = 16, groups: int = 4) -> nn.Module:
    """The GroupNorm twin of :func:`bn_cnn`."""
    return mnist1d_cnn(channels, norm=lambda c: nn.GroupNorm(groups, c))


# ---------------------------------------------------------------- tiny transformer


class TinyTransformer(nn.Module):
    """Token and position embeddings, ``num_layers`` pre-norm encoder blocks, LayerNorm, and a
    classification head on the mean of the sequence (``[B, T]`` ids → ``[B, classes]``)."""

    def __init__(
        self,
        vocab: int = 16,
        dim: int = 32,
        heads: int = 4,
        num_layers: int = 1,
        max_len: int = 64,
        classes: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        block = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: Tensor) -> Tensor:
        # Position ids per example; a shared [T] row broadcast over the batch gives the same
        # outputs (and the engine measures that pattern too, through the broadcast).
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        h = self.blocks(self.embed(ids) + self.pos(pos))
        return self.head(self.norm(h).mean(1))


def tiny_transformer(**kwargs) -> TinyTransformer:
    return TinyTransformer(**kwargs)


class TokenLoss(nn.Module):
    """Mean cross-entropy over every position of ``[B, T, V]`` logits (a model output with
    ``.logits`` too) against ``[B, T]`` targets: each example's loss is the mean over its
    positions, and the batch's the mean over examples, as the fast engine needs.

    The engine knows this loss to be a mean of per-example losses (as it knows
    ``nn.CrossEntropyLoss``), so it does not check that on every call by evaluating the loss
    once more per example — unless targets equal ``ignore_index``: positions left out make
    the batch mean one over a different number of positions per example, not a mean of
    per-example losses."""

    mean_of_examples = True  # read by gradnoise._functional.is_known_mean_loss

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits, targets: Tensor) -> Tensor:
        logits = getattr(logits, "logits", logits)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=self.ignore_index)  # fmt: skip


class CausalBlock(nn.Module):
    """nanoGPT's pre-norm decoder block on ``[B, T, d]``: causal self-attention through one
    ``qkv`` Linear and scaled dot-product attention, then a GELU MLP, each residual."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2, self.heads = nn.LayerNorm(d), nn.LayerNorm(d), heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


def token_data(n: int, seq_len: int = 16, vocab: int = 16, classes: int = 4, seed: int = 0):
    """Synthetic sequence classification: the label is the most frequent token modulo classes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_len), generator=g)
    counts = torch.nn.functional.one_hot(ids, vocab).sum(1)
    return ids, counts.argmax(1) % classes


# ---------------------------------------------------------------- task registry


@dataclass(frozen=True)
class Task:
    """A model factory, a loss and train/test data: what ``gradnoise measure`` runs on."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    make_loss: Callable[[], nn.Module]
    make_data: Callable[[], tuple[Tensor, Tensor, Tensor, Tensor]]


def _linreg_data():
    lr = LinearRegression.make()
    g = torch.Generator().manual_seed(0)
    x, y = lr.sample(4000, g, dtype=torch.float32)
    xt, yt = lr.sample(1000, g, dtype=torch.float32)
    return x, y, xt, yt


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("mnist1d-mlp", "MNIST-1D (4000/1000), MLP 40-512-512-10", mnist1d_mlp, nn.CrossEntropyLoss, mnist1d_data),
        Task("mnist1d-cnn", "MNIST-1D (4000/1000), 1-D CNN (Greydanus 2020)", mnist1d_cnn, nn.CrossEntropyLoss, mnist1d_data),
        Task(
            "linreg",
            "analytic linear regression, d=8 (closed-form G, Σ, H)",
            lambda: nn.Linear(8, 1, bias=False),
            nn.MSELoss,
            _linreg_data,
        ),
        Task(
            "tiny-transformer",
            "synthetic token classification, 1-block transformer",
            tiny_transformer,
            nn.CrossEntropyLoss,
            lambda: (*token_data(4000, seed=0), *token_data(1000, seed=1)),
        ),
    ]
}


def get_task(name: str) -> Task:
    """The built-in task ``name``.

    Raises:
        ValueError: listing the known tasks.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name]
