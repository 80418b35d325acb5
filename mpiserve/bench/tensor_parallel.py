"""Tensor parallelism on CPU: decode step time and weight memory per rank of one engine split
over 2 ranks (MPI collectives) against the same engine on 1 rank.

Runs itself under `mpiexec -n 2`. The 1-rank engine runs on rank 0 while rank 1 sleeps; the
2-rank engine runs on both, rank 0 leading. Both decode the same batch of sequences after the
same prefill; the report gives the median step time, the share of the 2-rank step spent in
all-reduce/all-gather (waiting included), each rank's weight bytes, and whether the greedy
tokens of both engines agreed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from .report_files import write_report

FULL = {"sequences": 16, "prompt": 256, "steps": 48}
QUICK = {"sequences": 4, "prompt": 32, "steps": 4}


def launch(argv: list[str]) -> int:
    from .serving import run_workers
    return run_workers("mpiserve.bench.tensor_parallel", 2, argv)


def model_dir(args) -> str:
    from .bench_model import QUICK as QUICK_SHAPE
    from .bench_model import TP_BENCH, bench_model_dir
    if args.model:
        return args.model
    return str(bench_model_dir(QUICK_SHAPE if args.quick else TP_BENCH))


def idle_until(comm) -> None:
    """A barrier that sleeps while it waits (the other rank is being timed)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.001)


def decode_run(engine, plan: dict, vocab: int) -> dict:
    """Prefill `sequences` prompts, then time `steps` decode steps on the lead."""
    import torch

    from ..engine.sampling_params import SamplingParams
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=plan["steps"] + 2, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(i, torch.randint(3, vocab, (plan["prompt"],),
                                                generator=generator).tolist(), params)
            for i in range(plan["sequences"])]
    while any(not s.output for s in seqs):
        engine.step()
    steps, collectives = [], []
    for _ in range(plan["steps"]):
        collective_before, started = engine.model.tp.collective_s, time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - started)
        collectives.append(engine.model.tp.collective_s - collective_before)
    while engine.has_work:
        engine.step()
    return {"step_s": statistics.median(steps), "step_s_all": steps,
            "collective_s": statistics.median(collectives),
            "tokens": [list(s.output) for s in seqs]}


def worker(args) -> int:
    from mpi4py import MPI

    from ..cluster.tensor_group import join_world_group
    from ..cluster.tp_follower import Follower
    from ..engine.engine import Engine
    from ..engine.engine_config import EngineConfig
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    plan = QUICK if args.quick else FULL
    config = EngineConfig(model=model_dir(args), max_num_seqs=plan["sequences"],
                          max_batch_tokens=plan["sequences"] * plan["prompt"])
    tp, plans = join_world_group(2)
    one = None
    if rank == 0:
        engine = Engine(config)
        one = decode_run(engine, plan, engine.model_config.vocab_size)
        one["weight_bytes"] = [engine.model.weight_bytes]
        del engine
    idle_until(comm)
    engine = Engine(config, tp, plans if plans.is_lead else None)
    weight_bytes = comm.gather(engine.model.weight_bytes, root=0)
    if rank != 0:
        Follower(engine, plans).run()
        return 0
    two = decode_run(engine, plan, engine.model_config.vocab_size)
    plans.publish(None)
    plans.flush()
    two["weight_bytes"] = weight_bytes
    report(args, engine, plan, one, two)
    return 0


def report(args, engine, plan: dict, one: dict, two: dict) -> None:
    same = one.pop("tokens") == two.pop("tokens")
    model = Path(engine.model_dir).name                   # no machine path in results
    result = {"model": model, "workload": plan, "tp1": one, "tp2": two,
              "speedup": one["step_s"] / two["step_s"],
              "collective_share": two["collective_s"] / two["step_s"],
              "weight_ratio": max(two["weight_bytes"]) / one["weight_bytes"][0],
              "greedy_tokens_identical": same}
    lines = [f"median decode step, {plan['sequences']} sequences of {plan['prompt']}-token "
             "prompts: "
             f"TP-1 {one['step_s'] * 1e3:.1f} ms, TP-2 {two['step_s'] * 1e3:.1f} ms "
             f"({result['speedup']:.2f}x; all-reduce/all-gather "
             f"{result['collective_share']:.0%} of the TP-2 step)",
             f"weights per rank: TP-1 {one['weight_bytes'][0] / 2**20:.1f} MiB, TP-2 "
             + " / ".join(f"{b / 2**20:.1f}" for b in two["weight_bytes"])
             + f" MiB ({result['weight_ratio']:.2f}x)",
             f"greedy tokens of TP-1 and TP-2 identical: {same}"]
    print("\n".join(lines), flush=True)
    markdown = ("# Tensor parallelism on CPU (MPI collectives)\n\n"
                "`python -m mpiserve.bench.tensor_parallel`\n\n"
                f"Model: {model} (bench_model.TP_BENCH)\n\n"
                + "\n".join(f"- {line}" for line in lines) + "\n")
    write_report(args.out, "tensor_parallel", result, markdown)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m mpiserve.bench.tensor_parallel",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and batch")
    parser.add_argument("--model", help="checkpoint directory (default: the TP benchmark model)")
    parser.add_argument("--out", default="results", help="output directory (default results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    model_dir(args)                          # build the model once, before the ranks start
    return launch(argv)


if __name__ == "__main__":
    sys.exit(main())
