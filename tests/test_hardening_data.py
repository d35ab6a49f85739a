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


# ------------------------------------------------------------------------------------------ item 2: importer input
def _rewrite_tar(path: Path, edit) -> None:
    """Rewrite a MindEyeV2 behaviour shard after ``edit(list of (name, bytes))`` (duplicates allowed)."""
    import io
    import tarfile

    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    members = edit(members)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _prepare(src: Path, out: Path, *extra: str) -> int:
    from experiments.prepare_nsd import main as prepare_main

    return run_command(prepare_main, ["--mindeye2-root", str(src), "--out", str(out), "--subjects", "1", "--quiet",
                                      *extra])


def _drop_behav(members):
    name = sorted(n for n, _ in members if n.endswith(".behav.npy"))[2]
    return [(n, d) for n, d in members if n != name], f"{name.split('.')[0]} has no member {name}"


def _duplicate_member(members):
    name, data = sorted((n, d) for n, d in members if n.endswith(".behav.npy"))[1]
    return [*members, (name, data)], f"holds member {name} twice"


def _fractional_id(members):
    import io

    import numpy as np

    name = sorted(n for n, _ in members if n.endswith(".behav.npy"))[4]
    index = [n for n, _ in members].index(name)
    behav = np.load(io.BytesIO(members[index][1]))
    behav[0, 0] += 0.5
    buffer = io.BytesIO()
    np.save(buffer, behav)
    members[index] = (name, buffer.getvalue())
    return members, f"member {name}: column 0 (73k image id)"


@pytest.mark.parametrize("corrupt", [_drop_behav, _duplicate_member, _fractional_id],
                         ids=["no-behav", "duplicate-member", "fractional-id"])
def test_importer_refuses_a_bad_behaviour_shard_naming_file_and_member(tmp_path, capsys, corrupt):
    from tests.conftest import tiny_mindeye2

    src = tiny_mindeye2(tmp_path / "src")
    shard = src / "wds" / "subj01" / "train" / "1.tar"
    expected = []
    _rewrite_tar(shard, lambda members: (lambda r: (expected.append(r[1]), r[0])[1])(corrupt(members)))
    assert _prepare(src, tmp_path / "out") == 2
    line = _one_line_error(capsys)
    assert str(shard) in line and expected[0] in line, line
    assert not (tmp_path / "out" / "subj01" / "meta.json").exists()


@pytest.mark.parametrize("sessions", ["0", "-1"])
def test_importer_refuses_sessions_below_one(tmp_path, capsys, sessions):
    from tests.conftest import tiny_mindeye2

    src = tiny_mindeye2(tmp_path / "src")
    assert _prepare(src, tmp_path / "out", "--sessions", sessions) == 2
    assert f"--sessions {sessions}" in _one_line_error(capsys)
    assert not (tmp_path / "out" / "subj01").exists()


def test_voxel_count_error_names_the_option_for_non_nsd_data(tmp_path, capsys):
    import json

    from tests.conftest import tiny_mindeye2

    src = tiny_mindeye2(tmp_path / "src")
    layout = json.loads((src / "synthetic_layout.json").read_text())
    layout["voxels"]["subj01"] = 65
    (src / "synthetic_layout.json").write_text(json.dumps(layout))
    assert _prepare(src, tmp_path / "out") == 2
    assert "--no-voxel-check" in _one_line_error(capsys)
    assert _prepare(src, tmp_path / "out", "--no-voxel-check") == 0


# ------------------------------------------------------------------------------------------------ item 1: captions
def _sample_captions(subject_dir: Path) -> list[list[str]]:
    import json

    from datamodules.shard_format import read_tar_members

    members = read_tar_members(subject_dir / "train" / "session-01.tar")
    return [json.loads(v)["captions"] for k, v in sorted(members.items()) if k.endswith(".json")]


def test_a_captions_path_that_does_not_exist_is_refused(tmp_path, capsys):
    from tests.conftest import tiny_mindeye2

    src = tiny_mindeye2(tmp_path / "src")
    assert _prepare(src, tmp_path / "out", "--captions", str(tmp_path / "typo.json")) == 2
    line = _one_line_error(capsys)
    assert "--captions" in line and "typo.json" in line
    assert not (tmp_path / "out" / "subj01" / "meta.json").exists()


def test_no_captions_warns_text_targets_refuse_and_a_rerun_with_captions_rewrites(tmp_path, tiny_models):
    from datamodules.mindeye2_import import import_mindeye2
    from lightning_modules.target_caching import cache_targets
    from tests.conftest import tiny_mindeye2

    src = tiny_mindeye2(tmp_path / "src")
    captions = tmp_path / "captions.json"
    (src / "coco_captions.json").rename(captions)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="without captions"):
        import_mindeye2(src, out, [1], progress=False)
    assert all(c == [] for c in _sample_captions(out / "subj01"))
    # a text target over it would be the embedding of "" for every image: refused before any model runs
    with pytest.raises(DataFormatError, match=r"subj01: (\d+) of \1 images"):
        cache_targets(out, [1], tmp_path / "targets", text_model=str(tiny_models))
    assert not (tmp_path / "targets").exists()
    # the captions are part of the import's state: re-running with them rewrites the samples
    with pytest.warns(UserWarning, match="captions differ from the previous import: rewriting"):
        import_mindeye2(src, out, [1], captions=captions, progress=False)
    assert all(c for c in _sample_captions(out / "subj01"))
    state = __import__("json").loads((out / "subj01" / ".import_state.json").read_text())
    assert state["captions"]["file"] == str(captions.resolve()) and len(state["captions"]["sha256"]) == 64
    cache_targets(out, [1], tmp_path / "targets", text_model=str(tiny_models))  # now it has words to embed
