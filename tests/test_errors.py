"""Bad input gets a clear exception: type and message."""

import pytest
import torch
from torch import nn

import gradnoise as gn
from tests.cases import CASES_BY_NAME

MLP = CASES_BY_NAME["mlp"]
METHODS = ["fast", "vmap"]


def _mlp():
    return MLP.make(torch.float32)


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_one(method):
    model, loss, x, y = _mlp()
    with pytest.raises(ValueError, match="batch of 1 example: a variance needs at least 2"):
        gn.gradient_stats(model, loss, x[:1], y[:1], method=method)


@pytest.mark.parametrize("fn", [gn.per_sample_grads, gn.gradient_stats])
def test_empty_batch(fn):
    model, loss, x, y = _mlp()
    with pytest.raises(ValueError, match="empty batch"):
        fn(model, loss, x[:0], y[:0])


@pytest.mark.parametrize("fn", [gn.per_sample_grads, gn.gradient_stats])
def test_mismatched_lengths(fn):
    model, loss, x, y = _mlp()
    with pytest.raises(ValueError, match="different batch sizes"):
        fn(model, loss, x, y[:-1])


@pytest.mark.parametrize("method", METHODS)
def test_non_scalar_loss(method):
    model, _, x, y = _mlp()
    with pytest.raises(ValueError, match="reduction='none'"):
        gn.gradient_stats(model, nn.CrossEntropyLoss(reduction="none"), x, y, method=method)
    with pytest.raises(ValueError, match="must return a scalar"):
        gn.gradient_stats(model, lambda o, t: o.sum(1).mean() * torch.ones(2), x, y, method=method)


def test_sum_reduced_loss_refused():
    model, _, x, y = _mlp()
    with pytest.raises(ValueError, match="reduction='sum'.*reduction='mean'"):
        gn.per_sample_grads(model, nn.CrossEntropyLoss(reduction="sum"), x, y)


@pytest.mark.parametrize("method", METHODS)
def test_nan_loss(method):
    model, loss, x, y = _mlp()
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss is nan"):
        gn.gradient_stats(model, loss, x, y, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_inf_gradient(method):
    model, loss, x, y = _mlp()

    def sqrt_loss(out, target):  # finite value, infinite gradient at 0
        return loss(out, target) + torch.sqrt(out[:, 0] * 0).mean()

    with pytest.raises(FloatingPointError, match="gradient of parameter .* NaN or inf"):
        gn.gradient_stats(model, sqrt_loss, x, y, method=method)


@pytest.mark.parametrize("fn", [gn.per_sample_grads, gn.gradient_stats])
def test_no_trainable_parameters(fn):
    model, loss, x, y = _mlp()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fn(model, loss, x, y)


@pytest.mark.parametrize("method", METHODS + ["auto"])
def test_batchnorm_train_mode(method):
    model = gn.tasks.bn_cnn(channels=4)
    x, y = torch.randn(4, 40), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"BatchNorm module '2' is in train mode.*model.eval\(\).*GroupNorm"):
        gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method=method)


def test_unknown_method():
    model, loss, x, y = _mlp()
    with pytest.raises(ValueError, match="unknown method 'backpack'; choose one of 'auto', 'vmap', 'fast'"):
        gn.gradient_stats(model, loss, x, y, method="backpack")


def test_not_a_module_and_not_callable():
    _, loss, x, y = _mlp()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gn.per_sample_grads(lambda t: t, loss, x, y)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gn.per_sample_grads(nn.Linear(5, 3), "mse", x, y)


def test_bad_inputs_type_and_device_and_chunk():
    model, loss, x, y = _mlp()
    with pytest.raises(TypeError, match="inputs must be a Tensor or a non-empty tuple"):
        gn.per_sample_grads(model, loss, x.tolist(), y)
    with pytest.raises(ValueError, match="0-d tensor"):
        gn.per_sample_grads(model, loss, x, y[0])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        gn.per_sample_grads(model, loss, x, y, chunk_size=0)


def test_dataset_size_smaller_than_batch():
    model, loss, x, y = _mlp()
    with pytest.raises(ValueError, match="6 examples but dataset_size=4"):
        gn.gradient_stats(model, loss, x, y, dataset_size=4)


def test_instance_norm_running_stats_in_train_mode_vmap():
    model = nn.Sequential(nn.Linear(8, 8), nn.Unflatten(1, (2, 4)), nn.InstanceNorm1d(2, track_running_stats=True), nn.Flatten(), nn.Linear(8, 3))
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="InstanceNorm module '2' updates running statistics.*eval"):
        gn.per_sample_grads(model, nn.CrossEntropyLoss(), x, y)
    before = model[2].running_mean.clone()
    s = gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method="fast")  # fast path: fine
    assert s.batch_size == 5 and torch.equal(model[2].running_mean, before)
