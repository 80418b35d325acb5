"""KV path microbenchmark: how close the KV page transfer comes to the link, and how much of it
layer-wise streaming hides under the sender's prefill.

    python -m mpiserve.bench.kv_path [--quick] [--out results]

Launches itself as `mpiexec -n 3` (mpiexec next to the Python interpreter). Two parts:

1. **Bandwidth** (ranks 1 -> 2; rank 0 waits). For each size N, the real path: the sender
   announces the transfer on the control plane (`KVAnnounce`), packs the KV of N tokens of
   every layer with `KVCache.read` from pages scattered over its pool and sends it layer by
   layer with `kv_transfer.send_layer`; the receiver posts its receives with
   `post_receives`, waits with `WorkWaiter` and unpacks every layer with `KVCache.write` into
   its own scattered pages - the code the engine ranks run. Against it: a raw torch.distributed
   send/recv of one contiguous tensor of the same bytes. Ratio = raw time / real time (target
   >= 80%).

2. **Overlap** (rank 0 drives two real engine ranks through the router API). For prompts of
   N tokens: `t_prefill` = `start_generate` of a prompt (one output token) on the prefill
   engine; `t_transfer` = `remote_send` of that same prompt to the other engine (the sender
   holds it in its prefix cache, so it computes one token and sends); `t_streamed` =
   `remote_send` of a new prompt of the same length (prefill, with each layer's KV sent as soon
   as the chunk that ends the prefill computed that layer - the engine's default step budget of
   1024 tokens, so the transfer overlaps the compute of the last chunk's remaining layers).
   Hidden share = 1 - (t_streamed - t_prefill) / t_transfer; 1 means the transfer is entirely
   hidden, 0 that streaming hides nothing.

Writes `kv_path.json` and `kv_path.md` to `--out`. Medians over repetitions. `--quick` uses a
tiny model and sizes (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

from .report_files import write_report

PAGE_SIZE = 16
# prompt lengths are a page multiple + 1: the sender's prefix cache then holds all but the last
# token of a prompt it has seen, so "transfer alone" computes one token. 2001 tokens prefill in
# two chunks of the default 1024-token step budget; the KV streams during the last (977 tokens).
FULL = {"sizes": [256, 1024, 4096], "repeats": 7, "prompt": 2001, "overlap_repeats": 5}
QUICK = {"sizes": [64, 256], "repeats": 2, "prompt": 257, "overlap_repeats": 1}
TIMEOUT_S = 120.0


# ---- launching ---------------------------------------------------------------------------------
def launch(argv: list[str]) -> int:
    from .serving import run_workers
    return run_workers("mpiserve.bench.kv_path", 3, argv)


def model_dir(args) -> str:
    from .bench_model import BENCH, bench_model_dir
    from .bench_model import QUICK as QUICK_SHAPE
    if args.model:
        return args.model
    return str(bench_model_dir(QUICK_SHAPE if args.quick else BENCH))


# ---- part 1: bandwidth --------------------------------------------------------------------------
def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wait(waiter) -> None:
    while not waiter.finished:
        time.sleep(0.0002)
    if waiter.error:
        raise RuntimeError(f"transfer failed: {waiter.error}")


def _scattered_cache(config, tokens: int, dtype, device, seed: int):
    """A KV cache with room for `tokens` and the page ids of one sequence spread over it."""
    import torch

    from ..engine.kv_cache import KVCache
    pages = math.ceil(tokens / PAGE_SIZE)
    kv = KVCache(config, 2 * pages + 1, PAGE_SIZE, dtype, device)
    generator = torch.Generator().manual_seed(seed)
    for layer in kv.layers:
        layer.copy_(torch.randn(layer.shape, generator=generator).to(dtype))
    ids = random.Random(seed).sample(range(kv.num_pages), pages)
    return kv, ids


def barrier(comm) -> None:
    """A barrier that does not spin on rank 0 (it must leave the two cores of a small machine
    to the ranks being timed); the timed ranks poll without sleeping, to start together."""
    request = comm.Ibarrier()
    while not request.Test():
        if comm.Get_rank() == 0:
            time.sleep(0.001)


def bandwidth(comm, config, sizes: list[int], repeats: int, device) -> list[dict]:
    import torch
    import torch.distributed as dist

    from ..cluster.control import ControlChannel
    from ..cluster.engine_worker import dtype_name
    from ..cluster.kv_transfer import (
        KVStream,
        OutgoingTransfer,
        WorkWaiter,
        joined,
        post_receives,
        send_layer,
    )
    from ..cluster.messages import KVAnnounce, KVPiece
    from ..model.tensor_shard import WHOLE
    rank = comm.Get_rank()
    control = ControlChannel(comm)
    dtype = getattr(torch, config.torch_dtype)
    kv, page_ids = (_scattered_cache(config, max(sizes), dtype, device, seed=rank)
                    if rank else (None, None))
    rows = []
    for n in sizes:
        real, raw = [], []
        elements = n * config.kv_bytes_per_token // torch.empty(0, dtype=dtype).element_size()
        flat = torch.zeros(elements if rank else 0, dtype=dtype, device=device)
        for trial in range(repeats + 1):                      # trial 0 warms up
            barrier(comm)
            started = time.perf_counter()
            if rank == 1:
                slots = kv.slots(page_ids, 0, n)
                piece = KVPiece(trial, f"bw{n}", 0, n, last=True)
                control.send(2, KVAnnounce((piece,), tuple(kv.layers[0].shape[3:]),
                                           dtype_name(dtype), kv.num_layers))
                out = OutgoingTransfer(trial, f"bw{n}", None, 2, 0, n)
                stream = KVStream(2, 1, (slots,))
                for layer in range(kv.num_layers):
                    for _, _, buffer, work in send_layer(kv, layer, (stream,), WHOLE,
                                                         config.num_kv_heads):
                        out.sent(buffer, work)
                out.start_waiting(TIMEOUT_S)
                _wait(out.waiter)
            elif rank == 2:
                messages = []
                while not messages:
                    messages = control.receive_all()
                (source, announce), = messages
                (buffers,), works = post_receives(source, announce, device)
                _wait(WorkWaiter(works, TIMEOUT_S))
                slots = kv.slots(page_ids, 0, n)
                for layer, routes in enumerate(buffers):
                    kv.write(layer, slots, joined(routes))
                _sync(device)
            real_s = time.perf_counter() - started
            barrier(comm)
            started = time.perf_counter()
            if rank == 1:
                dist.send(flat, 2)
            elif rank == 2:
                dist.recv(flat, 1)
                _sync(device)
            raw_s = time.perf_counter() - started
            times = comm.allgather((real_s, raw_s))
            if trial:
                real.append(max(t[0] for t in times[1:]))
                raw.append(max(t[1] for t in times[1:]))
        nbytes = n * config.kv_bytes_per_token
        real_s, raw_s = statistics.median(real), statistics.median(raw)
        rows.append({"tokens": n, "bytes": nbytes, "real_s": real_s, "raw_s": raw_s,
                     "real_gb_per_s": nbytes / real_s / 1e9, "raw_gb_per_s": nbytes / raw_s / 1e9,
                     "ratio": raw_s / real_s, "real_trials_s": real, "raw_trials_s": raw})
    control.flush()
    return rows


# ---- part 2: overlap ----------------------------------------------------------------------------
def engine_rank(comm, model: str) -> None:
    from ..cluster.engine_worker import EngineWorker, WorkerOptions
    from ..engine.engine import Engine
    from ..engine.engine_config import EngineConfig
    engine = Engine(EngineConfig(model=model, page_size=PAGE_SIZE))
    role = "prefill" if comm.Get_rank() == 1 else "decode"
    worker = EngineWorker(comm, engine, role, WorkerOptions(transfer_timeout_s=TIMEOUT_S))
    worker.run()
    worker.report_final()


async def drive(comm, prompt_len: int, repeats: int, vocab: int) -> dict:
    from ..cluster.backoff import Backoff
    from ..cluster.control import ControlChannel
    from ..cluster.messages import Request, Shutdown
    from ..engine.sampling_params import SamplingParams
    from ..router.cluster import Cluster
    from ..router.dispatcher import Dispatcher
    control = ControlChannel(comm)
    dispatcher = Dispatcher(control, [1, 2])
    cluster = Cluster(dispatcher, {1: "prefill", 2: "decode"}, PAGE_SIZE)
    sender, receiver = cluster.engines
    stop = asyncio.Event()
    # poll every 0.5 ms at most (not the job's 20 ms) so replies are timed to within 0.5 ms
    pump = asyncio.create_task(dispatcher.pump(stop, Backoff(cap=0.0005)))
    rng = random.Random(7)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    count = 0

    def prompt(n):
        nonlocal count
        count += 1
        return Request(f"p{count}", [rng.randrange(5, vocab) for _ in range(n)], params)

    async def generate(engine, request) -> float:
        started = time.perf_counter()
        async for _ in engine.start_generate(request):
            pass
        return time.perf_counter() - started

    async def send(request) -> float:
        kv = await receiver.prep_recv(request, end=None)
        started = time.perf_counter()
        done = await sender.remote_send(request, kv, begin=kv.matched, end=None)
        elapsed = time.perf_counter() - started
        if not done.ok or kv.matched:
            raise RuntimeError(f"transfer of {request.id} failed or was cached: {done}")
        await dispatcher.call(receiver.rank, "release", request)
        return elapsed

    try:
        while not cluster.engines_ready():
            cluster.check_engines()
            await asyncio.sleep(0.05)
        warm = prompt(min(prompt_len, 64 + 1))
        await generate(sender, warm)
        await send(warm)
        await send(prompt(min(prompt_len, 64 + 1)))
        prefill, transfer, streamed = [], [], []
        for _ in range(repeats):
            cached = prompt(prompt_len)
            prefill.append(await generate(sender, cached))
            transfer.append(await send(cached))               # cached: one token computed
            streamed.append(await send(prompt(prompt_len)))   # prefill + streamed transfer
    finally:
        control.broadcast([1, 2], Shutdown())
        stop.set()
        await pump
        await dispatcher.collect_final_stats()
        control.flush()
    t_prefill, t_transfer = statistics.median(prefill), statistics.median(transfer)
    t_streamed = statistics.median(streamed)
    return {"prompt_tokens": prompt_len, "t_prefill_s": t_prefill, "t_transfer_s": t_transfer,
            "t_streamed_s": t_streamed, "t_sequential_s": t_prefill + t_transfer,
            "hidden_share": 1 - (t_streamed - t_prefill) / t_transfer,
            "prefill_trials_s": prefill, "transfer_trials_s": transfer,
            "streamed_trials_s": streamed}


# ---- reports ------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    o = result["overlap"]
    lines = ["# KV path", "", f"Command: `{result['command']}`", "",
             f"Model: {result['model']}; {result['backend']} on {result['machine']}; "
             f"page size {PAGE_SIZE}; medians of {result['repeats']} transfers.", "",
             "## Bandwidth: real KV path vs raw send/recv of the same bytes", "",
             "| tokens | MiB | real path (ms) | raw (ms) | real GB/s | raw GB/s | real / raw |",
             "|---|---|---|---|---|---|---|"]
    for r in result["bandwidth"]:
        lines.append(f"| {r['tokens']} | {r['bytes'] / 2**20:.1f} | {r['real_s'] * 1e3:.2f} | "
                     f"{r['raw_s'] * 1e3:.2f} | {r['real_gb_per_s']:.2f} | "
                     f"{r['raw_gb_per_s']:.2f} | {r['ratio']:.0%} |")
    lines += ["", f"Target: real / raw >= 80%. Smallest ratio: {result['min_ratio']:.0%}.", "",
              "## Transfer hidden under the sender's prefill (layer-wise streaming)", "",
              "| prompt tokens | prefill alone (s) | transfer alone (s) | prefill then send (s) "
              "| streamed remote_send (s) | hidden share |", "|---|---|---|---|---|---|",
              f"| {o['prompt_tokens']} | {o['t_prefill_s']:.3f} | {o['t_transfer_s']:.3f} | "
              f"{o['t_sequential_s']:.3f} | {o['t_streamed_s']:.3f} | {o['hidden_share']:.0%} |",
              "", "hidden share = 1 - (streamed - prefill alone) / transfer alone.", ""]
    return "\n".join(lines)


def worker(args, argv: list[str]) -> int:
    import torch
    from mpi4py import MPI

    from ..cluster.bringup import init_data_plane
    from ..engine.engine import pick_device
    from ..model.model_config import ModelConfig
    from ..model.tokenizer import Tokenizer
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 3:
        raise SystemExit("kv_path runs on 3 ranks (mpiexec -n 3)")
    torch.set_num_threads(1)
    settings = dict(QUICK if args.quick else FULL)
    if args.sizes:
        settings["sizes"] = [int(x) for x in args.sizes.split(",") if x.strip()]
    if args.repeats:
        settings["repeats"] = args.repeats
    if args.prompt_tokens:
        settings["prompt"] = args.prompt_tokens
    model = model_dir(args) if comm.Get_rank() == 0 else None
    model = comm.bcast(model, root=0)
    backend = init_data_plane(comm, timeout_s=TIMEOUT_S)
    config = ModelConfig.from_dir(model)
    device = pick_device("auto")
    rows = bandwidth(comm, config, settings["sizes"], settings["repeats"], device)
    comm.Barrier()
    if comm.Get_rank() != 0:
        engine_rank(comm, model)
        comm.Barrier()
        _close()
        return 0
    vocab = min(config.vocab_size, Tokenizer.from_dir(model).vocab_size)
    overlap = asyncio.run(drive(comm, settings["prompt"], settings["overlap_repeats"], vocab))
    comm.Barrier()
    _close()
    from ..engine.engine_config import EngineConfig
    from .bench_model import BENCH
    from .bench_model import QUICK as QUICK_SHAPE
    shape = QUICK_SHAPE if args.quick else BENCH
    result = {"command": "python -m mpiserve.bench.kv_path" + (" " + shlex.join(argv) if argv
                                                                else ""),
              "quick": bool(args.quick),
              "model": Path(args.model).name if args.model else shape.describe(),
              "backend": backend, "device": str(device), "machine": platform.machine(),
              "repeats": settings["repeats"], "kv_bytes_per_token": config.kv_bytes_per_token,
              "engine_max_batch_tokens": EngineConfig().max_batch_tokens,
              "bandwidth": rows, "min_ratio": min(r["ratio"] for r in rows),
              "overlap": overlap}
    write_report(args.out, "kv_path", result, markdown(result))
    print(markdown(result))
    return 0


def _close() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m mpiserve.bench.kv_path",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes")
    parser.add_argument("--model", help="checkpoint directory (default: the benchmark model)")
    parser.add_argument("--out", default="results", help="output directory (default results)")
    parser.add_argument("--sizes", help="comma list of token counts for the bandwidth part "
                        f"(default {','.join(map(str, FULL['sizes']))})")
    parser.add_argument("--repeats", type=int, help="transfers per size "
                        f"(default {FULL['repeats']})")
    parser.add_argument("--prompt-tokens", type=int, help="prompt length of the overlap part "
                        f"(default {FULL['prompt']})")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args, [a for a in argv if a != "--worker"])
    model_dir(args)                          # build the model once, before the ranks start
    return launch(argv)


if __name__ == "__main__":
    sys.exit(main())
