"""Per-step overhead of gradnoise.Monitor under DDP and FSDP2 (two gloo processes on the CPU,
one thread each), against the same distributed training step without it, and next to the
Monitor's overhead in a single process.

    python -m benchmarks.bench_distributed [--batch 128] [--steps 100] [--repeats 5]

Model: the MNIST-1D MLP, AdamW; each rank trains on its own batch of ``--batch`` examples.
Blocks of ``--steps`` plain and monitored steps alternate on every rank; medians over
``--repeats`` blocks. The last column divides the distributed ratio by the single-process
one: what distribution itself adds (one all-reduce of 2P + 4 numbers per measured step).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradnoise as gn
from gradnoise.tasks import mnist1d_data, mnist1d_mlp


def build(kind: str, monitored: bool):
    torch.manual_seed(0)
    model = mnist1d_mlp()
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, gn.Monitor(model, nn.CrossEntropyLoss(), strict=True) if monitored else None


def block(run, x, y, batch, steps, seed) -> float:
    model, opt, mon = run
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        if mon is not None:
            mon.step(x[idx], y[idx], optimizer=opt, loss=loss)
        opt.step()
    return (time.perf_counter() - start) / steps


def ratios(kind: str, args, seed_base: int = 0) -> tuple[float, float]:
    x, y, _, _ = mnist1d_data()
    runs = {m: build(kind, m) for m in (False, True)}
    times = {False: [], True: []}
    for r in range(args.repeats):
        for m in (False, True):
            block(runs[m], x, y, args.batch, 10, seed_base + r)  # warm-up
            times[m].append(block(runs[m], x, y, args.batch, args.steps, seed_base + r))
    return statistics.median(times[False]), statistics.median(times[True])


def rank_main(rank: int, port: str, args, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out = {kind: ratios(kind, args, seed_base=100 * rank) for kind in ("ddp", "fsdp")}
    if rank == 0:
        queue.put(out)
    gc.collect()  # the DDP and FSDP models go before the group, so destroying it stops gloo's threads
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128, help="examples per rank per step")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    single = ratios("single", args)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=rank_main, args=(r, port, args, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    dist_out = queue.get()
    for proc in procs:
        proc.join()
    print(f"# {platform.machine()}, torch {torch.__version__}, gloo, 2 processes × 1 thread, MNIST-1D MLP, AdamW, "
          f"B = {args.batch} per rank, {args.steps} steps × {args.repeats} blocks")  # fmt: skip
    print("| setting | plain ms / step | monitored ms / step | × plain | ÷ single-process × |")
    print("|---|---|---|---|---|")
    s_ratio = single[1] / single[0]
    print(f"| single process | {1e3 * single[0]:.2f} | {1e3 * single[1]:.2f} | {s_ratio:.3f} | 1.000 |")
    for kind, (plain, mon) in dist_out.items():
        print(f"| {kind.upper()} (2 ranks) | {1e3 * plain:.2f} | {1e3 * mon:.2f} | {mon / plain:.3f} | {mon / plain / s_ratio:.3f} |")


if __name__ == "__main__":
    main()
