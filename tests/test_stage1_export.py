"""The stage-1 export (``python -m experiments.export_stage1``): weights-only safetensors plus the config and
provenance that rebuild the module; stage 2's frozen encoders read it bit-identically to the checkpoint; bad input
is one line naming the option and exit status 2."""

from __future__ import annotations

import builtins
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datamodules.common import file_sha256
from datamodules.shard_format import FORMAT_VERSION
from experiments._cli import run_main
from experiments.export_stage1 import main
from lightning_modules.stage1_conditions import FrozenStage1
from lightning_modules.stage1_files import CONFIG, WEIGHTS, Stage1FileError


@pytest.fixture(scope="module")
def exported(stage1_checkpoints, tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny image stage-1 checkpoint, its export directory)."""
    ckpt, out = stage1_checkpoints["image"], tmp_path_factory.mktemp("export") / "stage1_image"
    assert run_main(main, ["--checkpoint", str(ckpt), "--out", str(out)]) == 0
    return ckpt, out


def _refused(capsys, argv: list[str]) -> str:
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_the_export_holds_the_state_dict_and_config_but_no_optimizer_state(exported, capsys):
    ckpt_path, out = exported
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["optimizer_states"] and ckpt["optimizer_states"][0]["state"]  # there is Adam state to leave out
    state = load_file(out / WEIGHTS)
    assert sorted(state) == sorted(ckpt["state_dict"])  # the module's tensors, nothing else
    assert all(torch.equal(state[k], v) for k, v in ckpt["state_dict"].items())
    assert {k.split(".")[0] for k in state} >= {"adapters", "moe", "prior"}
    assert sum(t.numel() for t in state.values()) == sum(t.numel() for t in ckpt["state_dict"].values())

    config = json.loads((out / CONFIG).read_text())
    assert config["hyper_parameters"] == json.loads(json.dumps(ckpt["hyper_parameters"]))
    assert config["num_voxels"] == ckpt["hyper_parameters"]["num_voxels"] == {"subj01": 300, "subj02": 240,
                                                                              "subj03": 360}
    assert (config["target"], config["prior_inputs"], config["has_prior"]) == ("clip_image", ["mean", "experts"], True)
    assert config["weights_sha256"] == file_sha256(out / WEIGHTS)
    record, source = config["provenance"], ckpt["provenance"]
    assert record["data_format_version"] == source["data_format_version"] == FORMAT_VERSION
    assert record["resolved_config"] == source["resolved_config"] and "model:" in record["resolved_config"]
    assert record["created"] == source["created"] and record["exported"]["created"] >= source["created"]
    assert record["source_checkpoint"] == str(ckpt_path.resolve())
    assert record["source_checkpoint_sha256"] == hashlib.sha256(ckpt_path.read_bytes()).hexdigest()
    assert record["source_global_step"] == ckpt["global_step"] > 0

    # exporting again replaces the export in place and leaves no temporary sibling
    assert run_main(main, ["--checkpoint", str(ckpt_path), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    assert sorted(p.name for p in out.iterdir()) == [CONFIG, WEIGHTS]


@pytest.mark.parametrize("source", ["prior", "clip"])
def test_stage2s_frozen_encoder_from_the_export_matches_the_checkpoint_bit_for_bit(exported, source):
    ckpt, out = exported
    kw = dict(source=source, prior_steps=3, prior_guidance=1.5, prior_seed=2)
    reference = FrozenStage1(str(ckpt), "model.image_encoder", **kw)
    voxels = torch.randn(3, 2, 240, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    expected = reference(voxels, "subj02", mask)
    for path in (out, out / WEIGHTS):
        encoder = FrozenStage1(str(path), "model.image_encoder", **kw)
        assert encoder.num_voxels == reference.num_voxels and encoder.num_experts == reference.num_experts
        got = encoder(voxels, "subj02", mask)
        assert [g.shape for g in got] == [e.shape for e in expected]
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_a_damaged_export_is_one_line_naming_the_option(exported, tmp_path):
    _, out = exported
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG).write_text((out / CONFIG).read_text())
    weights = (out / WEIGHTS).read_bytes()
    (broken / WEIGHTS).write_bytes(weights[:-100] + bytes(100))  # damaged body: the recorded sha256 catches it
    cases = [("does not match the sha256", None)]
    cases.append(("not a readable safetensors file", lambda: (broken / WEIGHTS).write_bytes(b"\xff" * 64)))
    cases.append(("no config.json", lambda: (broken / CONFIG).unlink()))
    for expected, damage in cases:
        if damage is not None:
            damage()
            if (broken / CONFIG).is_file():  # re-seal the config so the parse itself is what fails
                config = json.loads((broken / CONFIG).read_text())
                config["weights_sha256"] = file_sha256(broken / WEIGHTS)
                (broken / CONFIG).write_text(json.dumps(config))
        with pytest.raises(Stage1FileError, match=f"^model.text_encoder: .*{expected}") as err:
            FrozenStage1(str(broken), "model.text_encoder", "clip")
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="model.text_encoder: no stage-1 checkpoint"):
        FrozenStage1(str(tmp_path / "absent"), "model.text_encoder", "clip")


def test_the_export_door_refuses_bad_input_with_one_line_and_status_2(exported, tmp_path, capsys):
    ckpt, out = exported
    target = str(tmp_path / "out")
    assert "--checkpoint" in _refused(capsys, ["--checkpoint", str(tmp_path / "none.ckpt"), "--out", target])
    assert "--checkpoint" in _refused(capsys, ["--checkpoint", str(out), "--out", target])  # an export, not a ckpt
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a zip archive" * 10)
    assert "--checkpoint: " in _refused(capsys, ["--checkpoint", str(garbage), "--out", target])

    marker, crafted = tmp_path / "payload_ran", tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, crafted)
    err = _refused(capsys, ["--checkpoint", str(crafted), "--out", target])
    assert "--checkpoint" in err and "weights_only" in err and not marker.exists()

    other = tmp_path / "run_dir"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "clip"}')  # a directory of something else is kept
    assert "--out: " in _refused(capsys, ["--checkpoint", str(ckpt), "--out", str(other)])
    assert [p.name for p in other.iterdir()] == ["config.json"]
    assert not Path(target).exists()


def test_a_failed_export_leaves_the_previous_export_and_no_temporary(exported, tmp_path, monkeypatch):
    ckpt, out = exported
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (CONFIG, WEIGHTS):
        (copy / name).write_bytes((out / name).read_bytes())

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError, match="No space"):
        run_main(main, ["--checkpoint", str(ckpt), "--out", str(copy)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    assert (copy / WEIGHTS).read_bytes() == (out / WEIGHTS).read_bytes()


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: the file appears only if the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_stage2_through_the_cli_refuses_a_damaged_export_with_status_2(exported, small_data, tiny_models,
                                                                      stage1_checkpoints, tmp_path, capsys):
    from datamodules.common import run_command
    from experiments.run import main as run
    from tests.test_stage2_cli import overrides

    _, out = exported
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG).write_text((out / CONFIG).read_text())
    (broken / WEIGHTS).write_bytes(b"\0" * 16)
    args = overrides(small_data, tiny_models, {"image": broken, "text": stage1_checkpoints["text"]}, tmp_path, "x")
    assert run_command(run, ["fit", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model.image_encoder: ") and "sha256" in err, err
