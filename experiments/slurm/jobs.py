"""Slurm job queries through ``scontrol`` (no accounting daemon needed): job records, waiting for jobs to end."""

from __future__ import annotations

import datetime as _dt
import subprocess
import time
from collections.abc import Callable, Iterable

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED", "SPECIAL_EXIT"}


def parse_records(text: str) -> list[dict[str, str]]:
    """``scontrol show job --oneliner`` output -> one dict per record (``JobId``, ``JobState``, ``StartTime``...)."""
    records = []
    for line in text.splitlines():
        if "JobId=" not in line:
            continue
        record: dict[str, str] = {}
        key = None
        for token in line.split(" "):
            if "=" in token and not token.startswith("="):
                key, _, value = token.partition("=")
                record[key] = value
            elif key is not None and token:  # a value with spaces (e.g. Reason, Command)
                record[key] += " " + token
        records.append(record)
    return records


def show_jobs(job_id: str, env: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Every record of ``job_id`` (all tasks of an array job; ``<array>_<task>`` for one task); ``[]`` when Slurm
    no longer knows it."""
    result = subprocess.run(["scontrol", "show", "job", "--oneliner", str(job_id)], capture_output=True, text=True,
                            env=env, timeout=60)
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return []
        raise RuntimeError(f"scontrol show job {job_id}: {result.stderr.strip()}")
    return parse_records(result.stdout)


def state(record: dict[str, str]) -> str:
    return record.get("JobState", "").split(" ")[0]


def wait_for(job_ids: Iterable[str], env: dict[str, str] | None = None, timeout: float = 600,
              poll: float = 1.0, until: Callable[[list[dict[str, str]]], bool] | None = None) -> list[dict[str, str]]:
    """Poll until every record of ``job_ids`` is in a terminal state (or ``until(records)`` holds); returns the
    records. Raises ``TimeoutError`` with the last states."""
    ids = list(job_ids)
    deadline = time.monotonic() + timeout
    while True:
        records = [r for j in ids for r in show_jobs(j, env)]
        done = until(records) if until else (records and all(state(r) in TERMINAL for r in records))
        if done:
            return records
        if time.monotonic() > deadline:
            states = {r.get("JobId"): (state(r), r.get("Reason")) for r in records}
            raise TimeoutError(f"jobs {ids} not done after {timeout:.0f} s: {states}")
        time.sleep(poll)


def timestamp(value: str) -> _dt.datetime:
    """``scontrol``'s local ``2026-01-01T12:00:00``."""
    return _dt.datetime.fromisoformat(value)
