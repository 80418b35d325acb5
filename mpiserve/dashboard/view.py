"""How a JobSnapshot looks: pure functions from a snapshot to rich renderables or a text line."""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.layout import Layout
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .snapshot import LATENCY_KEYS, EngineRow, JobSnapshot, LatencySummary

BLOCKS = "▁▂▃▄▅▆▇█"
NONE = "–"


class _FitWidth:
    """A renderable drawn by `draw(width)` at the width rich gives it."""

    def __init__(self, draw):
        self.draw = draw

    def __rich_console__(self, console, options):
        yield self.draw(options.max_width)



# ---- small formatters --------------------------------------------------------------------------
def duration(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def latency(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.{2 if seconds < 10 else 1 if seconds < 100 else 0}f} s"


def rate(value: float) -> str:
    return f"{value:,.0f}"


def megabytes(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def share(value: float | None) -> str:
    return NONE if value is None else f"{value:.0%}"


def sparkline(values, width: int | None = None) -> str:
    """One unicode block per value, scaled to the largest; the newest `width` values."""
    values = list(values)[-width:] if width else list(values)
    peak = max(values, default=0)
    if peak <= 0:
        return BLOCKS[0] * len(values)
    return "".join(BLOCKS[round(max(0.0, v) / peak * (len(BLOCKS) - 1))] for v in values)


# ---- the one-line form ---------------------------------------------------------------------------
def plain_line(snap: JobSnapshot) -> str:
    """Elapsed, done/total, %, ETA, tok/s, running/waiting per engine, KV moved, fallbacks,
    errors; for logs and terminals that cannot show the live view."""
    engines = " ".join(f"{e.rank}:{e.running}/{e.waiting}" for e in snap.engines)
    stopping = " · stopping" if snap.interrupted else ""
    stopping += "".join(f" · rank {e.rank} silent {e.silent_s:.0f} s"
                        for e in snap.engines if e.stalled)
    return (f"[{duration(snap.elapsed)}] {snap.skipped + snap.done}/{snap.total} "
            f"{snap.fraction:.0%} ETA {duration(snap.eta_s)} · {rate(snap.tokens_per_s)} tok/s · "
            f"run/wait {engines} · KV {megabytes(snap.kv_mb_moved)} MB · "
            f"fallbacks {snap.fallbacks} · errors {snap.failed}{stopping}")


# ---- the live view -------------------------------------------------------------------------------
def render(snap: JobSnapshot) -> RenderableType:
    """The dashboard: progress, one row per engine, latency percentiles, throughput, strategy
    mix and the latest errors, in named Layout regions; as tall as its content."""
    figures = max(7, len(snap.strategies) + 2)
    errors = max(1, len(snap.errors)) + 2
    engines = len(snap.engines) + 5
    layout = Layout(name="job")
    layout.split_column(
        Layout(progress_view(snap), name="progress", size=2),
        Layout(engine_panel(snap), name="engines", size=engines),
        Layout(name="figures", size=figures),
        Layout(errors_panel(snap), name="errors", size=errors))
    layout["figures"].split_row(
        Layout(latency_panel(snap), name="latency", size=38),
        Layout(throughput_panel(snap), name="throughput", ratio=2),
        Layout(strategy_panel(snap), name="strategies", ratio=1))
    height = 2 + engines + figures + errors + 2
    return Panel(layout, title=title(snap), title_align="left", height=height)


def title(snap: JobSnapshot) -> Text:
    text = Text.assemble(("mpiserve", "bold"), f" · model {snap.model} · router {snap.router}")
    if snap.interrupted:
        text.append(" · stopping: finishing requests in flight", style="bold yellow")
    return text


def progress_view(snap: JobSnapshot) -> RenderableType:
    grid = Table.grid(expand=True, padding=(0, 2))
    grid.add_column(ratio=1)
    grid.add_column(no_wrap=True)
    bar = ProgressBar(total=max(snap.total, 1), completed=snap.skipped + snap.done)
    grid.add_row(bar, Text(f"{snap.skipped + snap.done}/{snap.total}  {snap.fraction:.0%}  "
                           f"ETA {duration(snap.eta_s)}  elapsed {duration(snap.elapsed)}"))
    figures = Text(f"in flight {snap.in_flight} · failed {snap.failed} · skipped {snap.skipped}"
                   f" · {rate(snap.tokens_per_s)} tok/s · KV moved {megabytes(snap.kv_mb_moved)}"
                   f" MB · fallbacks {snap.fallbacks} · transfer failures "
                   f"{snap.transfer_failures}", style="dim", no_wrap=True, overflow="ellipsis")
    return Group(grid, figures)


# name: (two-line header, justify); on a narrow terminal the NARROW_DROPS go, in that order
ENGINE_COLUMNS = {"rank": ("\nrank", "right"), "host": ("\nhost", "left"),
                  "role": ("\nrole", "left"), "run/wait": ("run/\nwait", "right"),
                  "pages": ("KV pages\nused/free", "right"), "hit": ("prefix\nhit", "right"),
                  "prefill": ("prefill\ntok/s", "right"), "decode": ("decode\ntok/s", "right"),
                  "kv": ("KV MB\nsent/recv", "right"), "busy": ("\nbusy", "right"),
                  "fallbacks": ("fall-\nbacks", "right"), "heard": ("last\nheard", "right")}
NARROW_DROPS = ("busy", "host", "heard")
HOST_WIDTH = 8                  # a host name shorter than that is shown cut, not dropped


def engine_cells(e: EngineRow) -> dict[str, str]:
    return {"rank": str(e.rank), "host": e.host or "(starting)", "role": e.role,
            "run/wait": f"{e.running}/{e.waiting}", "pages": f"{e.pages_used}/{e.pages_free}",
            "hit": share(e.prefix_hit_rate), "prefill": rate(e.prefill_tps),
            "decode": rate(e.decode_tps),
            "kv": f"{megabytes(e.kv_mb_sent)}/{megabytes(e.kv_mb_received)}",
            "busy": share(e.busy_fraction), "fallbacks": str(e.fallbacks),
            "heard": f"{e.silent_s:.0f} s"}


def _width_needed(names, rows: list[dict[str, str]]) -> int:
    def width(name: str) -> int:
        cells = [len(part) for part in ENGINE_COLUMNS[name][0].split("\n")]
        cells += [len(row[name]) for row in rows]
        return min(max(cells), HOST_WIDTH) if name == "host" else max(cells)
    return sum(width(name) for name in names) + len(names) - 1


def engine_table(snap: JobSnapshot, width: int) -> Table:
    rows = [engine_cells(e) for e in snap.engines]
    names = list(ENGINE_COLUMNS)
    for dropped in NARROW_DROPS:
        if _width_needed(names, rows) <= width:
            break
        names.remove(dropped)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=0)                          # the box's blank divider parts columns
    for name in names:
        header, justify = ENGINE_COLUMNS[name]
        table.add_column(header, justify=justify, no_wrap=name != "host")
    for row, e in zip(rows, snap.engines, strict=True):
        style = {"fallbacks": "yellow" if e.fallbacks else "",
                 "heard": "bold red" if e.stalled else ""}
        table.add_row(*(Text(row[name], style=style.get(name, ""), no_wrap=True,
                             overflow="ellipsis") for name in names))
    return table


def engine_panel(snap: JobSnapshot) -> RenderableType:
    return Panel(_FitWidth(lambda width: engine_table(snap, width)), title="engines",
                 title_align="left")


def latency_panel(snap: JobSnapshot) -> RenderableType:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, expand=True, pad_edge=False)
    for name in ("", "p50", "p90", "p99"):
        table.add_column(name, justify="right", no_wrap=True)
    for key in LATENCY_KEYS:
        spread: LatencySummary = getattr(snap, key)
        table.add_row(key.upper(), latency(spread.p50), latency(spread.p90), latency(spread.p99))
    return Panel(table, title=f"latency ({snap.jct.count} done)", title_align="left")


def throughput_panel(snap: JobSnapshot) -> RenderableType:
    now = snap.throughput[-1] if snap.throughput else 0.0
    peak = max(snap.throughput, default=0.0)
    line = _FitWidth(lambda width: Text(sparkline(snap.throughput, width), style="green"))
    return Panel(Group(line,
                       Text(f"now {rate(now)} · peak {rate(peak)} · mean "
                            f"{rate(snap.tokens_per_s)} tok/s", style="dim")),
                 title="generated tok/s", title_align="left")


def strategy_panel(snap: JobSnapshot) -> RenderableType:
    total = sum(count for _, count in snap.strategies)
    lines = [Text(f"{name} {count} ({count / total:.0%})", no_wrap=True, overflow="ellipsis")
             for name, count in snap.strategies]
    return Panel(Group(*lines) if lines else Text(NONE, style="dim"), title="strategies",
                 title_align="left")


def errors_panel(snap: JobSnapshot) -> RenderableType:
    lines = [Text(message, style="red", no_wrap=True, overflow="ellipsis")
             for message in snap.errors]
    return Panel(Group(*lines) if lines else Text("none", style="dim"),
                 title=f"latest errors ({snap.failed} in all)", title_align="left")


# ---- the end of a run ----------------------------------------------------------------------------
def summary_table(snap: JobSnapshot) -> Table:
    table = Table(title="mpiserve run summary", box=box.SIMPLE_HEAD, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("records", f"{snap.completed} completed, {snap.failed} failed, {snap.skipped} skipped "
                    f"of {snap.total}" + (" (stopped by a signal)" if snap.interrupted else "")),
        ("generated", f"{snap.generated_tokens:,} tokens in {duration(snap.elapsed)} "
                      f"({rate(snap.tokens_per_s)} tok/s)"),
        *((key.upper(), _spread(getattr(snap, key))) for key in LATENCY_KEYS),
        ("KV moved", f"{megabytes(snap.kv_mb_moved)} MB; {snap.transfer_failures} transfer "
                     f"failures, {snap.fallbacks} fallbacks"),
        ("strategies", ", ".join(f"{n} {c}" for n, c in snap.strategies) or NONE),
        *((("note", snap.note),) if snap.note else ())]
    for name, value in rows:
        table.add_row(name, Text(value))
    return table


def _spread(spread: LatencySummary) -> str:
    return (f"mean {latency(spread.mean)} · p50 {latency(spread.p50)} · "
            f"p90 {latency(spread.p90)} · p99 {latency(spread.p99)}")
