"""The dashboard: the collector's figures and the views on hand-made stats (pure), the observer's
modes and run report without MPI, then real jobs: progress lines and the run report of a plain
run, and the live view on a real terminal (tmux)."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console
from rich.file_proxy import FileProxy

from mpiserve.bench.processes import descendants
from mpiserve.dashboard import observer as observer_module
from mpiserve.dashboard.observer import JobObserver, resolve_mode
from mpiserve.dashboard.report import PLOTS_MISSING
from mpiserve.dashboard.snapshot import Collector, percentile
from mpiserve.dashboard.terminal import find_terminal, terminal_size
from mpiserve.dashboard.view import plain_line, render, sparkline
from mpiserve.engine.step_timings import samples_of
from mpiserve.router.batch_runner import BatchTally

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
MPISERVE = BIN / "mpiserve"
DEMO_REQUESTS = Path(__file__).resolve().parents[1] / "launchers" / "demo" / "requests.jsonl"
TIMEOUT_S = 180
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("latency_cdf.png", "throughput.png", "utilization.png")
INFO = {"router": "pd", "model": "tiny", "engines": {1: "prefill", 2: "decode", 3: "decode"}}


# ---- hand-made job state -----------------------------------------------------------------------
def engine_stats(role: str, at: float, **figures) -> dict:
    stats = {"role": role, "host": "node-a", "busy_s": 0.0, "running": 0, "waiting": 0,
             "pages_used": 0, "pages_total": 64, "prefix_hit_tokens": 0,
             "prefix_query_tokens": 0, "prefill_tokens": 0, "decode_tokens": 0,
             "preemptions": 0, "kv_bytes_sent": 0, "kv_bytes_received": 0,
             "transfers_failed": 0, "fallbacks": 0, "requests_done": 0, "time": at}
    return {**stats, **figures}


def first_stats() -> dict:
    return {1: engine_stats("prefill", 100.0, prefill_tokens=100, busy_s=1.0),
            2: engine_stats("decode", 100.0, decode_tokens=50, busy_s=2.0)}


def second_stats() -> dict:
    """Two seconds later by the engines' clocks."""
    return {1: engine_stats("prefill", 102.0, prefill_tokens=500, busy_s=2.0, running=2,
                            waiting=3, pages_used=10, prefix_hit_tokens=10,
                            prefix_query_tokens=40, kv_bytes_sent=2_000_000),
            2: engine_stats("decode", 102.0, decode_tokens=450, busy_s=3.5, running=4,
                            kv_bytes_received=2_000_000, fallbacks=1, transfers_failed=1)}


def tally_at(generated: int) -> BatchTally:
    tally = BatchTally(total=200, seen=75, skipped=20, completed=30, failed=10,
                       generated_tokens=generated, started=0.0)
    tally.latencies = [{"ttft": float(i), "tpot": i / 100, "jct": 2.0 * i, "kv_bytes": 1}
                       for i in range(1, 101)]
    tally.errors = [f"error {i}" for i in range(7)]
    return tally


@pytest.fixture
def snapshots():
    """Two snapshots from a collector: at t=10 s (100 tokens) and at t=12 s (500 tokens)."""
    collector = Collector(INFO)
    strategies = Counter({"pd": 3, "data_parallel": 5})
    first = collector.collect(first_stats(), tally_at(100), strategies, 0, now=10.0)
    second = collector.collect(second_stats(), tally_at(500), strategies, 1, now=12.0)
    return collector, first, second


# ---- the collector -------------------------------------------------------------------------------
def test_engine_rates_come_from_the_engines_clock(snapshots):
    _, first, snap = snapshots
    one, two, three = snap.engines
    assert (one.prefill_tps, one.decode_tps, one.busy_fraction) == (200.0, 0.0, 0.5)
    assert (two.prefill_tps, two.decode_tps, two.busy_fraction) == (0.0, 200.0, 0.75)
    assert first.engines[0].prefill_tps == 0.0           # one report is no rate yet
    assert (one.running, one.waiting, one.pages_used, one.pages_free) == (2, 3, 10, 54)
    assert one.prefix_hit_rate == 0.25 and first.engines[0].prefix_hit_rate is None
    assert (one.kv_mb_sent, two.kv_mb_received) == (2.0, 2.0)
    assert (two.fallbacks, two.transfer_failures) == (1, 1)
    assert (three.rank, three.role, three.host) == (3, "decode", "")   # not heard from yet


def test_a_tensor_parallel_engine_shows_its_size_in_the_role():
    collector = Collector(INFO)
    stats = {1: engine_stats("prefill", 100.0, tp=2), 2: engine_stats("decode", 100.0, tp=1)}
    snap = collector.collect(stats, tally_at(0), Counter(), 0, now=1.0)
    assert [e.role for e in snap.engines] == ["prefill TP2", "decode", "decode"]


def test_rates_hold_until_an_engine_reports_again(snapshots):
    collector, _, snap = snapshots
    again = collector.collect(second_stats(), tally_at(500), {}, 1, now=13.0)
    assert again.engines[:2] == snap.engines[:2]
    assert again.throughput[-1] == 0.0                   # no tokens in the last second


def test_job_figures(snapshots):
    _, first, snap = snapshots
    assert snap.throughput == (10.0, 200.0)              # 100 tokens in 10 s, 400 in 2 s
    assert (snap.elapsed, snap.done, snap.failed, snap.skipped) == (12.0, 40, 10, 20)
    assert (snap.completed, snap.in_flight) == (30, 15)
    assert snap.fraction == 0.3
    assert snap.eta_s == pytest.approx(42.0)             # 140 left at 40 per 12 s
    assert snap.tokens_per_s == pytest.approx(500 / 12)
    assert snap.strategies == (("data_parallel", 5), ("pd", 3))
    assert snap.errors == tuple(f"error {i}" for i in range(2, 7))
    assert (snap.kv_mb_moved, snap.fallbacks, snap.transfer_failures) == (2.0, 1, 1)
    assert (snap.router, snap.model, snap.interrupted) == ("pd", "tiny", False)


def test_percentiles_match_numpy(snapshots):
    _, _, snap = snapshots
    values = np.arange(1, 101, dtype=float)
    for q, got in ((50, snap.ttft.p50), (90, snap.ttft.p90), (99, snap.ttft.p99)):
        assert got == pytest.approx(np.percentile(values, q))
    assert (snap.ttft.p50, snap.ttft.p90, snap.ttft.p99) == pytest.approx((50.5, 90.1, 99.01))
    assert snap.jct.p90 == pytest.approx(2 * 90.1) and snap.tpot.mean == pytest.approx(0.505)
    assert snap.ttft.count == 100
    assert percentile([], 50) is None and percentile([3.0], 99) == 3.0


def test_history_keeps_the_last_points_and_the_timeline_all():
    collector = Collector(INFO, history=3)
    tally = BatchTally(total=10, started=0.0)
    for second in range(1, 6):
        tally.generated_tokens = 10 * second * second
        snap = collector.collect({}, tally, {}, 0, now=float(second))
    assert snap.throughput == (50.0, 70.0, 90.0)
    assert [p.tokens_per_s for p in collector.timeline] == [10.0, 30.0, 50.0, 70.0, 90.0]
    assert snap.eta_s is None                            # nothing done yet


# ---- the views -----------------------------------------------------------------------------------
def screen(renderable, width: int) -> list[str]:
    console = Console(file=io.StringIO(), width=width, height=60, record=True,
                      color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


def test_render_shows_every_region(snapshots):
    _, _, snap = snapshots
    lines = screen(render(snap), width=160)
    text = "\n".join(lines)
    row = {rank: next(line for line in lines if re.match(rf"│ │\s+{rank} ", line))
           for rank in (1, 2, 3)}
    assert re.search(r"node-a\s+prefill\s+2/3\s+10/54\s+25%\s+200\s+0\s+2\.0/0\.0\s+50%\s+0 ",
                     row[1])
    assert re.search(r"node-a\s+decode\s+4/0\s+0/64\s+–\s+0\s+200\s+0\.0/2\.0\s+75%\s+1 ", row[2])
    assert re.search(r"\(starting\)\s+decode\s+0/0", row[3])
    assert "━" in text and "60/200  30%  ETA 0:00:42  elapsed 0:00:12" in text
    assert "in flight 15 · failed 10 · skipped 20 · 42 tok/s · KV moved 2.0 MB" in text
    assert re.search(r"TTFT\s+50\.5 s\s+90\.1 s\s+99\.0 s", text)
    assert re.search(r"TPOT\s+505 ms\s+901 ms\s+990 ms", text)
    assert "▁█" in text and "now 200 · peak 200" in text
    assert "data_parallel 5 (62%)" in text and "pd 3 (38%)" in text
    assert "error 2" in text and "error 6" in text and "error 1" not in text
    assert lines[0].startswith("╭─ mpiserve · model tiny · router pd")
    assert lines[-1].startswith("╰") and len(lines) == 2 + 2 + (3 + 5) + 7 + (5 + 2)  # none cut


@pytest.mark.parametrize("width", [80, 100])
def test_render_fits_a_narrow_terminal(snapshots, width):
    _, _, snap = snapshots
    lines = screen(render(snap), width=width)
    assert all(len(line) <= width for line in lines)
    for rank, role in ((1, "prefill"), (2, "decode"), (3, "decode")):   # columns are not cut
        assert any(re.match(rf"│ │\s+{rank} .*{role}\s+\d+/\d+\s+\d+/\d+\s+(\d+%|–)\s+\d+\s+\d+"
                            rf"\s+\d\.\d/\d\.\d .*\d( s)?\s*│ │$", line) for line in lines), lines
    assert any("fall-" in line for line in lines)
    assert ("node-a" in "\n".join(lines)) == (width == 100)   # the host gives way below ~90


def test_sparkline_keeps_the_newest_points_in_a_narrow_panel():
    collector = Collector(INFO)
    tally = BatchTally(total=10, started=0.0)
    for second in range(1, 61):                # a rate rising every second: 1, 2, ... 60
        tally.generated_tokens += second
        snap = collector.collect({}, tally, {}, 0, now=float(second))
    line = next(line for line in screen(render(snap), width=80) if "▁" in line or "█" in line)
    blocks = re.search(r"[▁▂▃▄▅▆▇█]+", line).group()
    assert 10 < len(blocks) < 60 and blocks.endswith("██") and "▁" not in blocks  # newest


def test_render_an_empty_job():
    snap = Collector(INFO).collect({}, BatchTally(started=0.0), {}, 0, now=0.0)
    text = "\n".join(screen(render(snap), width=120))
    assert text.count("(starting)") == 3 and "0/0  0%  ETA –" in text
    assert "latency (0 done)" in text and "none" in text


def test_plain_line(snapshots):
    _, _, snap = snapshots
    assert plain_line(snap) == ("[0:00:12] 60/200 30% ETA 0:00:42 · 42 tok/s · run/wait "
                                "1:2/3 2:4/0 3:0/0 · KV 2.0 MB · fallbacks 1 · errors 10")


def test_a_silent_engine_shows_as_stalled_before_the_heartbeat_fails(snapshots):
    """Seconds since rank 0 last heard from each engine: shown in the live table (red once
    stalled) and named in the plain line, while the heartbeat timeout has not fired yet."""
    collector, _, _ = snapshots
    snap = collector.collect(second_stats(), tally_at(500), {}, 1, now=13.0,
                             silent_s={1: 0.4, 2: 7.2, 3: 0.1})
    assert [e.stalled for e in snap.engines] == [False, True, False]
    assert plain_line(snap).endswith("errors 10 · rank 2 silent 7 s")
    lines = screen(render(snap), width=160)
    row = next(line for line in lines if re.match(r"│ │\s+2 ", line))
    assert re.search(r"\s7 s\s+│ │$", row), row


def test_sparkline_scales_to_the_peak():
    assert sparkline([0, 1, 2, 4, 8]) == "▁▂▃▅█"
    assert sparkline([0, 0]) == "▁▁" and sparkline([]) == ""
    assert sparkline([8, 0, 4, 2], width=2) == "█▅"          # the newest, scaled to their peak


# ---- the observer without MPI --------------------------------------------------------------------
def fake_job(stats: dict):
    dispatcher = SimpleNamespace(stats=stats, silent_s=lambda: {rank: 0.5 for rank in stats})
    cluster = SimpleNamespace(strategies=Counter({"pd": 4}), failed_transfers=["r-1: timeout"])
    return dispatcher, cluster


def observe(mode: str, tmp_path: Path, seconds: float = 0.3, cancel: bool = False, **options):
    """Run an observer on a fake job for `seconds`, then stop it (or cancel its task)."""
    tally = tally_at(500)
    tally.started = time.monotonic() - 12
    dispatcher, cluster = fake_job(second_stats())
    stream = io.StringIO()
    watcher = JobObserver(mode, INFO, dispatcher, cluster, tally, tmp_path / "run",
                          tick_s=0.02, stream=stream, **options)

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop))
        await asyncio.sleep(seconds)
        if cancel:
            task.cancel()
        stop.set()
        await asyncio.wait([task], timeout=5)
        assert task.done()

    asyncio.run(main())
    return watcher, stream


SHOW_CURSOR, HIDE_CURSOR = "\x1b[?25h", "\x1b[?25l"


@pytest.mark.parametrize("cancel", [False, True], ids=["stopped", "cancelled"])
def test_live_mode_draws_and_always_ends_the_live(tmp_path, cancel):
    watcher, stream = observe("live", tmp_path, cancel=cancel)
    shown = stream.getvalue()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)
    assert watcher.mode == "live" and "╭─ mpiserve · model tiny · router pd" in text
    assert text.count("60/200  30%") >= 2                  # refreshed, not drawn once
    assert shown.rindex(SHOW_CURSOR) > shown.rindex(HIDE_CURSOR)
    assert not isinstance(sys.stdout, FileProxy) and not isinstance(sys.stderr, FileProxy)


def test_modes_resolve():
    assert resolve_mode("auto", "/dev/pts/3") == "live"
    assert resolve_mode("auto", None) == "plain"
    assert resolve_mode("off", "/dev/pts/3") == "off"
    with pytest.raises(ValueError):
        resolve_mode("fancy", None)


def test_a_terminal_is_found_directly_and_not_behind_a_foreign_pipe(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
    read_end, write_end = os.pipe()
    try:
        with open(follower, "w", closefd=False) as tty, open(write_end, "w", closefd=False) as pipe:
            assert find_terminal(tty) == os.ttyname(follower)
            assert terminal_size(find_terminal(tty)) == (132, 50)
            assert find_terminal(pipe) is None           # read by pytest, not by a launcher
            monkeypatch.setenv("TERM", "dumb")
            assert find_terminal(tty) is None
    finally:
        for fd in (leader, follower, read_end, write_end):
            os.close(fd)
    assert find_terminal(io.StringIO()) is None and terminal_size("/nonexistent") is None


def test_plain_mode_prints_lines_and_finish_writes_the_report(tmp_path):
    watcher, stream = observe("plain", tmp_path, plain_every_s=0.1)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("[0:00:1") for line in lines)
    summary = watcher.finish()
    assert "mpiserve run summary" in stream.getvalue()
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["totals"]["completed"] == 30 and saved["totals"]["kv_bytes_moved"] == 2_000_000
    assert saved["totals"]["transfer_failures"] == 1 and saved["totals"]["fallbacks"] == 1
    assert saved["engines"]["1"]["prefix_hit_rate"] == 0.25
    assert saved["latency"]["ttft"]["p90"] == pytest.approx(90.1)
    assert saved["strategies"] == {"pd": 4} and saved["failed_transfers"] == ["r-1: timeout"]
    for name in PLOTS:
        assert (tmp_path / "run" / name).read_bytes().startswith(PNG_SIGNATURE)
    rows = (tmp_path / "run" / "timeline.csv").read_text().splitlines()
    assert rows[0] == "elapsed_s,tokens_per_s,busy_rank1,busy_rank2,busy_rank3"
    assert len(rows) - 1 == len(watcher.collector.timeline) >= 2


def test_plain_mode_writes_no_escapes_even_on_a_terminal(tmp_path, monkeypatch):
    # Open MPI hands every rank a pseudo-terminal, even when mpirun writes to a log file
    monkeypatch.setenv("TERM", "xterm-256color")
    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as tty:
            watcher = JobObserver("plain", INFO, *fake_job(second_stats()), tally_at(500),
                                  tmp_path / "run", stream=tty)
            watcher.finish()
        shown = os.read(leader, 1 << 16).decode()
    finally:
        os.close(leader)
        os.close(follower)
    assert "mpiserve run summary" in shown and "\x1b" not in shown


def test_a_launchers_terminal_is_followed_to_where_the_launcher_writes(tmp_path):
    """A rank on a pty whose parent is a launcher (as under Open MPI's mpirun) has the terminal
    of the launcher's own stdout: none when that is a file."""
    launcher = tmp_path / "mpirun"                 # /proc/PID/comm is "mpirun"
    launcher.symlink_to(sys.executable)
    child = ("import sys; from mpiserve.dashboard.terminal import find_terminal; "
             "print(find_terminal(sys.stdout), file=sys.stderr)")
    parent = ("import os, subprocess, sys; leader, follower = os.openpty(); "
              f"sys.exit(subprocess.run([sys.executable, '-c', {child!r}], stdout=follower, "
              "stderr=subprocess.PIPE, text=True).stderr.strip() != 'None')")
    with open(tmp_path / "log", "w") as log:
        done = subprocess.run([str(launcher), "-c", parent], stdout=log,
                              env={**os.environ, "TERM": "xterm"}, timeout=60)
    assert done.returncode == 0


def test_off_mode_prints_nothing_but_still_reports(tmp_path):
    watcher, stream = observe("off", tmp_path)
    watcher.finish()
    assert stream.getvalue() == ""
    assert len(watcher.collector.timeline) >= 2
    assert (tmp_path / "run" / "summary.json").exists()


def test_live_view_that_fails_falls_back_to_lines(tmp_path, monkeypatch, capsys):
    def broken(snap):
        raise RuntimeError("odd terminal")
    monkeypatch.setattr(observer_module, "render", broken)
    watcher, stream = observe("live", tmp_path)
    assert watcher.mode == "plain"
    assert "live view unavailable" in capsys.readouterr().err
    assert re.search(r"\[0:00:1\d\] 60/200 30%", stream.getvalue())


def test_report_without_matplotlib_says_so(tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    watcher, _ = observe("off", tmp_path, seconds=0.05)
    summary = watcher.finish()
    assert summary["plots"] == [] and summary["plots_note"] == PLOTS_MISSING
    assert not list((tmp_path / "run").glob("*.png"))


# ---- real jobs -----------------------------------------------------------------------------------
def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_job(cwd: Path, *args) -> subprocess.CompletedProcess:
    command = [str(MPIEXEC), "-n", "3", str(MPISERVE), "run", *map(str, args)]
    proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill([proc.pid, *descendants(proc.pid)])
        out, err = proc.communicate()
        pytest.fail(f"{command} did not finish in {TIMEOUT_S} s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def check_run_dir(run_dir: Path, records: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["totals"]["completed"] == records, summary["totals"]
    assert sorted(summary["engines"]) == ["1", "2"]
    assert [summary["engines"][r]["role"] for r in ("1", "2")] == ["prefill", "decode"]
    assert all(summary["engines"][r]["final"] for r in ("1", "2"))
    assert summary["totals"]["kv_bytes_moved"] > 0
    assert summary["totals"]["generated_tokens"] > 0 and summary["latency"]["jct"]["p50"] > 0
    assert summary["plots"] == list(PLOTS)
    for name in PLOTS:
        data = (run_dir / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), name
    check_step_timings(run_dir, summary)
    return summary


def check_step_timings(run_dir: Path, summary: dict) -> None:
    """steps.json holds every step each engine ran (a short job is under the sample's
    capacity): its tokens add up to the engine's counters, its seconds to its busy time."""
    assert summary["steps"] == "steps.json"
    engines = json.loads((run_dir / "steps.json").read_text())["engines"]
    for rank, figures in summary["engines"].items():
        assert "step_timings" not in figures
        steps = samples_of(engines[rank])
        assert len(steps) == engines[rank]["seen"] > 0
        assert sum(s["prefill_tokens"] for s in steps) == figures["prefill_tokens"]
        assert sum(s["decode_seqs"] for s in steps) == figures["decode_tokens"]
        assert 0 < sum(s["seconds"] for s in steps) <= figures["busy_s"] + 1e-6


@pytest.mark.mpi
def test_plain_run_prints_progress_lines_and_writes_the_run_report(tmp_path, demo_dir):
    records = len(DEMO_REQUESTS.read_text().splitlines())
    result = run_job(tmp_path, "--input", DEMO_REQUESTS, "--output", "out.jsonl",
                     "--router", "pd", "--dashboard", "plain")
    said = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-4000:]}"
    assert result.returncode == 0, said
    lines = re.findall(rf"^\[\d+:\d\d:\d\d\] (\d+)/{records} .* tok/s · run/wait 1:\d+/\d+ "
                       rf"2:\d+/\d+ · KV [\d.]+ MB · fallbacks 0 · errors 0$",
                       result.stdout, re.MULTILINE)
    assert len(lines) >= 2 and lines[-1] == str(records), said
    assert "mpiserve run summary" in result.stdout and "run report: out.run" in result.stdout
    assert "random demo weights: text is meaningless" in result.stdout, said
    assert f"done: {records} completed, 0 errors" in result.stderr, said
    summary = check_run_dir(tmp_path / "out.run", records)
    assert summary["config"]["router"] == "pd" and summary["strategies"] == {"pd": records}


def slow_batch(path: Path, count: int = 8, max_tokens: int = 384) -> int:
    lines = [{"custom_id": f"slow-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": f"Tell the long story number {i} about rivers and bread.",
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
             for i in range(count)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return count


def live_screen(records: int):
    """Does the screen show every engine's row, with its host (so it has reported), and the
    progress bar with at least one record done?"""
    def complete(text: str) -> bool:
        host = r"(?!\(starting\))\S+"
        rows = (re.search(rf"│\s+1 {host}\s+prefill\s", text),
                re.search(rf"│\s+2 {host}\s+decode\s", text))
        bar = re.search(rf"━+\S*\s+[1-9]\d*/{records}\s+\d+%\s+ETA", text)
        return all(rows) and bar is not None
    return complete


@pytest.mark.mpi
def test_live_view_on_a_real_terminal(tmp_path, demo_dir):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux): the live view needs a "
                    "real terminal to be checked")
    records = slow_batch(tmp_path / "slow.jsonl")
    exit_file = tmp_path / "exit.txt"
    job = " ".join(shlex.quote(str(a)) for a in (
        "env", "-u", "COLUMNS", "-u", "LINES", "OMP_NUM_THREADS=1",
        f"MPISERVE_CACHE={os.environ['MPISERVE_CACHE']}", MPIEXEC, "-n", "3", MPISERVE, "run",
        "--input", "slow.jsonl", "--output", "slow.out.jsonl", "--router", "pd",
        "--max-inflight", "1", "--run-dir", "report"))
    shell = f"cd {shlex.quote(str(tmp_path))} && {job}; echo $? > exit.txt; sleep {TIMEOUT_S}"
    tmux = ["tmux", "-L", f"mpiserve-test-{os.getpid()}"]
    subprocess.run([*tmux, "new-session", "-d", "-x", "200", "-y", "50", shell], check=True,
                   timeout=30)
    pane = subprocess.run([*tmux, "display-message", "-p", "#{pane_pid}"], capture_output=True,
                          text=True, timeout=30).stdout.strip()
    try:
        running, had_ended = wait_for_screen(tmux, exit_file, live_screen(records))
        (tmp_path / "live_screen.txt").write_text(running)
        assert not had_ended, f"the live view was seen only after the job ended:\n{running}"
        final, _ = wait_for_screen(tmux, exit_file, lambda _: exit_file.exists())
        print(f"live view while the job ran:\n{running}\nfinal screen:\n{final}")
    finally:
        _kill(descendants(int(pane)) if pane.isdigit() else [])
        subprocess.run([*tmux, "kill-server"], timeout=30, capture_output=True)
    assert exit_file.read_text().strip() == "0", final
    assert f"{records}/{records}  100%" in final and live_screen(records)(final), final
    assert "mpiserve run summary" in final
    check_run_dir(tmp_path / "report", records)


def wait_for_screen(tmux: list[str], ended: Path, done, timeout: float = TIMEOUT_S):
    """Poll the pane until `done(screen)`; returns the screen and whether the job had ended
    before it was captured. Fails the test with the last screen after the timeout."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        had_ended = ended.exists()
        text = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True,
                              timeout=30).stdout
        if done(text):
            return text, had_ended
        if had_ended:
            break
        time.sleep(0.25)
    pytest.fail(f"the screen never showed what was expected within {timeout:.0f} s:\n{text}")
