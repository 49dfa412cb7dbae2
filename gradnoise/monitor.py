"""Instrumenting a training loop: gradient noise and sharpness on a schedule, written to
crash-safe logs, without changing the run.

    monitor = gn.Monitor(model, loss_fn, run_dir="runs/exp1", every=1,
                         sharpness_every=100, sharpness_data=(x_fixed, y_fixed))
    for x, y in loader:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        monitor.step(x, y, optimizer=opt, loss=loss)   # after backward, before opt.step()
        opt.step()
    monitor.close()

Two ways to measure (``mode``):

* ``"hooks"``: forward hooks and output-gradient hooks on the supported layers apply the
  per-layer rules of :mod:`gradnoise.rules` inside *your* backward pass, and the mean
  gradient is read from ``.grad`` — no extra forward or backward (an LSTM, GRU or RNN
  layer's recurrence runs again after the backward pass, from its kept inputs and output
  gradients). Needs every trainable parameter in a supported layer called once per
  forward, a mean-reduced loss, and ``step()`` between ``backward()`` and ``zero_grad()``.
* ``"separate"``: ``step()`` calls :func:`gradnoise.gradient_stats` on the batch (one extra
  forward and backward). Works for any model.
* ``"two-batch"``: only the two-batch estimate from micro-batch or per-rank gradients.
* ``"auto"`` (default): ``"hooks"`` when every parameter is covered, else ``"separate"``;
  ``"two-batch"`` for BatchNorm in train mode (or ``batchnorm="eval"``: a separate pass with
  BatchNorm in eval mode); ``"separate"`` on the eager module of a ``torch.compile``'d model.

Gradient accumulation (``accumulation_steps=k``): each micro-batch backward is observed by
parameter hooks, so the two-batch estimate (McCandlish et al. 2018, App. A.1) comes free.
Under DDP or FSDP2 (``torch.distributed`` initialised, world size > 1) the hooks'
per-example statistics are reduced over ranks into those of the global batch
(:func:`~gradnoise.step_stats.global_step_stats`), DDP's per-rank gradients also give the
two-batch estimate, every rank gets the same record, and only rank 0 writes.

Nothing the monitor does changes the run: hooks only read, ``.grad`` is only read, RNG
state is untouched, and a training run with the monitor is bitwise identical to one
without. An exception inside a metric is logged and counted (``monitor.errors``), never
raised into the training loop, unless ``strict=True``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from gradnoise._functional import (
    LossFn,
    as_tuple,
    batch_size_of,
    check_loss_fn,
    check_no_train_batchnorm,
    is_compiled,
    trainable_params,
)
from gradnoise.distributed import group_of
from gradnoise.eigen import hessian_eigenvalues
from gradnoise.engine.rnn import unrollable
from gradnoise.engine.step_hooks import StepHooks
from gradnoise.micro_batches import MicroBatches
from gradnoise.monitor_mode import NORM_LAYERS, batchnorm_eval, choose_mode, scoped
from gradnoise.noise_scale import NoiseScaleEMA
from gradnoise.preconditioner import Preconditioner, check_preconditioner, step_metric
from gradnoise.rules import rule_for
from gradnoise.rundir import open_run_dir
from gradnoise.schedules import Schedule, check_schedule, describe, is_due, log_spaced
from gradnoise.sinks import CSVSink, JSONLSink, MemorySink, TensorBoardSink
from gradnoise.stats import gradient_stats
from gradnoise.step_stats import (
    CancellationError,
    HooksCannotMeasure,
    StepStats,
    global_step_stats,
    preconditioned_step_stats,
    step_stats,
)

__all__ = ["Monitor", "log_spaced"]

log = logging.getLogger(__name__)

Mode = Literal["auto", "hooks", "separate", "two-batch"]


class Monitor:
    """Gradient noise (and sharpness) of a training run, on a schedule, to sinks.

    Args:
        model: the model being trained (a DDP wrapper or the module itself).
        loss_fn: the mean-reduced loss the loop uses.
        run_dir: directory for ``config.json``, ``metrics.jsonl`` and ``metrics.csv``
            (created); ``None`` keeps records in memory only (``monitor.history``).
        every: noise schedule: every k steps (int), or a callable ``step → bool``
            (e.g. :func:`log_spaced`).
        sharpness_every: schedule for ``λ_max`` (Lanczos, warm-started from the previous
            eigenvector) on the fixed ``sharpness_data``; ``None`` disables it.
        sharpness_data: ``(inputs, targets)`` — the stated examples ``λ_max`` is of.
        sharpness_tol: relative residual ``‖Hv − λv‖/λ`` at which ``λ_max`` stops (recorded
            as ``lambda_max_residual``; the eigenvalue error is at most ``residual · λ``, and
            typically of order ``residual² · λ²/gap``). 1 % is ample next to ``2/η``.
        variance: also per-element variance and GSNR (one extra product per layer).
        per_layer: record ``B_simple`` per module.
        ema: β of the moving averages of ``tr Σ`` and ``|G|²`` behind ``b_simple_ema``.
        accumulation_steps: micro-batches per optimizer step; call ``step()`` once per
            optimizer step with the whole batch (all micro-batches concatenated).
        loss_scale: factor the loop multiplies each micro-batch loss by before
            ``backward()`` (default ``1/accumulation_steps``, the usual convention).
        mode: ``"auto"``, ``"hooks"`` or ``"separate"`` (module docstring).
        tensorboard: also write TensorBoard scalars to ``run_dir`` (optional extra).
        strict: re-raise exceptions from metrics instead of logging and counting them.
        config: extra entries for ``config.json`` (hyperparameters, seed, ...).
        resume: continue the run already in ``run_dir`` after its last complete record
            (same columns; its config must agree). Without it a ``run_dir`` that holds a
            run is refused.
        preconditioner: the run's ``Adam``/``AdamW`` optimizer (or a dict ``P``): each record
            also holds the noise scale of its update in the P-metric, ``trace_cov_precond``,
            ``grad_norm_sq_precond`` and ``b_simple_precond`` (``tr(PΣ)``, ``GᵀPG``, their
            ratio; :mod:`gradnoise.preconditioner`), from the optimizer's state before its
            step, read only; ``None`` before its first step.
        timeout: under ``torch.distributed``, seconds a measured step waits for the other
            ranks' statistics before raising (a rank that crashed or skipped ``step()``).
        batchnorm: for a model with BatchNorm in train mode, whose examples' gradients are
            coupled through the batch statistics so that per-example gradients are not
            defined: ``"two-batch"`` records only the two-batch estimate from the micro-batch
            (``accumulation_steps > 1``) or per-rank gradients, each of which is well defined;
            ``"eval"`` measures per-example statistics in a separate pass with the BatchNorm
            layers in eval mode (running statistics) — the noise of a slightly different
            function, stated in the run's config.
        scope: ``"all"`` parameters, or ``"norms"``: only those of the LayerNorm/RMSNorm
            layers, hooked alone at near-zero cost (the layer-normalisation GNS of Gray et al.
            2024, which tracks the whole model's; see the report's claim 13).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        run_dir: str | Path | None = None,
        every: Schedule = 1,
        sharpness_every: Schedule = None,
        sharpness_data: tuple | None = None,
        sharpness_tol: float = 1e-2,
        variance: bool = False,
        per_layer: bool = True,
        ema: float = 0.95,
        accumulation_steps: int = 1,
        loss_scale: float | None = None,
        mode: Mode = "auto",
        tensorboard: bool = False,
        strict: bool = False,
        config: dict | None = None,
        resume: bool = False,
        preconditioner: Preconditioner | None = None,
        timeout: float = 300.0,
        batchnorm: Literal["two-batch", "eval"] = "two-batch",
        scope: Literal["all", "norms"] = "all",
    ) -> None:
        if mode not in ("auto", "hooks", "separate", "two-batch"):
            raise ValueError(f"unknown mode {mode!r}; choose 'auto', 'hooks', 'separate' or 'two-batch'")
        if batchnorm not in ("two-batch", "eval"):
            raise ValueError(f"unknown batchnorm {batchnorm!r}; choose 'two-batch' or 'eval'")
        check_loss_fn(loss_fn)  # a sum-reduced loss would scale tr Σ and |G|² by B²
        check_schedule(every, "every")
        check_schedule(sharpness_every, "sharpness_every")
        if sharpness_every is not None and sharpness_data is None:
            raise ValueError("sharpness_every needs sharpness_data=(inputs, targets): λ_max is of a stated set of examples")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be ≥ 1, got {accumulation_steps}")
        self.model = model
        self.compiled = is_compiled(model)  # measured on the eager module, in a separate pass
        model_ = model._orig_mod if self.compiled else model
        self.inner = model_.module if hasattr(model_, "module") and isinstance(model_.module, nn.Module) else model_
        self.loss_fn = loss_fn
        self.every, self.sharpness_every, self.sharpness_data = every, sharpness_every, sharpness_data
        self.sharpness_tol = sharpness_tol
        self.variance, self.per_layer, self.strict = variance, per_layer, strict
        self.accumulation_steps = accumulation_steps
        self.loss_scale = loss_scale if loss_scale is not None else 1.0 / accumulation_steps
        self.errors = 0
        self.history = MemorySink()
        self._ema = NoiseScaleEMA(ema)
        self._step = 0
        self._grad_scale = 1.0
        self._v_prev: Tensor | None = None
        self._keys: list[str] | None = None
        params = trainable_params(self.inner)
        self._params = scoped(self.inner, {n: p for n, p in self.inner.named_parameters() if n in params}, scope)
        self.scope = scope
        self._group = group_of(self._params, timeout)
        self._dist = None if self._group is None else self._group.dist
        self._rank0 = self._group is None or self._group.rank == 0
        self._numels = {n: p.numel() for n, p in self._params.items()}
        self._fixed_metric = check_preconditioner(self._params, preconditioner)  # a dict P, checked once
        self.preconditioner = preconditioner
        self._requested_mode, self.batchnorm = mode, batchnorm
        self.mode = choose_mode(self.inner, mode, batchnorm=batchnorm, accumulation_steps=accumulation_steps,
                                group=self._group, compiled=self.compiled,
                                tied_ok=not variance and preconditioner is None, scope=scope)  # fmt: skip
        self._hooks: StepHooks | None = None
        self._micro: MicroBatches | None = None  # accumulation or DDP: the two-batch estimate
        self._sinks: list = [self.history]
        self.run_dir = None if run_dir is None else Path(run_dir)
        if self.run_dir is not None and self._rank0:
            cfg = {
                "model": type(self.inner).__name__, "num_params": sum(p.numel() for p in self._params.values()),
                "loss_fn": type(loss_fn).__name__, "every": describe(every), "sharpness_every": describe(sharpness_every),
                "variance": variance, "ema": ema, "accumulation_steps": accumulation_steps,
                "loss_scale": self.loss_scale, "mode": self.mode, "batchnorm": self.batchnorm, "scope": scope,
                "world_size": 1 if self._dist is None else self._dist.get_world_size(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(config or {}),
            }  # fmt: skip
            run = open_run_dir(self.run_dir, json.loads(json.dumps(cfg, default=str)), resume=resume)
            self._step, self._keys = run.next_step, run.columns
            self._sinks += [JSONLSink(self.run_dir / "metrics.jsonl"), CSVSink(self.run_dir / "metrics.csv", run.columns)]
            if tensorboard:
                self._sinks.append(TensorBoardSink(self.run_dir))
        self._armed = False
        self._closed = False
        self._batchnorms = [m for m in self.inner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        try:
            self.attach()
        except BaseException:
            self.close()  # nothing may stay on the caller's model
            raise

    # ------------------------------------------------------------------ set-up

    def attach(self) -> None:
        """Install the hooks (done at construction; :meth:`close` removes them). Without a
        noise schedule (``every=None``) there is nothing for them to do: none is installed."""
        if self.every is None:
            self._armed = False
            return
        if self.mode == "hooks" and self._hooks is None:
            modules = {m: mod for m, mod in self.inner.named_modules()
                       if (rule_for(mod) is not None and (self.scope == "all" or isinstance(mod, NORM_LAYERS)))
                       or (unrollable(mod) and self.scope == "all")}  # fmt: skip
            self._hooks = StepHooks(
                self.inner, modules, armed=lambda: self._armed, elementwise=self.variance, loss_scale=self.loss_scale,
                strict=self.strict, metric=self._metric if self.preconditioner is not None else None,
            )  # fmt: skip
            self._hooks.install()
        # the two-batch estimate needs each backward's own gradient, which FSDP2 reduce-scatters
        # before a parameter hook sees it
        sharded = self._group is not None and self._group.sharded
        if (self.accumulation_steps > 1 or self._dist is not None) and self._micro is None and not sharded:
            self._micro = MicroBatches(
                self.inner, self._params, armed=lambda: self._armed, loss_scale=self.loss_scale, group=self._group
            )
        self._armed = is_due(self.every, self._step)

    def _metric(self) -> dict[str, Tensor] | None:
        return self._fixed_metric if self._fixed_metric is not None else step_metric(self._params, self.preconditioner)

    def close(self) -> None:
        """Remove the hooks and close the sinks."""
        self._closed = True
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        if self._micro is not None:
            self._micro.remove()
            self._micro = None
        for s in self._sinks:
            s.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the step

    def step(self, inputs, targets, *, optimizer: torch.optim.Optimizer | None = None, loss: Tensor | float | None = None,
             grad_scale: float = 1.0) -> dict | None:  # fmt: skip
        """Record the metrics of this step if the schedule says so; returns the record.

        Call after ``backward()`` and before ``optimizer.step()``/``zero_grad()``, with the
        whole batch of this optimizer step. ``grad_scale``: a factor the loop has applied to
        ``.grad`` since the backward pass — gradient clipping's ``min(1, max_norm / norm)``
        — which the statistics divide out (they are of the gradients before clipping).
        """
        if not (isinstance(grad_scale, (int, float)) and math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale must be a positive finite number (the factor applied to .grad), got {grad_scale!r}")
        self._grad_scale = float(grad_scale)
        if self._closed:
            raise RuntimeError("Monitor.step() after close(): create a new Monitor to measure again")
        step = self._step
        record = None
        try:
            if self._armed:
                record = self._record(step, inputs, targets, optimizer, loss)
            if is_due(self.sharpness_every, step):
                record = self._sharpness(record or self._base(step, inputs, optimizer, loss), optimizer)
            if record is not None:
                self._write(record)
        except Exception as exc:
            self.errors += 1
            if self.strict:
                raise
            log.warning("gradnoise.Monitor: a metric failed at step %d (%s: %s); training continues", step, type(exc).__name__, exc)
        finally:
            if self._hooks is not None:
                self._hooks.reset()
            if self._micro is not None:
                self._micro.reset()
            self._step += 1
            self._armed = is_due(self.every, self._step)
        return record

    def _base(self, step, inputs, optimizer, loss) -> dict:
        lr = optimizer.param_groups[0].get("lr") if optimizer is not None else None
        return {
            "step": step,
            "batch_size": as_tuple(inputs)[0].shape[0] * (1 if self._dist is None else self._dist.get_world_size()),
            "lr": lr,
            "loss": None if loss is None else float(loss.detach() if isinstance(loss, Tensor) else loss),
        }

    def _record(self, step, inputs, targets, optimizer, loss) -> dict:
        seen = len(self._micro.sq) if self._micro is not None else 1
        if self.accumulation_steps > 1 and self._dist is None and seen != self.accumulation_steps:
            raise ValueError(
                f"accumulation_steps={self.accumulation_steps} but {seen} backward passes since the "
                "last step(): call step() once per optimizer step, after all its micro-batches"
            )
        rec = self._base(step, inputs, optimizer, loss)
        B = batch_size_of(inputs, targets, min_size=2)
        if self.mode == "hooks":  # the user's own forward: its BatchNorm layers must not couple examples
            check_no_train_batchnorm((type(m).__name__, m) for m in self._batchnorms)
        if self.mode == "two-batch":
            if self._micro is not None:
                rec.update(self._micro.record(B, self._factor()))
            return rec
        if self.mode == "separate":
            with batchnorm_eval(self._batchnorms if self.batchnorm == "eval" else []):
                stats = gradient_stats(self.inner, self.loss_fn, inputs, targets, variance=self.variance)
            rec["loss"] = rec["loss"] if rec["loss"] is not None else stats.loss
        else:
            try:
                stats = self._stats_from_hooks(B, rec["loss"])  # the scalars and per_layer
            except CancellationError:  # this step measured again, by the engine (which does not cancel)
                if self._dist is not None or self.scope != "all":  # the engine measures this rank, all parameters
                    raise
                stats = gradient_stats(self.inner, self.loss_fn, inputs, targets, variance=self.variance)
            except HooksCannotMeasure as exc:  # a module reused, or a layer not on the batch
                if self._requested_mode != "auto" or self._dist is not None or self.scope != "all":
                    raise
                log.info("gradnoise.Monitor: %s; measuring in mode='separate' from now on", exc)
                self._hooks.remove()
                self._hooks, self.mode = None, "separate"
                stats = gradient_stats(self.inner, self.loss_fn, inputs, targets, variance=self.variance)
            if getattr(stats, "loss", None) is not None:
                rec["loss"] = stats.loss  # the global batch's, the same on every rank
        # |ḡ|² = |G|²_est + tr Σ_est / B (module docstring of stats), B of the global batch
        grad_norm = math.sqrt(max(stats.grad_norm_sq + stats.trace_cov / rec["batch_size"], 0.0))
        rec.update(
            grad_norm=grad_norm, trace_cov=stats.trace_cov, grad_norm_sq=stats.grad_norm_sq,
            b_simple=stats.b_simple, b_simple_ema=self._ema.update(stats.trace_cov, stats.grad_norm_sq),
            gsnr=stats.gsnr,
        )  # fmt: skip
        if self.per_layer:
            for name, ls in stats.per_layer.items():
                rec[f"b_simple/{name}"] = ls.b_simple
        if self.preconditioner is not None:
            rec.update(self._preconditioned(inputs, targets, B))
        if self._micro is not None:  # under DDP its all-reduce was the statistics' own
            summed = stats.extra[0] if getattr(stats, "extra", ()) else None
            rec.update(self._micro.record(B, self._factor(), summed))
        bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v) and not k.startswith(("b_simple", "two_batch_b_simple"))]
        if bad:
            raise FloatingPointError(f"non-finite {', '.join(bad)} at step {step}: the loss or the gradients overflow")
        return rec

    def _preconditioned(self, inputs, targets, B: int) -> dict:
        """This step's noise scale in the optimizer's metric: from the hooks' ``|g_i|²_P``, or
        measured by the engine (mode 'separate', or a step whose centred sums cancel)."""
        keys = ("trace_cov_precond", "grad_norm_sq_precond", "b_simple_precond")
        if self._dist is not None:  # not yet reduced over ranks
            return dict.fromkeys(keys)
        P = self._hooks.step_weights() if self._hooks is not None else self._metric()
        if P is None:  # the optimizer has not stepped yet
            return dict.fromkeys(keys)
        stats = None
        if self._hooks is not None:
            with contextlib.suppress(CancellationError):
                factor = self._factor()
                stats = preconditioned_step_stats(self._hooks, self._params, self._numels, B, factor)
        if stats is None:
            stats = gradient_stats(self.inner, self.loss_fn, inputs, targets, variance=False, preconditioner=P)
        return dict(zip(keys, (stats.trace_cov, stats.grad_norm_sq, stats.b_simple), strict=True))

    def _factor(self) -> float:
        """What ``.grad`` is of the mean gradient: the loss scale × accumulation steps × this
        step's ``grad_scale``."""
        return self.loss_scale * self.accumulation_steps * self._grad_scale

    def _stats_from_hooks(self, B: int, loss: float | None) -> StepStats:
        """Statistics of this step from the hooks' per-example norms and ``.grad`` (of the
        global batch under DDP/FSDP: one all-reduce)."""
        factor = self._factor()
        if self._group is not None:
            extra = (self._micro.local_small(),) if self._micro is not None else ()
            return global_step_stats(self._hooks, self._params, self._numels, B, factor, self.accumulation_steps,
                                     self._group, loss, extra)  # fmt: skip
        return step_stats(self._hooks, self._params, self._numels, B, factor, self.accumulation_steps)

    def _sharpness(self, record: dict, optimizer) -> dict:
        modes = [(m, m.training) for m in self.inner.modules()]
        try:  # curvature of the deterministic (eval-mode) loss; modes restored below
            self.inner.eval()
            # The top eigenvector moves slowly during training: Lanczos started from the
            # previous one and checked after every product stops after a few products (the
            # first evaluation starts from hessian_eigenvalues' seeded random vector).
            eig = hessian_eigenvalues(
                self.inner, self.loss_fn, self.sharpness_data, k=1, which="LA",
                tol=self.sharpness_tol, v0=self._v_prev,
            )  # fmt: skip
        finally:
            for m, mode in modes:
                m.training = mode
        self._v_prev = eig.eigenvectors[:, 0]
        lr = optimizer.param_groups[0].get("lr") if optimizer is not None else None
        record.update(
            lambda_max=eig.eigenvalues[0], lambda_max_residual=eig.residuals[0],
            lambda_max_hvps=eig.num_hvps, two_over_lr=None if not lr else 2.0 / lr,
        )  # fmt: skip
        return record

    def _write(self, record: dict) -> None:
        if self._keys is None:  # fixed columns: every metric present (None when absent)
            extra = ["lambda_max", "lambda_max_residual", "lambda_max_hvps", "two_over_lr"]
            if self.accumulation_steps > 1 or self._dist is not None:
                extra += ["two_batch_trace_cov", "two_batch_grad_norm_sq", "two_batch_b_simple"]
            self._keys = list(dict.fromkeys(list(record) + extra))
        full = {k: record.get(k) for k in self._keys}
        full.update({k: v for k, v in record.items() if k not in full})
        if self._rank0:
            for s in self._sinks:
                s.write(full)
