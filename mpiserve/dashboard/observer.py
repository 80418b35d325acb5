"""Rank 0's window on the job: snapshots every tick, shown live (rich), as progress lines, or
not at all, and a summary plus the run report at the end. Showing never stops the job: any
trouble with the terminal turns the live view into progress lines, and the Live always stops."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from .report import write_report
from .snapshot import Collector, JobSnapshot
from .terminal import find_terminal, terminal_size
from .view import plain_line, render, summary_table

MODES = ("auto", "live", "plain", "off")


def resolve_mode(mode: str, terminal: str | None) -> str:
    """auto means live when the output reaches a terminal, else plain."""
    if mode not in MODES:
        raise ValueError(f"dashboard mode {mode!r}: use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    return "live" if terminal else "plain"


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        return False
    return True


class JobObserver:
    def __init__(self, mode: str, info: Mapping, dispatcher, cluster, tally, run_dir: Path,
                 tick_s: float = 0.5, plain_every_s: float = 5.0, stream=None):
        self.stream = stream or sys.stdout
        self.terminal = find_terminal(self.stream)
        self.mode = resolve_mode(mode, self.terminal)
        self.info, self.dispatcher, self.cluster, self.tally = info, dispatcher, cluster, tally
        self.run_dir = Path(run_dir)
        self.tick_s, self.plain_every_s = tick_s, plain_every_s
        self.collector = Collector(info)
        self.console = None

    def snapshot(self) -> JobSnapshot:
        return self.collector.collect(self.dispatcher.stats, self.tally, self.cluster.strategies,
                                      len(self.cluster.failed_transfers), time.monotonic(),
                                      self.dispatcher.silent_s())

    async def run(self, stop: asyncio.Event) -> None:
        """Observe until `stop` is set (then take one last look)."""
        try:
            if self.mode == "live":
                await self._run_live(stop)
            await self._run_ticks(stop)
        except Exception as exc:             # the job goes on without a dashboard
            self._warn(f"dashboard stopped: {exc!r}")
            self.mode = "off"

    # ---- live ------------------------------------------------------------------------------------
    async def _run_live(self, stop: asyncio.Event) -> None:
        live = self._start_live()
        if live is None:
            return
        trouble = None
        try:
            while True:
                self._fit_console()
                live.update(render(self.snapshot()), refresh=True)
                if stop.is_set() or await _stopped(stop, self.tick_s):
                    live.update(render(self.snapshot()), refresh=True)
                    break
        except Exception as exc:             # an odd terminal: go on with progress lines
            trouble = exc
        finally:
            self._stop_live(live)
        if trouble is not None:              # said once the Live gave stderr back
            self._give_up_live(trouble)

    def _start_live(self):
        from rich.console import Console
        from rich.live import Live
        try:
            self.console = Console(file=self.stream, force_terminal=True)
            self._fit_console()
            live = Live(console=self.console, auto_refresh=False)
            live.start()
        except Exception as exc:
            self._give_up_live(exc)
            return None
        return live

    def _fit_console(self) -> None:
        size = terminal_size(self.terminal) if self.terminal else None
        if size is not None and size != tuple(self.console.size):
            self.console.size = size

    def _stop_live(self, live) -> None:
        try:
            live.stop()
        except Exception as exc:
            self._warn(f"could not close the live view: {exc!r}")

    def _give_up_live(self, exc: Exception) -> None:
        self._warn(f"live view unavailable ({exc!r}); showing progress lines instead")
        self.mode = "plain"

    # ---- plain and off ---------------------------------------------------------------------------
    async def _run_ticks(self, stop: asyncio.Event) -> None:
        """Snapshots feed the report's timeline in every mode; plain also prints a line now
        and then."""
        last_line = None
        while not stop.is_set():
            snap = self.snapshot()
            now = time.monotonic()
            due = last_line is None or now - last_line >= self.plain_every_s
            if self.mode == "plain" and due:
                self._print(plain_line(snap))
                last_line = now
            await _stopped(stop, self.tick_s)

    def _print(self, line: str) -> None:
        try:
            print(line, file=self.stream, flush=True)
        except (OSError, ValueError):        # stdout closed or gone: stay quiet from now on
            self.mode = "off"

    def _warn(self, message: str) -> None:
        print(f"mpiserve: {message}", file=sys.stderr, flush=True)

    # ---- the end ---------------------------------------------------------------------------------
    def finish(self) -> dict | None:
        """Show the final figures and write the run report; returns the summary (None if the
        report could not be written)."""
        try:
            snap = self.snapshot()
            self._show_summary(snap)
            return write_report(self.run_dir, self.info, snap, self.dispatcher.stats, self.tally,
                                self.cluster.failed_transfers, self.collector.timeline)
        except Exception as exc:
            self._warn(f"could not write the run report in {self.run_dir}: {exc!r}")
            return None

    def _show_summary(self, snap: JobSnapshot) -> None:
        if self.mode == "off":
            return
        if self.mode == "plain":
            self._print(plain_line(snap))
        try:
            from rich.console import Console
            # plain never writes escapes, whatever the stream is (Open MPI gives ranks a pty)
            console = (self.console if self.mode == "live" else
                       Console(file=self.stream, force_terminal=False, color_system=None))
            console.print(summary_table(snap))
            console.print(f"run report: {self.run_dir}", markup=False, highlight=False)
        except Exception as exc:
            self._warn(f"could not print the summary: {exc!r}")
