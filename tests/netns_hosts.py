"""Test "hosts" on one machine: Linux network namespaces, each with its own address on a private
test subnet and, through a UTS namespace, its own hostname, joined by one bridge (in a namespace
of its own) like nodes on a switch. Traffic goes only between these namespaces: none of them is
connected to the machine's own network, and nothing outside them is touched.

A command runs on a host in the host's network namespace (nsenter), in a UTS namespace with
the host's hostname, and in a mount namespace whose /etc/hosts is the host's own file; /sys
stays the machine's (cgroups, which slurmd needs). By default that file maps the hostname to
127.0.1.1 as on a stock Debian/Ubuntu node, so `gethostbyname(gethostname())` gives loopback:
a job that advertises that to another host fails, as it would on real nodes. With
`names_resolve=True` every host's name maps to its address instead, as cluster DNS would
(Slurm's nodes and hydra under Slurm find each other by name).

MPICH's hydra starts ranks on these hosts as it would over ssh: `mpiexec -hosts ADDR:N,...
-iface IFACE -launcher ssh -launcher-exec SCRIPT`, where SCRIPT, called as `SCRIPT -x ADDR
"command"`, runs the command in ADDR's namespace with its hostname. mpiexec itself runs on the
first host (`NetnsHosts.mpiexec`).

Needs root, `ip` (iproute2), `nsenter` and `unshare` (util-linux); `NetnsHosts.unavailable()`
names what is missing so tests can skip with the reason. `NetnsHosts` is a context manager;
leaving it kills whatever still runs in the namespaces and removes them, also when the test failed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

SUBNET = "10.231.17"        # /24, private, only ever on the veths made here
PREFIX = 24
IFACE = "mpsv0"             # every host's interface has this name inside its namespace
COMMAND_TIMEOUT_S = 20
# run as `sh -c ENTER HOSTS_FILE HOSTNAME COMMAND...` in a new mount and UTS namespace
ENTER = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'


def sh(*argv: str) -> str:
    """Run a command; its stdout, or a RuntimeError with its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class NetnsHosts:
    """`count` hosts named <tag>a, <tag>b, ... at SUBNET.1, .2, ... (namespace = hostname)."""

    def __init__(self, count: int = 2, names_resolve: bool = False):
        tag = f"mpsv{os.getpid() % 100000}"
        self.names = [f"{tag}{chr(ord('a') + i)}" for i in range(count)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(count)]
        self.switch = f"{tag}sw"
        self.workdir = Path(tempfile.mkdtemp(prefix="netns-hosts-"))
        self.launcher = self.workdir / "enter-host"
        self.names_resolve = names_resolve

    @staticmethod
    def unavailable() -> str | None:
        """Why these hosts cannot be made here, or None."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool) is None]
        if missing:
            return f"{' and '.join(missing)} not installed (iproute2, util-linux)"
        probe = f"mpsvprobe{os.getpid() % 100000}"
        try:
            sh("ip", "netns", "add", probe)
            sh("ip", "-n", probe, "link", "add", "br0", "type", "bridge")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            return f"cannot make a network namespace with a bridge: {exc}"
        finally:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    # ---- making and removing -------------------------------------------------------------
    def __enter__(self) -> NetnsHosts:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for index, (name, address) in enumerate(zip(self.names, self.addresses)):
            self._add_host(index, name, address)
        self._write_launcher()

    def _add_host(self, index: int, name: str, address: str) -> None:
        sh("ip", "netns", "add", name)
        host_end, switch_end = f"{name}h", f"{name}s"
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", switch_end)
        sh("ip", "link", "set", switch_end, "netns", self.switch)
        sh("ip", "-n", self.switch, "link", "set", switch_end, "master", "br0", "up")
        sh("ip", "link", "set", host_end, "netns", name)
        sh("ip", "-n", name, "link", "set", host_end, "name", IFACE)
        sh("ip", "-n", name, "addr", "add", f"{address}/{PREFIX}", "dev", IFACE)
        sh("ip", "-n", name, "link", "set", IFACE, "up")
        sh("ip", "-n", name, "link", "set", "lo", "up")
        names = (zip(self.addresses, self.names) if self.names_resolve
                 else [("127.0.1.1", name)])
        self.hosts_file(index).write_text("127.0.0.1 localhost\n" + "".join(
            f"{address} {host}\n" for address, host in names))

    def hosts_file(self, index: int) -> Path:
        return self.workdir / f"hosts.{self.names[index]}"

    def _write_launcher(self) -> None:
        cases = "\n".join(f"    {address}|{name}) ns={name} ;;"
                          for name, address in zip(self.names, self.addresses))
        self.launcher.write_text(f"""#!/bin/sh
# hydra's ssh launcher calls: $0 [-x ...] HOST "command"; run command on HOST
while [ "${{1#-}}" != "$1" ]; do shift; done
host=$1; shift
case "$host" in
{cases}
    *) echo "enter-host: unknown host $host" >&2; exit 255 ;;
esac
exec nsenter --net="/run/netns/$ns" unshare --mount --uts sh -c {shlex.quote(ENTER)} \\
    "{self.workdir}/hosts.$ns" "$ns" sh -c "$*"
""")
        self.launcher.chmod(0o755)

    def close(self) -> None:
        """Kill what runs in the namespaces, remove them and their files. Never raises."""
        for name in [*self.names, self.switch]:
            self._kill_inside(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _kill_inside(name: str) -> None:
        found = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in found.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        if found.stdout.strip():
            time.sleep(0.2)

    # ---- using -------------------------------------------------------------------------------
    def run_on(self, host: int, argv: list[str]) -> list[str]:
        """argv wrapped to run on host `host` (its namespace and hostname)."""
        return [*self._enter(self.names[host], str(self.hosts_file(host))), *argv]

    @staticmethod
    def _enter(name: str, hosts_file: str) -> list[str]:
        """The prefix that runs a command as host `name`."""
        return ["nsenter", f"--net=/run/netns/{name}", "unshare", "--mount", "--uts", "sh",
                "-c", ENTER, hosts_file, name]

    def mpiexec(self, mpiexec: str, slots: list[int], argv: list[str]) -> list[str]:
        """`mpiexec` run on host 0, starting slots[i] ranks on host i (in host order), each
        running argv."""
        hosts = ",".join(f"{address}:{count}"
                         for address, count in zip(self.addresses, slots) if count)
        return self.run_on(0, [mpiexec, "-hosts", hosts, "-iface", IFACE, "-launcher", "ssh",
                               "-launcher-exec", str(self.launcher), "-n", str(sum(slots)),
                               *argv])

    def set_link(self, host: int, up: bool) -> None:
        """Plug or unplug host `host`'s cable (its interface up or down)."""
        sh("ip", "-n", self.names[host], "link", "set", IFACE, "up" if up else "down")
