"""One rank of the distributed tests (tests/test_distributed.py): ``python dist_worker.py
RANK PORT MODE OUT``. Trains a small float64 model for a few steps under DDP or FSDP2 with
the gloo backend, with and without the Monitor, and writes what the test compares to
``OUT/rank<RANK>.json``."""

import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import gradnoise as gn

STEPS, LOCAL, WORLD = 3, 8, 2


class LSTMHead(nn.Module):
    """An LSTM over a sequence of 6-vectors, then a Linear head on its mean over time."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.LSTM(6, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x)[0].mean(1))


class ReusedHead(nn.Module):
    """An MLP whose head's weight is used again outside the head's call, in the root's forward."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h) + 0.5 * nn.functional.linear(h, self.head.weight)


def model_factory(model="mlp"):
    torch.manual_seed(0)
    if model == "lstm":
        return LSTMHead().double()
    if model == "reused":
        return ReusedHead().double()
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3)).double()


def data(step, model="mlp"):
    g = torch.Generator().manual_seed(100 + step)
    shape = (WORLD * LOCAL, 5, 6) if model == "lstm" else (WORLD * LOCAL, 6)
    return torch.randn(*shape, dtype=torch.float64, generator=g), torch.randint(0, 3, (WORLD * LOCAL,), generator=g)


def wrap(model, kind):
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for m in model.children():
        if isinstance(m, nn.Linear) and not isinstance(model, ReusedHead):  # its head stays in the root's group
            fully_shard(m)
    fully_shard(model)
    return model


def train(kind, rank, monitor_kwargs=None, accumulation=1, model_name="mlp"):
    model = wrap(model_factory(model_name), kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = None if monitor_kwargs is None else gn.Monitor(model, nn.CrossEntropyLoss(), accumulation_steps=accumulation,
                                                          strict=True, **monitor_kwargs)  # fmt: skip
    records = []
    for step in range(STEPS):
        x, y = data(step, model_name)
        xl, yl = x[rank * LOCAL : (rank + 1) * LOCAL], y[rank * LOCAL : (rank + 1) * LOCAL]
        opt.zero_grad()
        parts = list(zip(xl.chunk(accumulation), yl.chunk(accumulation), strict=True))
        total = 0.0
        for j, (xm, ym) in enumerate(parts):
            last = j == len(parts) - 1
            ctx = model.no_sync() if kind == "ddp" and not last else torch.enable_grad()
            with ctx:
                loss = nn.CrossEntropyLoss()(model(xm), ym) / accumulation
                loss.backward()
                total += float(loss)
        if mon is not None:
            records.append(mon.step(xl, yl, optimizer=opt, loss=total))
        opt.step()
    if mon is not None:
        mon.close()
    params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return records, [p.detach().reshape(-1).tolist() for p in params]


def main():
    rank, port, mode, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result = {}
    if mode in ("ddp", "fsdp", "ddp-accumulate", "ddp-lstm"):
        kind = mode.split("-")[0]
        accumulation = 2 if mode.endswith("accumulate") else 1
        model_name = "lstm" if mode.endswith("lstm") else "mlp"
        _, plain = train(kind, rank, accumulation=accumulation, model_name=model_name)
        records, monitored = train(kind, rank, {"run_dir": os.path.join(out, "run")}, accumulation=accumulation,
                                   model_name=model_name)  # fmt: skip
        result = {"records": records, "bitwise": plain == monitored}
    elif mode == "rank-fails":  # rank 1 passes half its batch to step(): its measurement fails
        model = wrap(model_factory(), "ddp")
        mon = gn.Monitor(model, nn.CrossEntropyLoss(), strict=True, timeout=60)
        x, y = data(0)
        xl, yl = x[rank * LOCAL : (rank + 1) * LOCAL], y[rank * LOCAL : (rank + 1) * LOCAL]
        nn.CrossEntropyLoss()(model(xl), yl).backward()
        try:
            mon.step(xl if rank == 0 else xl[:4], yl if rank == 0 else yl[:4])
        except Exception as exc:  # noqa: BLE001
            result = {"error": type(exc).__name__, "message": str(exc)}
    elif mode == "refusals":  # mode='separate' under DDP; an RNN under FSDP; ranks with batches of different sizes
        from torch.distributed.fsdp import fully_shard

        try:  # its recurrence, run again from the kept call, needs the whole weights
            gn.Monitor(fully_shard(model_factory("lstm")), nn.CrossEntropyLoss())
        except ValueError as exc:
            result["fsdp-rnn"] = str(exc)
        model = wrap(model_factory(), "ddp")
        try:
            gn.Monitor(model, nn.CrossEntropyLoss(), mode="separate")
        except ValueError as exc:
            result["separate"] = str(exc)
        mon = gn.Monitor(model, nn.CrossEntropyLoss(), strict=True)
        x, y = data(0)
        n = LOCAL if rank == 0 else LOCAL // 2
        xl, yl = x[rank * LOCAL : rank * LOCAL + n], y[rank * LOCAL : rank * LOCAL + n]
        nn.CrossEntropyLoss()(model(xl), yl).backward()
        try:
            mon.step(xl, yl)
        except ValueError as exc:
            result["unequal"] = str(exc)
    elif mode.startswith("fsdp-outside"):  # a weight used outside its layer's call: hooks cannot measure it
        from torch.distributed.fsdp import fully_shard

        def sharded():  # -nested: the head its own FSDP unit, left unsharded after its forward for the reuse
            model = model_factory("reused")
            if mode.endswith("nested"):
                fully_shard(model.head, reshard_after_forward=False)
            return fully_shard(model)

        model, twin = sharded(), sharded()
        mon = gn.Monitor(model, nn.CrossEntropyLoss())
        warnings = []
        handler = logging.Handler()
        handler.emit = lambda record: warnings.append(record.getMessage())
        logging.getLogger("gradnoise").addHandler(handler)
        x, y = data(0)
        xl, yl = x[rank * LOCAL : (rank + 1) * LOCAL], y[rank * LOCAL : (rank + 1) * LOCAL]
        for m in (model, twin):
            nn.CrossEntropyLoss()(m(xl), yl).backward()
        result = {"record": mon.step(xl, yl), "warnings": warnings, "mode": mon.mode,
                  "bitwise": all(torch.equal(a.grad.to_local(), b.grad.to_local())
                                 for a, b in zip(model.parameters(), twin.parameters(), strict=True))}  # fmt: skip
    elif mode == "rank-missing":  # rank 1 never calls step(): rank 0 times out
        model = wrap(model_factory(), "ddp")
        mon = gn.Monitor(model, nn.CrossEntropyLoss(), strict=True, timeout=3)
        x, y = data(0)
        xl, yl = x[rank * LOCAL : (rank + 1) * LOCAL], y[rank * LOCAL : (rank + 1) * LOCAL]
        nn.CrossEntropyLoss()(model(xl), yl).backward()
        if rank == 0:
            start = time.perf_counter()
            try:
                mon.step(xl, yl)
            except Exception as exc:  # noqa: BLE001
                result = {"error": type(exc).__name__, "message": str(exc), "seconds": time.perf_counter() - start}
        else:
            time.sleep(8)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if mode != "rank-missing":
        dist.barrier()  # both ranks done communicating before gloo tears down
        dist.destroy_process_group()
    # gloo's threads can abort the interpreter's own teardown; everything is written
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
