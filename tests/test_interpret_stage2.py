"""Stage-2 interpretability commands on the tiny config: temporal routing (router outputs alone, the KL target in
its own panel) and spatial routing (per-expert maps over the denoising trajectory, from a predict output or
reconstructed here), each end to end through ``python -m experiments.interpret``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.run import cli_main

REPO = Path(__file__).resolve().parent.parent
BASE = str(REPO / "configs" / "base" / "stage2_trainer.yaml")
TINY = str(REPO / "configs" / "stage2" / "tiny_synthetic.yaml")


def interpret(args: list[str]) -> int:
    """``python -m experiments.interpret ARGS`` in this process: its exit status (bad input: 2, one line)."""
    from experiments._cli import run_main
    from experiments.interpret import main

    return run_main(main, args)


@pytest.fixture(scope="module")
def stage2_run(small_data, tiny_models, stage1_checkpoints, tmp_path_factory):
    """A one-step tiny stage-2 fit and a predict of 2 test images with 2 denoising steps: (configs, checkpoint,
    predict subject directory)."""
    logs = tmp_path_factory.mktemp("interpret_stage2")
    local = logs / "local.yaml"  # the run's own paths, as a user's extra config file
    local.write_text(
        f"model:\n  init_args:\n    sdxl_dir: {tiny_models}\n    image_encoder: {stage1_checkpoints['image']}\n"
        f"    text_encoder: {stage1_checkpoints['text']}\n    inference_steps: 2\n"
        f"data:\n  init_args:\n    data_dir: {small_data}\n    val_images: 0\n    samples_per_epoch: 4\n"
        f"    batch_size: 4\n    eval_batch_size: 2\n")
    configs = [BASE, TINY, str(local)]
    common = config_args(configs) + [
        f"--trainer.default_root_dir={logs}", f"--trainer.logger.init_args.save_dir={logs}",
        "--trainer.enable_progress_bar=false"]
    cli_main(["fit", *common, "--trainer.logger.init_args.version=fit", "--trainer.max_epochs=1"])
    ckpt = logs / "stage2_tiny" / "fit" / "checkpoints" / "last.ckpt"
    cli_main(["predict", *common, "--trainer.logger.init_args.version=predict", f"--ckpt_path={ckpt}",
              "--trainer.limit_predict_batches=1"])
    return configs, ckpt, logs / "stage2_tiny" / "predict" / "reconstructions" / "subj01"


def config_args(configs: list[str]) -> list[str]:
    return [a for c in configs for a in ("--config", c)]


def test_temporal_routing_is_the_router_alone_with_the_kl_target_beside(stage2_run, tiny_models, tmp_path):
    from callbacks.routing_statistics import curve_image
    from experiments.interpretability.temporal_routing import temporal_figure

    configs, ckpt, _ = stage2_run
    out = tmp_path / "temporal"
    assert interpret(["temporal", *config_args(configs), "--ckpt", str(ckpt), "--out", str(out)]) == 0
    for name in ("temporal_routing.npz", "temporal_routing.csv", "temporal_routing_bins.csv",
                 "temporal_routing.png", "report.html"):
        assert (out / name).is_file(), name
    assert "temporal_routing.png" in (out / "report.html").read_text()
    arrays = dict(np.load(out / "temporal_routing.npz"))
    t = arrays["timesteps"]
    assert list(t) == list(range(1000))

    # the router called directly, from the checkpoint's raw weights (no module): softmax(q(emb(t)) . keys / sqrt(d))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    from diffusers.models.embeddings import get_timestep_embedding

    unet = json.loads((tiny_models / "unet" / "config.json").read_text())

    emb = get_timestep_embedding(torch.arange(1000), unet["block_out_channels"][0],
                                 flip_sin_to_cos=unet["flip_sin_to_cos"], downscale_freq_shift=unet["freq_shift"])
    levels = np.arange(4)
    centre = 3 * (1 - t / 1000)  # the module's KL target: coarse_first, t_lo 0, t_hi 1000, sigma 1
    target = np.exp(-((levels[None] - centre[:, None]) ** 2) / 2)
    target /= target.sum(1, keepdims=True)
    for branch in ("image", "text"):
        w, b = state[f"{branch}_router.temporal.query.weight"], state[f"{branch}_router.temporal.query.bias"]
        keys = state[f"{branch}_router.temporal.level_keys"]
        direct = ((emb @ w.T + b) @ keys.T / np.sqrt(keys.shape[1])).softmax(-1).numpy()
        np.testing.assert_allclose(arrays[f"{branch}_weights"], direct, atol=1e-5)
        np.testing.assert_allclose(arrays[f"{branch}_weights"].sum(1), 1, atol=1e-5)  # nothing multiplied in
        np.testing.assert_allclose(arrays[f"{branch}_target"], target, atol=1e-6)
        np.testing.assert_allclose(arrays[f"{branch}_weights_binned"][0], direct[:50].mean(0), atol=1e-5)
    # the figure is drawn from those arrays alone: router panel and target panel side by side
    png = np.asarray(Image.open(out / "temporal_routing.png").convert("RGB"))
    assert np.array_equal(png, temporal_figure(arrays, ["image", "text"]))
    router_panel = curve_image(torch.from_numpy(t), torch.from_numpy(arrays["image_weights"]), "image router")
    assert np.array_equal(png[:router_panel.shape[0], :router_panel.shape[1]], router_panel)


def test_spatial_routing_from_a_predict_output_draws_every_expert_over_the_trajectory(stage2_run, tmp_path):
    configs, _, predict = stage2_run
    out = tmp_path / "spatial"
    ids = sorted(int(p.stem) for p in (predict / "routing").glob("*.npz"))
    assert len(ids) == 2
    assert interpret(["spatial", *config_args(configs), "--predict-dir", str(predict.parent), "--steps", "2",
                      "--out", str(out)]) == 0
    report = (out / "report.html").read_text()
    for i in ids:
        for branch in ("image", "text"):
            for kind in ("recon", "truth", "winners"):
                name = f"spatial_subj01_{i:05d}_{branch}_{kind}.png"
                assert (out / name).is_file() and name in report, name
        saved = np.load(out / "spatial_routing" / f"subj01_{i:05d}.npz")
        written = np.load(predict / "routing" / f"{i:05d}.npz")
        for level in range(4):
            for branch in ("image", "text"):
                key = f"{branch}_spatial_level{level}"
                assert np.array_equal(saved[key], written[key]), key
        assert saved["image_spatial_level3"].shape == (2, 16, 16)
        assert list(saved["steps_shown"]) == [0, 1]
        recon = np.asarray(Image.open(predict / "images" / f"{i:05d}.png").convert("RGB"))
        assert np.array_equal(saved["reconstruction"], recon) and saved["truth"].shape == recon.shape
    assert (out / "spatial_routing_summary.csv").read_text().count("\n") == 1 + len(ids) * 2 * (2 + 4 + 8 + 16)


def test_spatial_routing_reconstructs_chosen_ids_like_predict(stage2_run, tmp_path):
    configs, ckpt, predict = stage2_run
    i = sorted(int(p.stem) for p in (predict / "routing").glob("*.npz"))[-1]
    out = tmp_path / "spatial_here"
    assert interpret(["spatial", *config_args(configs), "--ckpt", str(ckpt), "--ids", str(i), "--out",
                      str(out)]) == 0
    saved = np.load(out / "spatial_routing" / f"subj01_{i:05d}.npz")
    written = np.load(predict / "routing" / f"{i:05d}.npz")
    np.testing.assert_allclose(saved["text_spatial_level2"], written["text_spatial_level2"], atol=1e-5)
    np.testing.assert_allclose(saved["timesteps"], written["timesteps"])
    assert (out / f"spatial_subj01_{i:05d}_image_truth.png").is_file()


def test_bad_input_names_the_option(stage2_run, tmp_path, capsys):
    configs, ckpt, predict = stage2_run
    cases = [(["temporal", *config_args(configs), "--ckpt", str(tmp_path / "none.ckpt")], "--ckpt"),
             (["spatial", *config_args(configs), "--predict-dir", str(tmp_path / "nothing")], "--predict-dir"),
             (["spatial", *config_args(configs), "--predict-dir", str(predict), "--ids", "99999"], "--ids"),
             (["spatial", *config_args(configs), "--predict-dir", str(predict), "--steps", "0"], "--steps")]
    for args, option in cases:
        assert interpret([*args, "--out", str(tmp_path / "out")]) == 2
        assert option in capsys.readouterr().err, option
