"""Hardening of the data layer, the command doors and concurrent runs (issue 13, part B): every bad input is one
line naming the file, member, key or option, exit status 2; nothing silently wrong; no run clobbers another."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.common import DataFormatError, run_command

# imported before capsys swaps stderr: Lightning's log handlers keep the real one
from experiments import run as run_cli

REPO = Path(__file__).resolve().parent.parent
STAGE1 = ["--config", str(REPO / "configs/base/trainer.yaml"), "--config", str(REPO / "configs/stage1/tiny_synthetic.yaml")]


def _one_line_error(capsys) -> str:
    """The one ``error:`` line on stderr, the last one (progress and log lines may precede it); no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


# ------------------------------------------------------------------------------------------- item 6: CLI errors
@pytest.mark.slow
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


@pytest.mark.slow
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
    from experiments.caching.targets import cache_targets
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


# --------------------------------------------------------------- items 3, 5 and 7: the data module and its cache
def _tiny_data(root: Path, seed: int = 0) -> Path:
    from datamodules.synthetic import SyntheticNSDConfig, generate

    cfg = SyntheticNSDConfig(seed=seed, voxels=(64,), num_sessions=2, trials_per_session=30, num_test_images=5,
                             image_size=16)
    generate(cfg, root)
    return root


def _rewrite_voxels(shard: Path, change) -> None:
    """Rewrite a session shard of ours with ``change(voxels)`` applied to every sample (a re-import)."""
    import io

    import numpy as np

    from datamodules.shard_format import encode_npy

    def edit(members):
        return [(n, encode_npy(change(np.load(io.BytesIO(d)))) if n.endswith(".voxels.npy") else d)
                for n, d in members]

    _rewrite_tar(shard, edit)


def _val_voxels(data: Path, **kw):
    from datamodules import NSDDataModule

    dm = NSDDataModule(str(data), subjects=["subj01"], batch_size=4, num_workers=0, val_images=5, **kw)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()[0]))
    return batch["voxels"][batch["repeat_mask"]], dm


def test_the_validation_cache_is_rebuilt_when_the_shards_change(tmp_path):
    data = _tiny_data(tmp_path / "data")
    before, _ = _val_voxels(data, val_cache_dir=str(tmp_path / "vc"))
    for shard in (data / "subj01" / "train").glob("*.tar"):  # re-imported: same trials, other voxels
        _rewrite_voxels(shard, lambda v: -v)
    after, _ = _val_voxels(data, val_cache_dir=str(tmp_path / "vc"))
    assert before.abs().sum() > 0 and (after == -before).all()


@pytest.mark.parametrize("option, value", [
    ("batch_size", -1), ("batch_size", 0), ("batch_size", {"subj01": 0}), ("eval_batch_size", 0),
    ("num_workers", -1), ("samples_per_epoch", 0), ("val_images", -3), ("num_sessions", 0),
    ("shuffle_buffer", 0), ("shuffle_initial", -1), ("seed", -1), ("batch_size", 2.5)])
def test_every_numeric_datamodule_argument_is_checked_at_construction(option, value):
    from datamodules import NSDDataModule

    with pytest.raises(DataFormatError, match=rf"data\.{option}.* must be an integer >= \d"):
        NSDDataModule("/nonexistent", subjects=["subj01"], **{option: value})


def test_a_session_shard_with_another_voxel_count_is_one_line_naming_it(tmp_path):
    import numpy as np

    data = _tiny_data(tmp_path / "data")
    shard = data / "subj01" / "train" / "session-02.tar"
    _rewrite_voxels(shard, lambda v: np.concatenate([v, v[:3]]))
    with pytest.raises(DataFormatError, match=rf"shard {shard} \(key [^)]+\) has 67 voxels, .*meta.json says 64"):
        _val_voxels(data, val_cache_dir=str(tmp_path / "vc"))


def test_a_missing_session_shard_is_called_missing(tmp_path):
    data = _tiny_data(tmp_path / "data")
    shard = data / "subj01" / "train" / "session-01.tar"
    shard.unlink()
    with pytest.raises(DataFormatError, match=rf"shard {shard} is missing") as info:
        _val_voxels(data, val_cache_dir=str(tmp_path / "vc"))
    assert "corrupt" not in str(info.value)


def test_fit_does_not_need_a_writable_data_dir(tmp_path, monkeypatch):
    """Tests run as root, and root ignores permission bits, so here the writability check itself reports
    data_dir as read-only (what its real attempt returns on a read-only mount; the next test uses a real read-only
    mount where the system allows one): the validation shard goes below the trainer's root directory (here, with
    no trainer, the user cache directory); with nothing writable the error names the option."""
    import datamodules.nsd as nsd

    data = _tiny_data(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(nsd, "writable_dir", lambda p: not Path(p).is_relative_to(data), raising=False)
    voxels, dm = _val_voxels(data)
    assert not (data / "val_cache").exists()
    assert list((tmp_path / "cache" / "morebrain" / "val_cache" / "subj01").glob("val-*.tar"))
    again, _ = _val_voxels(data)  # found there again (no rebuild needed)
    assert (again == voxels).all()
    monkeypatch.setattr(nsd, "writable_dir", lambda p: False)
    with pytest.raises(DataFormatError, match=r"not writable \(set data.val_cache_dir"):
        _val_voxels(data, val_cache_dir=str(tmp_path / "elsewhere"))


_READ_ONLY_PROBE = """
import json, sys
from pathlib import Path
from datamodules import NSDDataModule
from datamodules.common import run_command
from experiments.prepare_nsd import main
data, src, cache = map(Path, sys.argv[1:4])
dm = NSDDataModule(str(data), subjects=["subj01"], batch_size=4, num_workers=0, val_images=5)
dm.prepare_data()
dm.setup("fit")
batch = next(iter(dm.val_dataloader()[0]))
status = run_command(main, ["--mindeye2-root", str(src), "--out", str(data / "out"), "--subjects", "1", "--quiet"])
print(json.dumps({"val": [str(p) for p in cache.rglob("val-*.tar")], "rows": int(batch["valid"].sum()),
                  "status": status}))
"""


def _read_only_mounts_work(path: Path) -> bool:
    probe = f"mount --bind {path} {path} && mount -o remount,bind,ro {path} && ! touch {path}/probe 2>/dev/null"
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_on_a_real_read_only_mount_fit_data_works_and_output_is_one_line(tmp_path):
    """A real read-only bind mount of the dataset (a mount namespace of a child process; root cannot write there
    either): the validation shard goes to the user cache directory, and an import into it is one line naming the
    path and exit status 2."""
    import json

    from tests.conftest import tiny_mindeye2

    data = _tiny_data(tmp_path / "ro" / "data")
    src = tiny_mindeye2(tmp_path / "src")
    if not _read_only_mounts_work(tmp_path / "ro"):
        pytest.skip("no mount namespaces here (unshare -m): the read-only check is covered by the test above")
    ro = tmp_path / "ro"
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
              f"exec {sys.executable} -c '{_READ_ONLY_PROBE}' {data} {src} {tmp_path / 'cache'}")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "MOREBRAIN_DEBUG": ""}
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rows"] == 5 and len(report["val"]) == 1, report  # the 5 validation images
    assert not (data / "val_cache").exists()
    assert report["status"] == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {data / 'out'}"), result.stderr
    assert "Read-only file system" in errors[0] and "Traceback" not in result.stderr


# ---------------------------------------------------------------------- item 5: a checkpoint of the other stage
@pytest.mark.parametrize("saved, configs, wanted", [
    ("lightning_modules.RoutedDiffusionModule", STAGE1, "stage 1"),
    ("lightning_modules.BrainEncoderModule",
     ["--config", str(REPO / "configs/base/stage2_trainer.yaml"), "--config", str(REPO / "configs/stage2/tiny_synthetic.yaml")],
     "stage 2"),
], ids=["stage2-ckpt-to-stage1", "stage1-ckpt-to-stage2"])
def test_a_checkpoint_of_the_other_stage_is_refused_before_the_trainer_runs(tmp_path, capsys, saved, configs, wanted):
    """The check reads what a Lightning checkpoint records of its module (``hyper_parameters._class_path``, which
    LightningCLI writes); the file here holds only that (and an empty state dict), so the test runs no stage."""
    import torch

    ckpt = tmp_path / "other.ckpt"
    torch.save({"hyper_parameters": {"_class_path": saved}, "state_dict": {}, "epoch": 0}, ckpt)
    args = ["fit", *configs, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert run_command(run_cli.main, args) == 2
    line = _one_line_error(capsys)
    assert f"--ckpt_path {ckpt} is a" in line and saved in line and f"({wanted})" in line, line
    assert not list(tmp_path.rglob("events.out.*"))


# ------------------------------------------------------------------------------------- item 8: concurrent runs
@pytest.fixture()
def live_pid():
    """The pid of a live process on this host (another run)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock(path: Path, pid: int, host: str | None = None) -> None:
    import json

    from datamodules.common import HOST

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host or HOST, "slurm_job_id": None, "started": "then"}))


def test_a_second_import_into_one_output_is_refused_and_the_first_keeps_its_temporaries(tmp_path, capsys, live_pid):
    from datamodules.common import HOST
    from tests.conftest import tiny_mindeye2

    src = tiny_mindeye2(tmp_path / "src")
    subject = tmp_path / "out" / "subj01"
    _lock(subject / ".import.lock", live_pid)
    theirs = subject / "train" / f".session-01.tar.{HOST}.{live_pid}.tmp"  # the other run's half-written shard
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"in progress")
    assert _prepare(src, tmp_path / "out") == 2
    line = _one_line_error(capsys)
    assert f"another import is writing here (pid {live_pid}, host {HOST}" in line and ".import.lock" in line
    assert theirs.read_bytes() == b"in progress"
    # on another host the pid cannot be checked: respected as well
    _lock(subject / ".import.lock", 1, host="other-node")
    assert _prepare(src, tmp_path / "out") == 2 and "host other-node" in _one_line_error(capsys)


def test_a_stale_import_lock_is_taken_over_and_released(tmp_path):
    from tests.conftest import tiny_mindeye2

    src = tiny_mindeye2(tmp_path / "src")
    lock = tmp_path / "out" / "subj01" / ".import.lock"
    _lock(lock, _dead_pid())  # a killed import
    assert _prepare(src, tmp_path / "out") == 0
    assert (tmp_path / "out" / "subj01" / "meta.json").exists() and not lock.exists()


def test_temporary_names_hold_host_and_pid(tmp_path):
    from datamodules.common import HOST, atomic_path

    with atomic_path(tmp_path / "x.bin") as tmp:
        assert tmp.name == f".x.bin.{HOST}.{os.getpid()}.tmp"
        tmp.write_bytes(b"1")


@pytest.mark.slow
def test_a_second_fit_into_a_live_runs_version_directory_is_refused(small_data, targets, tmp_path, capsys, live_pid):
    base = ["fit", *STAGE1, f"--data.init_args.data_dir={small_data}", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.version=run",
            f"--data.init_args.val_cache_dir={tmp_path / 'vc'}", "--data.init_args.val_images=8",
            "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]
    version_dir = tmp_path / "stage1_tiny" / "run"
    _lock(version_dir / ".run.lock", live_pid)
    assert run_command(run_cli.main, base) == 2
    line = _one_line_error(capsys)
    assert f"another fit is writing here (pid {live_pid}" in line and str(version_dir / ".run.lock") in line, line
    assert not list(version_dir.rglob("*.ckpt")) and not list(version_dir.glob("events.out.*"))
    _lock(version_dir / ".run.lock", _dead_pid())  # that run was killed: resuming it takes the lock over
    assert run_command(run_cli.main, base) == 0
    assert list(version_dir.rglob("*.ckpt")) and not (version_dir / ".run.lock").exists()  # released at the end


# ------------------------------------------------------------------------------------- item 4: evaluation input
def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from experiments.evaluation.inputs import read_image

    rng = np.random.default_rng(0)
    wide = rng.integers(0, 65536, (24, 24), dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "1.png")
    with Image.open(tmp_path / "1.png") as pil:
        assert pil.mode.startswith("I")  # really stored as 16 bits
    image = read_image(tmp_path / "1.png")
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 0], np.round(wide / 257).astype(np.uint8))
    assert image.std() > 50  # not the near-constant white that clipping gives


def _eval_args(small_data, recons, tmp_path):
    return ["--recons", str(recons), "--data", str(small_data), "--subjects", "1", "--bootstrap", "0",
            "--metrics", "pixcorr", "--out", str(tmp_path / "out")]


def test_duplicate_reconstruction_ids_are_refused_by_name(small_data, tmp_path, capsys):
    from experiments.evaluate import main
    from tests.test_evaluation import fake_reconstructions

    recons = tmp_path / "recons"
    fake_reconstructions(small_data, recons, noise_every=0)
    first = sorted((recons / "subj01" / "images").iterdir())[0]
    twin = first.with_name(f"{int(first.stem)}.png")  # 00012.png and 12.png
    twin.write_bytes(first.read_bytes())
    assert run_command(main, _eval_args(small_data, recons, tmp_path)) == 2
    line = _one_line_error(capsys)
    assert first.name in line and twin.name in line and f"nsd_id {int(first.stem)}" in line, line


def test_a_corrupt_reconstruction_is_one_line_naming_the_file(small_data, tmp_path, capsys):
    from experiments.evaluate import main
    from tests.test_evaluation import fake_reconstructions

    recons = tmp_path / "recons"
    fake_reconstructions(small_data, recons, noise_every=0)
    bad = sorted((recons / "subj01" / "images").iterdir())[3]
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    assert run_command(main, _eval_args(small_data, recons, tmp_path)) == 2
    line = _one_line_error(capsys)
    assert f"cannot read {bad}" in line, line
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_a_training_shard_with_another_voxel_count_is_one_line_naming_it(tmp_path):
    """Every sample of the shard is wider (so a batch is consistent in itself): checked against meta.json."""
    import numpy as np

    from datamodules import NSDDataModule

    data = _tiny_data(tmp_path / "data")
    shard = data / "subj01" / "train" / "session-01.tar"
    _rewrite_voxels(shard, lambda v: np.concatenate([v, v[:3]]))
    dm = NSDDataModule(str(data), subjects=["subj01"], num_sessions=1, batch_size=4, num_workers=0, val_images=0)
    dm.prepare_data()
    dm.setup("fit")
    with pytest.raises(DataFormatError, match=rf"shard {shard} \(key [^)]+\) has 67 voxels, its meta.json says 64"):
        next(iter(dm.train_dataloader()))


def test_an_import_state_from_before_captions_were_recorded_is_kept_not_rewritten(tmp_path):
    """A complete import of an older version (no captions in its state) is not rewritten by a re-run (it may be
    hours of work); the re-run says so."""
    import json

    from datamodules.mindeye2_import import import_mindeye2
    from tests.conftest import tiny_mindeye2

    src = tiny_mindeye2(tmp_path / "src")
    out = tmp_path / "out"
    import_mindeye2(src, out, [1], progress=False)
    state_path = out / "subj01" / ".import_state.json"
    state = json.loads(state_path.read_text())
    state.pop("captions", None), state.pop("categories", None)
    state_path.write_text(json.dumps(state))
    shard = out / "subj01" / "train" / "session-01.tar"
    mtime = shard.stat().st_mtime_ns
    with pytest.warns(UserWarning, match="imported before its captions were recorded"):
        import_mindeye2(src, out, [1], progress=False)
    assert shard.stat().st_mtime_ns == mtime


def test_with_a_trainer_the_validation_shard_of_a_read_only_data_dir_goes_below_its_root(tmp_path, monkeypatch):
    """As above (the check reports data_dir read-only), with a Trainer: below ``trainer.default_root_dir``."""
    import lightning as L

    import datamodules.nsd as nsd
    from datamodules import NSDDataModule

    data = _tiny_data(tmp_path / "data")
    monkeypatch.setattr(nsd, "writable_dir", lambda p: not Path(p).is_relative_to(data), raising=False)
    dm = NSDDataModule(str(data), subjects=["subj01"], batch_size=4, num_workers=0, val_images=5)
    dm.trainer = L.Trainer(default_root_dir=str(tmp_path / "run"), logger=False, enable_checkpointing=False,
                           enable_progress_bar=False)
    dm.prepare_data()
    dm.setup("fit")
    assert next(iter(dm.val_dataloader()[0]))["valid"].sum() == 5
    assert not (data / "val_cache").exists()
    assert len(list((tmp_path / "run" / "val_cache" / "subj01").glob("val-*.tar"))) == 1
