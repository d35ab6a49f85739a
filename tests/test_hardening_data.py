"""Hardening of the data layer, the command doors and concurrent runs (issue 13, part B): every bad input is one
line naming the file, member, key or option, exit status 2; nothing silently wrong; no run clobbers another."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.errors import DataFormatError, run_command
from experiments import run as run_cli  # imported before capsys swaps stderr: Lightning's log handlers keep the real one

REPO = Path(__file__).resolve().parent.parent
STAGE1 = ["--config", str(REPO / "configs/base/trainer.yaml"), "--config", str(REPO / "configs/stage1/tiny_synthetic.yaml")]


def _one_line_error(capsys) -> str:
    """The one ``error:`` line on stderr (log lines such as Lightning's "Seed set" may precede it; no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("INFO:", "Seed set"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------- item 6: CLI errors
@pytest.mark.parametrize("override, expected", [
    ("--data.init_args.subjects=[bob]", "unknown subject 'bob'"),
    ("--data.init_args.num_sessions=9", "data.num_sessions=9"),
    ("--data.init_args.val_images=100000", "data.val_images=100000"),
], ids=["unknown-subject", "too-many-sessions", "val-images-too-large"])
def test_run_user_errors_are_one_line_and_status_2(small_data, tmp_path, capsys, override, expected):
    main = run_cli.main
    args = ["fit", *STAGE1, f"--data.init_args.data_dir={small_data}", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", f"--data.init_args.val_cache_dir={tmp_path / 'vc'}",
            "--data.init_args.targets={}", "--trainer.max_epochs=1", override]
    assert run_command(main, args) == 2
    assert expected in _one_line_error(capsys)
    with pytest.raises(Exception, match="bob" if "bob" in override else "data."):
        run_command(main, [*args, "--debug"])  # --debug: the traceback, not the line
    os.environ.pop("MOREBRAIN_DEBUG", None)


def test_every_command_door_goes_through_the_one_helper():
    """Each ``python -m experiments.X`` door ends in ``run_command`` (directly or through ``run_main``)."""
    doors = [p for p in (REPO / "experiments").rglob("*.py") if 'if __name__ == "__main__":' in p.read_text()]
    assert len(doors) >= 15
    lacking = [str(p.relative_to(REPO)) for p in doors
               if "run_command(main)" not in p.read_text() and "run_main(main)" not in p.read_text()]
    assert not lacking, lacking


def test_a_door_run_as_a_program_prints_one_line_and_debug_gives_the_trace(tmp_path):
    cmd = [sys.executable, "-m", "experiments.prepare_nsd", "--mindeye2-root", str(tmp_path / "none"), "--out",
           str(tmp_path / "out"), "--subjects", "1"]
    plain = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "MOREBRAIN_DEBUG": ""})
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    debug = subprocess.run([*cmd, "--debug"], cwd=REPO, capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    env = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "MOREBRAIN_DEBUG": "1"})
    assert env.returncode == 1 and "Traceback" in env.stderr
