"""A private Slurm cluster for the tests: munged, slurmctld and slurmd started on this machine
with a generated configuration in a temporary directory, torn down at the end. One node on the
loopback address by default; given network-namespace hosts (tests/netns_hosts.py), slurmctld
runs on the first and one slurmd on each of the others (own NodeName, NodeAddr, spool
directory), and every client command runs on the first host too. munged serves them all
through its socket file.

Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge
(`launchers/slurm/install-test-slurm.sh` installs them). `SlurmCluster.unavailable()` names
what is missing, so the tests can skip with that reason; once everything is there, a cluster
that does not come up is an error (with the daemons' logs).

Every file named in slurm.conf has an absolute path (relative paths break a daemon restart).
The node declares more CPUs than the machine has (`SlurmdParameters=config_overrides`), so a
job of 1 router + P + D ranks fits on a two-core machine; ranks oversubscribe the cores as
they would under a plain `mpiexec`. Clients find the cluster through `SLURM_CONF` (see `env`).
A requeued job waits `cred_expire` seconds before it may start again (120 s by default; 10 s
here) and the scheduler runs every 2 s, so a requeue test takes seconds, not minutes.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo", "munge", "unmunge")
NODE_CPUS = 16
MUNGE_KEY = Path("/etc/munge/munge.key")
START_TIMEOUT_S = 60
REQUEUE_DELAY_S = 10
COMMAND_TIMEOUT_S = 30
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


class SlurmError(RuntimeError):
    """The cluster did not come up, or a Slurm command failed."""


def binary(name: str) -> str | None:
    """A program on PATH, or in the sbin directories a non-login PATH may lack."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        if os.access(Path(directory, name), os.X_OK):
            return str(Path(directory, name))
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_conf(root: Path, controller: tuple[str, str], nodes: list[tuple[str, str]],
               munge_socket: Path, ctld_port: int, slurmd_port: int,
               cpus: int = NODE_CPUS, first_job_id: int = 1) -> str:
    """slurm.conf for slurmctld on `controller` and slurmd on `nodes`, each a (name, address);
    every path absolute and under `root` (per node: %n is the node's name)."""
    return "\n".join([
        "ClusterName=mpiservetest",
        f"FirstJobId={first_job_id}",
        f"SlurmctldHost={controller[0]}({controller[1]})",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire is also how long a requeued job waits to start again (default 120 s)
        f"AuthInfo=socket={munge_socket},cred_expire={REQUEUE_DELAY_S}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool' / '%n'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        f"PlugStackConfig={root / 'plugstack.conf'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SlurmdParameters=config_overrides",
        "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=2",
        "MpiDefault=none",
        "JobRequeue=1",
        "ReturnToService=2",
        "MinJobAge=3600",
        "KillWait=10",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        *(f"NodeName={name} NodeAddr={address} CPUs={cpus} State=UNKNOWN"
          for name, address in nodes),
        f"PartitionName=debug Nodes={','.join(name for name, _ in nodes)} Default=YES "
        "MaxTime=INFINITE State=UP",
        "",
    ])


class SlurmCluster:
    """munged + slurmctld + slurmd per node; `stop()` kills exactly the daemons it started.
    `hosts`: a NetnsHosts whose first host is the controller and the rest the nodes."""

    def __init__(self, root: Path, hosts=None):
        self.root = Path(root).resolve()
        self.hosts = hosts
        if hosts is None:
            host = subprocess.run(["hostname", "-s"], capture_output=True, text=True,
                                  check=True).stdout.strip() or socket.gethostname()
            self.controller, self.nodes = (host, "127.0.0.1"), [(host, "127.0.0.1")]
        else:
            pairs = list(zip(hosts.names, hosts.addresses))
            self.controller, self.nodes = pairs[0], pairs[1:]
        self.conf = self.root / "slurm.conf"
        self.munge_dir: Path | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for name in [name for name in self.env if name.startswith(("SLURM_", "SBATCH_",
                                                                      "SRUN_", "SALLOC_"))]:
            if name != "SLURM_CONF":
                del self.env[name]

    # ---- availability ---------------------------------------------------------------------
    @staticmethod
    def unavailable() -> str | None:
        """Why the cluster cannot be started here, or None."""
        if os.geteuid() != 0:
            return "the Slurm tests start slurmctld/slurmd/munged and need root"
        missing = [name for name in DAEMONS + CLIENTS if binary(name) is None]
        if missing:
            return (f"Slurm/munge not installed (missing {', '.join(missing)}); "
                    "launchers/slurm/install-test-slurm.sh installs them")
        try:
            pwd.getpwnam("munge")
        except KeyError:
            return "no 'munge' user (the munge package creates it)"
        return None

    # ---- start / stop -----------------------------------------------------------------------
    def start(self) -> SlurmCluster:
        try:
            self._start()
        except BaseException:
            logs = self.logs()
            self.stop()
            raise SlurmError(f"the test Slurm cluster did not start\n{logs}") from None
        return self

    def _start(self) -> None:
        for sub in ("state", "log", *(f"spool/{name}" for name, _ in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "plugstack.conf").write_text("")
        munge_socket = self._start_munge()
        # job ids of their own: MPICH under srun names its shared-memory segments after the
        # job, and a segment left in /dev/shm by a killed job of an earlier test cluster with
        # the same id fails MPI_Init ("Out of memory" in the POSIX shm bootstrap)
        self.conf.write_text(slurm_conf(self.root, self.controller, self.nodes, munge_socket,
                                        free_port(), free_port(),
                                        first_job_id=random.randint(10_000, 60_000_000)))
        self._spawn("slurmctld", [binary("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)])
        self._wait_for(lambda: self._ok("scontrol", "ping") and "UP" in self.scontrol("ping"),
                       "slurmctld to answer scontrol ping")
        for index, (name, _) in enumerate(self.nodes):
            self._spawn(f"slurmd@{name}", [binary("slurmd"), "-D", "-f", str(self.conf),
                                           "-N", name], on=index + 1)
        self._wait_for(self._nodes_idle, f"nodes {self.node_list} to be idle")

    @property
    def node_list(self) -> str:
        return ",".join(name for name, _ in self.nodes)

    def _on(self, host: int, command: list[str]) -> list[str]:
        """`command` run on netns host `host` (0: the controller's); as is without hosts."""
        return command if self.hosts is None else self.hosts.run_on(host, command)

    def _start_munge(self) -> Path:
        """A private munged (user munge) on a socket in its own directory, with the system key
        (created when the package did not)."""
        munge = pwd.getpwnam("munge")
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            subprocess.run([binary("mungekey") or "mungekey", "--create",
                            f"--keyfile={MUNGE_KEY}"], check=True, capture_output=True,
                           timeout=COMMAND_TIMEOUT_S)
            os.chown(MUNGE_KEY.parent, munge.pw_uid, munge.pw_gid)
            os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
            os.chmod(MUNGE_KEY, 0o600)
        # munged refuses directories others can write; the pytest temp tree is root's 0700
        self.munge_dir = Path(tempfile.mkdtemp(prefix="mpiserve-munge-"))
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        os.chmod(self.munge_dir, 0o755)
        sock = self.munge_dir / "munge.socket"
        self._spawn("munged", [
            binary("munged"), "--foreground",
            f"--socket={sock}", f"--key-file={MUNGE_KEY}",
            f"--pid-file={self.munge_dir / 'munged.pid'}",
            f"--log-file={self.munge_dir / 'munged.log'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}"], user=munge)
        self._wait_for(lambda: sock.exists() and self._munge_works(sock), "munged to answer")
        return sock

    def _munge_works(self, sock: Path) -> bool:
        encoded = subprocess.run([binary("munge"), "-n", f"--socket={sock}"],
                                 capture_output=True, timeout=COMMAND_TIMEOUT_S)
        if encoded.returncode != 0:
            return False
        decoded = subprocess.run([binary("unmunge"), f"--socket={sock}"], input=encoded.stdout,
                                 capture_output=True, timeout=COMMAND_TIMEOUT_S)
        return decoded.returncode == 0

    def _spawn(self, name: str, command: list[str], user: pwd.struct_passwd | None = None,
               on: int = 0) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        as_user = {} if user is None else dict(user=user.pw_uid, group=user.pw_gid,
                                               extra_groups=[])
        try:
            # own session: a Ctrl-C meant for pytest does not reach the daemons
            command = command if user is not None else self._on(on, command)
            self.processes[name] = subprocess.Popen(command, stdout=log, stderr=log,
                                                    stdin=subprocess.DEVNULL,
                                                    start_new_session=True, env=self.env,
                                                    **as_user)
        finally:
            log.close()

    def _wait_for(self, ready, what: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode} while waiting for "
                                     f"{what}")
            if ready():
                return
            time.sleep(0.5)
        raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}")

    def _nodes_idle(self) -> bool:
        if not self._ok("sinfo"):
            return False
        states = self.run("sinfo", "-h", "-N", "-n", self.node_list, "-o", "%T",
                          check=False).stdout.lower().split()
        return len(states) == len(self.nodes) and all(
            state.startswith(("idle", "mixed", "allocated")) for state in states)

    def stop(self) -> None:
        """Cancel every job, kill the daemons this cluster started (slurmd first) and whatever
        they left (slurmstepd, job processes: found by this cluster's SLURM_CONF in their
        environment), then remove munged's directory."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            try:
                self.cancel_all()
            except (subprocess.TimeoutExpired, OSError):
                pass
            self._wait_for_no_jobs(timeout=30)
        slurmds = [name for name in self.processes if name.startswith("slurmd@")]
        for name in (*slurmds, "slurmctld", "munged"):
            proc = self.processes.pop(name, None)
            if proc is None:
                continue
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                if proc.poll() is not None:
                    break
                _signal_session(proc, sig)
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    pass
            _signal_session(proc, signal.SIGKILL)     # whatever it left in its session
        for pid in self.leftover_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None

    def leftover_processes(self) -> list[int]:
        """Processes started under this cluster: their environment names its slurm.conf."""
        marker = f"SLURM_CONF={self.conf}".encode() + b"\0"
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            pid = int(environ.parent.name)
            if pid == os.getpid():
                continue
            try:
                if marker in environ.read_bytes() + b"\0":
                    found.append(pid)
            except OSError:
                continue
        return found

    def _wait_for_no_jobs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                out = self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip()
            except subprocess.TimeoutExpired:
                return
            if not out:
                return
            time.sleep(1.0)

    # ---- commands -----------------------------------------------------------------------------
    def run(self, *command: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_S,
            cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        command = (binary(command[0]) or command[0], *command[1:])
        result = subprocess.run(self._on(0, list(command)), capture_output=True, text=True,
                                timeout=timeout, cwd=cwd, env={**self.env, **(env or {})})
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(command)} exited {result.returncode}\n"
                             f"{result.stdout}{result.stderr}")
        return result

    def _ok(self, *command: str) -> bool:
        try:
            return self.run(*command, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def scontrol(self, *args: str) -> str:
        return self.run("scontrol", *args).stdout

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> int:
        """Submit; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.scontrol("show", "job", "-o", str(job_id)).strip()
        info = {}
        for field in text.split():
            key, sep, value = field.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def wait_job(self, job_id: int, timeout: float, until=None) -> dict[str, str]:
        """Poll the job until it reaches a final state (or `until(info)` is true); raises
        TimeoutError with the last state otherwise."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if (until(info) if until else info.get("JobState") in FINAL_STATES):
                return info
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} not done after {timeout:.0f} s; last state: "
                           f"{info.get('JobState')} {info.get('Reason')}")

    def cancel_all(self) -> None:
        self.run("scancel", "--full", "--signal=KILL", "-u", "root", check=False)
        self.run("scancel", "-u", "root", check=False)

    def logs(self, tail: int = 60) -> str:
        """The last lines of every daemon log, for a failure message."""
        parts = []
        paths = sorted((self.root / "log").glob("*")) if (self.root / "log").exists() else []
        if self.munge_dir is not None:
            paths.append(self.munge_dir / "munged.log")
        for path in paths:
            try:
                lines = path.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def _signal_session(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group the daemon leads (it was started in its own session)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
