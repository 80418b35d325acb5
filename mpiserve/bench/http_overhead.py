"""TTFT overhead of the HTTP path (`mpiserve serve`) against the batch path (`mpiserve run`).

    python -m mpiserve.bench.http_overhead [--requests 40] [--quick] [--out results]

The same requests (short completions, greedy, streamed online) go one at a time through a
3-rank job with the same router (round_robin) both ways. Batch TTFT is what the output records
say, less the time the request waited for the one before it (from when the router took it at
rank 0 to its first token there); online TTFT is what the
client sees, from sending the HTTP request to the first streamed chunk, so it also counts the
HTTP parsing, tokenization, the server-sent event and loopback. Writes `http_overhead.json`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .processes import kill_tree
from .report_files import write_report

TOPICS = ["rivers", "bread", "glaciers", "lighthouses", "bees", "trains", "libraries", "mills"]
START_TIMEOUT_S = 180


def requests(count: int, max_tokens: int) -> list[dict]:
    return [{"prompt": f"Write one line about {TOPICS[i % len(TOPICS)]}, number {i}.",
             "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            for i in range(count)]


def job_command(kind: str) -> list[str]:
    from .serving import find_mpiexec, mpiserve_command
    return [find_mpiexec(), "-n", "3", *mpiserve_command(), kind, "--router", "round_robin",
            "--dashboard", "off", "--max-inflight", "1"]


def batch_ttfts(bodies: list[dict], folder: Path) -> list[float]:
    source, output = folder / "in.jsonl", folder / "out.jsonl"
    source.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                          "url": "/v1/completions", "body": body}) + "\n"
                              for i, body in enumerate(bodies)))
    done = subprocess.run([*job_command("run"), "--input", str(source), "--output", str(output)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"the batch job failed:\n{done.stderr[-3000:]}")
    metrics = [json.loads(line)["response"]["body"]["metrics"]
               for line in output.read_text().splitlines()]
    return [m["ttft"] - m["queue_time"] for m in metrics]


def online_ttfts(bodies: list[dict], folder: Path) -> list[float]:
    log = folder / "serve.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([*job_command("serve"), "--port", "0"], stdout=sink,
                                stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    try:
        url = _wait_for_server(proc, log)
        return [_streamed_ttft(url, body) for body in bodies]
    finally:
        kill_tree(proc)


def _wait_for_server(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"serving (http://\S+)/v1", log.read_text(errors="replace"))
        if found and _status(found[1] + "/health") == 200:
            return found[1]
        time.sleep(0.2)
    raise SystemExit(f"the server did not become ready:\n{log.read_text()[-3000:]}")


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status
    except OSError as err:
        return getattr(err, "code", None)


def _streamed_ttft(url: str, body: dict) -> float:
    data = json.dumps({**body, "stream": True}).encode()
    request = urllib.request.Request(url + "/v1/completions", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    sent = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as answer:
        first = None
        for line in answer:
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter() - sent
        return first


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"p50_ms": 1000 * statistics.median(ordered),
            "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))],
            "mean_ms": 1000 * statistics.fmean(ordered)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="4 requests (a smoke test)")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    bodies = requests(4 if args.quick else args.requests, args.max_tokens)
    with tempfile.TemporaryDirectory() as folder:
        batch = batch_ttfts(bodies, Path(folder))
        online = online_ttfts(bodies, Path(folder))
    result = {"requests": len(bodies), "max_tokens": args.max_tokens, "router": "round_robin",
              "batch_ttft": summary(batch), "online_ttft": summary(online)}
    result["p50_overhead_ms"] = result["online_ttft"]["p50_ms"] - result["batch_ttft"]["p50_ms"]
    result["target_ms"] = 10.0
    write_report(args.out, "http_overhead", result)
    print(f"TTFT p50: batch {result['batch_ttft']['p50_ms']:.1f} ms, HTTP "
          f"{result['online_ttft']['p50_ms']:.1f} ms: overhead "
          f"{result['p50_overhead_ms']:.1f} ms (target <= 10 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
