"""A throwaway single-node Slurm cluster on this machine (tests of the Slurm path, the Slurm benchmark).

    with LocalSlurm(tmp_dir) as cluster:        # needs root; installs the Debian packages when missing
        subprocess.run(["sbatch", ...], env=cluster.env)

Everything lives in one directory: a private munge key and ``munged`` socket, ``slurm.conf`` (free ports, this
machine's CPUs, RealMemory a bit below its memory), state, spool, pid and log files. ``SLURM_CONF`` in
``cluster.env`` points every Slurm command (and, through the job environment, ``srun``/``scontrol`` inside jobs) at
it. ``stop()`` cancels what is left and ends the daemons by the PIDs in their pid files. The recipe is
``shared/docs/slurm-local.md``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel", "munged", "munge")


class SlurmSetupError(RuntimeError):
    """The local cluster could not be installed or started (the message says why, with the daemons' logs)."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed(timeout: float = 600) -> str:
    """Install the Debian packages with apt-get when a binary is missing (root only); returns what was done."""
    missing = missing_binaries()
    if not missing:
        return "already installed"
    if os.geteuid() != 0:
        raise SlurmSetupError(f"Slurm is not installed ({', '.join(missing)} missing) and this is not root: run "
                              f"`apt-get install -y {' '.join(PACKAGES)}` as root")
    if shutil.which("apt-get") is None:
        raise SlurmSetupError(f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for cmd in (["apt-get", *lock, "update", "-qq"],
                ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise SlurmSetupError(f"`{' '.join(cmd)}` did not finish in {timeout:.0f} s") from exc
        if result.returncode != 0:
            raise SlurmSetupError(f"`{' '.join(cmd)}` failed ({result.returncode}):\n"
                                  f"{(result.stdout + result.stderr)[-3000:]}")
    if missing_binaries():
        raise SlurmSetupError(f"installed {PACKAGES}, but {', '.join(missing_binaries())} are still missing")
    return f"installed {' '.join(PACKAGES)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SlurmSetupError("no MemTotal in /proc/meminfo")


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as gone
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


class LocalSlurm:
    """A single-node Slurm (partition ``debug``) rooted at ``root``; start with ``start()`` or ``with``."""

    def __init__(self, root: str | Path, cpus: int | None = None, memory: int | None = None, kill_wait: int = 5):
        self.root = Path(root).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.memory = memory or int(memory_mb() * 0.9)
        self.kill_wait = kill_wait
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.started = False

    # --------------------------------------------------------------------------------- environment
    @property
    def env(self) -> dict[str, str]:
        """This process's environment without inherited ``SLURM_*``/``SBATCH_*`` variables, plus ``SLURM_CONF``
        (jobs inherit it, so ``srun`` and Lightning's ``scontrol requeue`` inside them reach this cluster)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        return {**env, "SLURM_CONF": str(self.conf)}

    def pid(self, name: str) -> int | None:
        path = self.root / "run" / f"{name}.pid"
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().strip())
        return None

    def logs(self, tail: int = 4000) -> str:
        """The daemons' log tails (for failure messages)."""
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / "log" / name
            text = path.read_text(errors="replace")[-tail:] if path.exists() else "(absent)"
            out.append(f"----- {path}\n{text}")
        return "\n".join(out)

    # --------------------------------------------------------------------------------- config
    def slurm_conf(self) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=local",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "ReturnToService=2",
            "MpiDefault=none",
            "MailProg=/bin/true",
            f"KillWait={self.kill_wait}",      # seconds from SIGTERM to SIGKILL (a requeue ends the first run)
            "MinJobAge=3600",                  # finished jobs stay visible to `scontrol show job`
            "SchedulerParameters=sched_interval=2",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n"

    # --------------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60) -> LocalSlurm:
        if os.geteuid() != 0:
            raise SlurmSetupError("the local Slurm cluster runs its daemons as root (SlurmUser=root); this is uid "
                                  f"{os.geteuid()}")
        for sub in ("state", "spool", "run", "log", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o600)
        self.conf.write_text(self.slurm_conf())
        self.started = True
        try:
            self._run([_binary("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                       f"--pid-file={self.root / 'run' / 'munged.pid'}",
                       f"--log-file={self.root / 'log' / 'munged.log'}",
                       f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
            self._wait(lambda: self._munge_ok(), timeout, "munged to answer")
            self._run([_binary("slurmctld"), "-f", str(self.conf)])
            self._run([_binary("slurmd"), "-f", str(self.conf)])
            self._wait(self.idle, timeout, "the node to be idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, cmd: list[str]) -> None:
        result = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if result.returncode != 0:
            raise SlurmSetupError(f"`{' '.join(cmd)}` failed ({result.returncode}): "
                                  f"{(result.stdout + result.stderr).strip()}\n{self.logs()}")

    def _munge_ok(self) -> bool:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            cred = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True, timeout=10)
            check = subprocess.run(["unmunge", "-S", str(self.munge_socket)], input=cred.stdout,
                                   capture_output=True, timeout=10)
            return cred.returncode == 0 and check.returncode == 0
        return False

    def idle(self) -> bool:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env,
                                timeout=30)
        return result.returncode == 0 and result.stdout.split() == ["idle"]

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise SlurmSetupError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
            time.sleep(0.5)

    def version(self) -> str:
        result = subprocess.run([_binary("slurmctld"), "-V"], capture_output=True, text=True, timeout=30)
        return result.stdout.strip()

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, then end slurmd, slurmctld and munged by the PIDs in their pid files."""
        if not self.started:
            return
        if self.pid("slurmctld"):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True, timeout=30)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    q = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                                       timeout=30)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pid(name)
            if pid is None or not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.started = False

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
