"""Stage 2 through the real entry point on the tiny config: fit, TensorBoard logs, predict, resume of predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.run import cli_main

REPO = Path(__file__).resolve().parent.parent
BASE = str(REPO / "configs" / "base" / "stage2_trainer.yaml")
TINY = str(REPO / "configs" / "stage2" / "tiny_synthetic.yaml")


def overrides(data: Path, models: Path, ckpts: dict[str, Path], logs: Path, version: str) -> list[str]:
    return ["--config", BASE, "--config", TINY, f"--data.init_args.data_dir={data}",
            "--data.init_args.val_images=4", f"--data.init_args.val_cache_dir={logs / 'val_cache'}",
            "--data.init_args.samples_per_epoch=16", "--data.init_args.batch_size=4",
            "--data.init_args.eval_batch_size=8", f"--model.init_args.sdxl_dir={models}",
            f"--model.init_args.image_encoder={ckpts['image']}", f"--model.init_args.text_encoder={ckpts['text']}",
            "--model.init_args.inference_steps=3", f"--trainer.default_root_dir={logs}",
            f"--trainer.logger.init_args.save_dir={logs}", f"--trainer.logger.init_args.version={version}",
            "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--trainer.max_epochs=1"]


@pytest.fixture(scope="module")
def fitted(small_data, tiny_models, stage1_checkpoints, tmp_path_factory):
    logs = tmp_path_factory.mktemp("stage2_runs")
    args = overrides(small_data, tiny_models, stage1_checkpoints, logs, "fit")
    cli_main(["fit", *args])
    return logs, args


def test_tiny_fit_writes_adapter_checkpoint_config_and_tensorboard(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs, _ = fitted
    run = logs / "stage2_tiny" / "fit"
    assert (run / "config.yaml").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["provenance"]["resolved_config"] and ckpt["provenance"]["subjects"] == ["subj01"]
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in ckpt["state_dict"])
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/diffusion_loss", "train/kl_image", "train/kl_text", "val/diffusion_loss",
            "train/image_level0_weight"} <= scalars
    assert "val/truth_vs_reconstruction" in events.Tags()["images"]


def test_predict_writes_reconstructions_and_routing_and_resumes(fitted, small_data):
    logs, args = fitted
    ckpt = logs / "stage2_tiny" / "fit" / "checkpoints" / "last.ckpt"
    predict_args = [*args[:-4], "--trainer.logger.init_args.version=predict", f"--ckpt_path={ckpt}"]
    cli_main(["predict", *predict_args])
    out = logs / "stage2_tiny" / "predict" / "reconstructions" / "subj01"
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 20  # every shared test image of the small dataset
    recons, ids = np.load(out / "reconstructions.npy"), np.load(out / "ids.npy")
    assert recons.shape == (20, 3, 32, 32) and recons.dtype == np.uint8
    assert list(ids) == sorted(int(p.stem) for p in pngs)
    routing = np.load(out / "routing" / f"{ids[0]:05d}.npz")
    assert routing["image_level_weights"].shape == (3, 4)
    assert routing["text_spatial_level2"].shape == (3, 16, 8)
    assert len(routing["timesteps"]) == 3
    first = {p.name: p.read_bytes() for p in pngs}
    kept = {p.name: p.stat().st_mtime_ns for p in pngs[3:]}
    for p in pngs[:3]:
        p.unlink()
    cli_main(["predict", *predict_args])
    assert {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))} == first  # deterministic
    assert {p.name: p.stat().st_mtime_ns for p in pngs[3:]} == kept  # done images were skipped
    assert np.array_equal(np.load(out / "reconstructions.npy"), recons)
