"""Harness for the tests against a real local Slurm (tests/test_slurm.py): install the Debian packages with apt-get
when missing (root), start munged + slurmctld + slurmd in a temporary directory, submit through the Makefile, and
failure messages that carry the Slurm logs (slurm-*.out, slurmctld.log, slurmd.log).

The cluster itself is ``experiments.slurm.local_cluster.LocalSlurm`` (also used by ``experiments.bench --only
slurm``); the session fixture lives in tests/test_slurm.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from experiments.slurm.local_cluster import LocalSlurm, SlurmSetupError, ensure_installed

REPO = Path(__file__).resolve().parents[2]


def start_cluster(root: Path) -> tuple[LocalSlurm, str]:
    """Install when needed, start, and return the cluster and what the install step did.
    Raises ``SlurmSetupError`` with the reason (not root, apt-get failed, a daemon did not come up)."""
    installed = ensure_installed()
    cluster = LocalSlurm(root)
    cluster.start()
    return cluster, installed


def slurm_outputs(*dirs: Path, tail: int = 6000) -> str:
    """Every slurm-*.out under ``dirs`` (tails)."""
    out = []
    for d in dirs:
        for path in sorted(Path(d).rglob("slurm-*.out")):
            out.append(f"----- {path}\n{path.read_text(errors='replace')[-tail:]}")
    return "\n".join(out) or "(no slurm-*.out files)"


def diagnostics(cluster: LocalSlurm, *dirs: Path) -> str:
    """What to print when a Slurm test fails: the jobs' outputs, the queue and the daemons' logs."""
    queue = subprocess.run(["squeue", "-t", "all", "-o", "%i %j %T %r %S %e"], capture_output=True, text=True,
                           env=cluster.env, timeout=30)
    return (f"{slurm_outputs(*dirs)}\n----- squeue\n{queue.stdout}{queue.stderr}\n{cluster.logs()}\n"
            f"----- slurm: {cluster.version()}, debian {_debian_version()}")


def _debian_version() -> str:
    path = Path("/etc/debian_version")
    return path.read_text().strip() if path.exists() else "unknown"


def make(target: str, cluster: LocalSlurm, timeout: float = 120, **variables: str) -> dict[str, str]:
    """Run ``make <target> VAR=value...`` against the cluster with this interpreter's environment; returns the
    submitted job ids by variable (``{"STAGE1_JOB": "12"}``)."""
    venv = Path(sys.prefix)
    cmd = ["make", "-s", "-C", str(REPO), "-o", str(venv / ".installed"), target, f"VENV={venv}",
           *(f"{k}={v}" for k, v in variables.items())]
    result = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return dict(re.findall(r"^([A-Z0-9_]+)=(\d+)$", result.stdout, flags=re.M))


__all__ = ["REPO", "LocalSlurm", "SlurmSetupError", "diagnostics", "make", "slurm_outputs", "start_cluster"]
