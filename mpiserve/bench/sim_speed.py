"""How fast the simulator runs (issue 11's target: 10,000 requests over 64 engines in under
60 s on one core). Serves the `chat` workload on 32 prefill + 32 decode simulated engines with
the analytic roofline of a Llama-3.1-8B-shaped model on H100, under round_robin and pd, and
writes `results/sim_speed.json` with the wall and CPU seconds of each run.

    python -m mpiserve.bench.sim_speed [--requests 10000] [--rate 200] [--out results]

The simulation is single-threaded: its CPU seconds are the one-core figure, its wall seconds
that figure plus whatever else the machine ran meanwhile.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from ..model.model_config import ModelConfig
from ..sim.fresh_router import fresh_router
from ..sim.hardware import H100
from ..sim.roofline_cost import RooflineCost
from ..sim.sim_engine import SimEngineConfig
from ..sim.simulation import SimLayout, simulate
from ..sim.workload_input import workload_requests
from .metrics import summarize
from .report_files import write_report
from .workloads import WORKLOADS

# config.json of meta-llama/Llama-3.1-8B-Instruct (the fields the cost model reads)
LLAMA_31_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "max_position_embeddings": 131072,
               "torch_dtype": "bfloat16"}
ROUTERS = ("round_robin", "pd")
LAYOUT = SimLayout(prefill=32, decode=32)


def run(num_requests: int, rate: float, seed: int) -> list[dict]:
    cost = RooflineCost(ModelConfig.from_dict(LLAMA_31_8B), H100, "bf16")
    config = SimEngineConfig(num_pages=cost.num_pages(16), vocab_size=LLAMA_31_8B["vocab_size"],
                             max_model_len=LLAMA_31_8B["max_position_embeddings"])
    requests = workload_requests(WORKLOADS["chat"], rate, num_requests, seed, config.vocab_size)
    arrivals = {r.custom_id: r.arrival_s for r in requests}
    rows = []
    for router in ROUTERS:
        wall, cpu = time.perf_counter(), time.process_time()
        result = simulate(requests, fresh_router(router), router, LAYOUT, cost, config)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        summary = summarize(result.records, arrivals)
        tokens = sum(r["response"]["body"]["usage"]["completion_tokens"]
                     for r in result.records if r.get("error") is None)
        rows.append({"router": router, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                     "requests_per_s": round(num_requests / wall, 1),
                     "tokens_generated": tokens,
                     "completed": summary["completed"], "virtual_s": round(result.virtual_s, 2),
                     "mean_jct": summary["mean_jct"], "failure": result.failure})
        print(f"sim_speed: {router}: {num_requests} requests in {wall:.1f} s wall "
              f"({cpu:.1f} s CPU), {num_requests / wall:.0f} requests/s; "
              f"{summary['completed']} completed over {result.virtual_s:.1f} simulated s",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpiserve.bench.sim_speed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s (default 200)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    rows = run(args.requests, args.rate, args.seed)
    command = "python -m mpiserve.bench.sim_speed" + (" " + " ".join(argv) if argv else "")
    data = {"command": command, "workload": "chat", "rate": args.rate,
            "num_requests": args.requests, "layout": "32 prefill + 32 decode engines, TP 1",
            "cost_model": "roofline: Llama-3.1-8B shape, bf16, H100", "target_s": 60,
            "cpus": os.cpu_count(), "python_version": platform.python_version(),
            "machine": f"{platform.machine()} {platform.system()}", "rows": rows}
    path = write_report(args.out, "sim_speed", data)
    print(f"sim_speed: wrote {path}", file=sys.stderr)
    return 0 if all(r["completed"] == args.requests for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
