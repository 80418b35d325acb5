"""Which terminal, if any, rank 0's output ends up on.

mpiexec hands each rank a pipe, not the user's terminal: the launcher forwards what the rank
writes. So when rank 0's stdout is a pipe, follow it up through the launcher's own processes
(MPICH's hydra proxy and mpiexec, Open MPI's daemons and mpirun): if the outermost one writes to
a terminal, that is where the dashboard appears, and its size is the size to draw at. Open MPI
hands its ranks a pseudo-terminal of its own even when mpirun writes to a file or pipe, so a
terminal whose reader is a launcher is followed up the same way. A pipe
into any other process (a test harness, `| tee`) means no terminal. Linux /proc only; any
doubt means "no terminal"."""

from __future__ import annotations

import os

LAUNCHERS = frozenset({"hydra_pmi_proxy", "mpiexec", "mpiexec.hydra", "mpirun", "orterun",
                       "orted", "prterun", "prted"})
MAX_ANCESTORS = 4
TTY_PREFIXES = ("/dev/pts/", "/dev/tty")


def find_terminal(stream) -> str | None:
    """The terminal device that `stream` (rank 0's stdout) reaches, or None."""
    if os.environ.get("TERM", "").lower() in ("dumb", "unknown"):
        return None
    try:
        fd = stream.fileno()
        target = os.ttyname(fd) if os.isatty(fd) else os.readlink(f"/proc/self/fd/{fd}")
    except (AttributeError, ValueError, OSError):
        return None
    pid = os.getpid()
    for _ in range(MAX_ANCESTORS):
        parent = _parent(pid)
        if not target.startswith(("pipe:", *TTY_PREFIXES)) or _name(parent) not in LAUNCHERS:
            break
        pid, target = parent, _stdout_of(parent)
    return target if target.startswith(TTY_PREFIXES) else None


def terminal_size(device: str) -> tuple[int, int] | None:
    """(columns, lines) of a terminal device, or None if it cannot be asked."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    return (size.columns, size.lines) if size.columns > 0 and size.lines > 0 else None


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _stdout_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/1")
    except OSError:
        return ""


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""
