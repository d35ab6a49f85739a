"""The start-up benchmark (``experiments.benchmarks.startup``): fresh processes, medians and the ratio of the
project's command to the import floor, on stand-in commands (the real ones take seconds each)."""

from __future__ import annotations

from experiments.benchmarks import startup


def test_start_up_benchmark_times_fresh_processes_and_reports_the_floor(monkeypatch):
    sleep = "import time; time.sleep({})"
    monkeypatch.setattr(startup, "COMMANDS", {"python": ["-c", "pass"], "torch": ["-c", sleep.format(0.05)],
                                              "lightning": ["-c", sleep.format(0.2)],
                                              "help": ["-c", sleep.format(0.3)]})
    result = startup.run(repeats=3, warmup=0)
    s = result["seconds"]
    assert s["python"] < s["torch"] < s["lightning"] < s["help"]
    assert result["help_vs_lightning"] > 1.0 and 0.0 < result["project_s"] < s["help"]
    assert result["bytecode"]["experiments.run"] in (True, False) and result["target_help_s"] == 5.0
