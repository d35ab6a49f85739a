"""A resumable study step is read back only when it was computed from the same inputs: the same arguments and
the same contents of the weights, checkpoints, caches and configs they name (a rebuilt world, refitted encoders
or re-cached targets at the same paths make it stale)."""

from __future__ import annotations

import json

import numpy as np

from experiments.studies.step_inputs import RECORD, inputs_digest, is_current, start_step


def _inputs(tmp_path):
    world = tmp_path / "world"
    (world / "unet").mkdir(parents=True)
    (world / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights v1")
    (world / "world.json").write_text(json.dumps({"preset": "full"}))
    ckpt = tmp_path / "stage1.ckpt"
    ckpt.write_bytes(b"encoder v1")
    targets = tmp_path / "targets" / "clip_image"
    targets.mkdir(parents=True)
    np.save(targets / "values.npy", np.zeros((3, 4), np.float32))
    config = tmp_path / "stage2.yaml"
    config.write_text("model: {}\n")
    out = tmp_path / "out"
    out.mkdir()
    args = ["--config", str(config), f"--model.init_args.sdxl_dir={world}",
            f"--model.init_args.image_encoder={ckpt}",
            f"--model.init_args.condition_tables={{image: {targets}, text: {targets}}}",
            f"--trainer.logger.init_args.save_dir={out}", "--trainer.max_epochs=2"]
    return args, {"world": world, "ckpt": ckpt, "targets": targets, "config": config, "out": out}


def test_the_digest_follows_the_named_files_contents_and_the_arguments_not_the_outputs(tmp_path):
    args, paths = _inputs(tmp_path)
    digest = inputs_digest(args)
    (paths["out"] / "events.out.tfevents").write_bytes(b"a run's own output")
    (paths["out"] / "last.ckpt").write_bytes(b"the run's checkpoint")
    assert inputs_digest(args) == digest  # the step's outputs are not its inputs
    assert inputs_digest([*args[:-1], "--trainer.max_epochs=3"]) != digest
    for change in (lambda: (paths["world"] / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"v2"),
                   lambda: paths["ckpt"].write_bytes(b"encoder v2"),
                   lambda: np.save(paths["targets"] / "values.npy", np.ones((3, 4), np.float32)),
                   lambda: paths["config"].write_text("model: {lr: 1}\n"),
                   lambda: (paths["world"] / "world.json").write_text("{}")):
        change()
        assert inputs_digest(args) != digest
        digest = inputs_digest(args)


def test_a_step_of_other_or_unrecorded_inputs_is_removed_and_one_of_the_same_inputs_kept(tmp_path):
    args, paths = _inputs(tmp_path)
    step = tmp_path / "runs" / "row" / "run"
    step.mkdir(parents=True)
    (step / "fit_done.json").write_text("{}")  # finished before inputs were recorded: not trusted
    lines = []
    digest = start_step(step, args, log=lines.append)
    assert not (step / "fit_done.json").exists() and is_current(step, digest) and len(lines) == 1
    assert str(step) in lines[0]
    (step / "fit_done.json").write_text("{}")
    assert start_step(step, args, log=lines.append) == digest  # same inputs: kept, resumes or reads back
    assert (step / "fit_done.json").is_file() and len(lines) == 1
    paths["ckpt"].write_bytes(b"a refitted encoder")
    start_step(step, args, log=lines.append)
    assert not (step / "fit_done.json").exists() and len(lines) == 2
    assert json.loads((step / RECORD).read_text())["args"] == args
