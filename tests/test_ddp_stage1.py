"""Stage 1 under a real two-process CPU DDP (gloo) fit through the entry point, one rank holding only padding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_ddp_data import REPO, free_port


def ddp_fit(data: Path, tmp_path: Path, *extra: str) -> Path:
    """A two-process CPU DDP fit of the tiny stage-1 config (2 epochs, validation every epoch) through the entry
    point, as a subprocess under ``timeout -k``; returns its run directory."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    cmd = ["timeout", "-k", "10", "300", sys.executable, "-m", "experiments.run", "fit",
           "--config", "configs/base/trainer.yaml", "--config", "configs/stage1/tiny_synthetic.yaml",
           f"--data.init_args.data_dir={data}", f"--data.init_args.val_cache_dir={tmp_path / 'vc'}",
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_epochs=2",
           "--trainer.check_val_every_n_epoch=1", f"--trainer.default_root_dir={tmp_path}",
           f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.version=ddp",
           "--trainer.enable_progress_bar=false", *extra]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=360)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / "stage1_tiny" / "ddp"


@pytest.fixture(scope="module")
def ddp_run(small_data, targets, tmp_path_factory) -> tuple[Path, Path]:
    """One two-process fit for the tests below: subjects 1 and 2 with three validation images each (one batch), so
    that rank 1 holds only a padding copy of every validation batch."""
    tmp_path = tmp_path_factory.mktemp("ddp_stage1")
    return ddp_fit(small_data, tmp_path, "--data.init_args.subjects=[subj01, subj02]",
                   f"--data.init_args.val_images={VAL_IMAGES}"), tmp_path


VAL_IMAGES = 3


def single_process_validation(model, small_data: Path, val_cache: Path, val_images: int = VAL_IMAGES):
    """The validation data module of the DDP fit, in this process (the same held-out images)."""
    from datamodules import NSDDataModule

    dm = NSDDataModule(str(small_data), subjects=["subj01", "subj02"], eval_batch_size=3, num_workers=0,
                       val_images=val_images, val_cache_dir=str(val_cache), load_images=False,
                       targets={"clip_text": "targets/clip_text"})
    dm.prepare_data()
    dm.setup("validate")
    return dm


def single_process_retrieval(checkpoint: Path, small_data: Path, val_cache: Path,
                             val_images: int = VAL_IMAGES) -> dict[str, tuple[float, float]]:
    """Brain->image and image->brain validation top-1 per subject (subj01, subj02) of ``checkpoint``, computed in
    this process over the valid rows only, sorted by nsd_id (what a DDP fit's reduction must equal)."""
    from lightning_modules import BrainEncoderModule
    from lightning_modules.metrics import retrieval_top1

    model = BrainEncoderModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    dm = single_process_validation(model, small_data, val_cache, val_images)
    parts: dict[str, list] = {"subj01": [], "subj02": []}
    with torch.no_grad():
        for batch in (b for loader in dm.val_dataloader() for b in loader):
            out, average = model.encode_repeats(batch["voxels"], batch["repeat_mask"], batch["subject"])
            valid = batch["valid"]
            parts[batch["subject"]].append((batch["nsd_id"][valid], average(out.clip_mean)[valid],
                                            model._target(batch)[valid]))
    expected = {}
    for subject, rows in parts.items():
        ids, clip, target = (torch.cat(p) for p in zip(*rows))
        assert len(ids) == val_images
        order = ids.argsort()
        expected[subject] = retrieval_top1(clip[order], target[order], model.hparams.retrieval_candidates,
                                           model.hparams.retrieval_draws, model.hparams.eval_seed)
    return expected


@pytest.mark.slow
@pytest.mark.ddp
def test_two_rank_fit_reduces_validation_over_valid_rows_only(ddp_run, small_data):
    """Retrieval among the 3 validation images of each subject, with rank 1 holding only padding, equals the same
    retrieval in one process with the final weights (a reduction that counted the padding, or kept each rank's own
    rows, changes the candidates or the top-1)."""
    run, tmp_path = ddp_run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    assert (run / "parameters.json").is_file()  # written by rank zero after a broadcast every rank joins

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    # rank 1 holds only a padding copy of each subject's one validation batch, which must not count
    expected = single_process_retrieval(run / "checkpoints" / "last.ckpt", small_data, tmp_path / "vc")
    for subject in ("subj01", "subj02"):
        candidates = [e.value for e in events.Scalars(f"val/{subject}/candidates")]
        assert candidates == [float(VAL_IMAGES)] * 2
        fwd, bwd = expected[subject]
        assert events.Scalars(f"val/{subject}/fwd_top1")[-1].value == pytest.approx(fwd, abs=1e-6)
        assert events.Scalars(f"val/{subject}/bwd_top1")[-1].value == pytest.approx(bwd, abs=1e-6)
    assert len(events.Scalars("train/loss")) >= 1


def numpy_level_statistics(probs: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row routing statistics by plain loops: entropy (n,), gate mass per expert (n, E), coverage (n, 3)."""
    n, parents, units, children = probs.shape
    entropy, mass, coverage = np.zeros(n), np.zeros((n, parents * children)), np.zeros((n, 3))
    for r in range(n):
        entropy[r] = np.mean([-sum(p * np.log(max(p, 1e-12)) for p in probs[r, a, u]) for a in range(parents)
                              for u in range(units)])
        for a in range(parents):
            counts = np.zeros(units)
            for c in range(children):
                mass[r, a * children + c] = probs[r, a, :, c].sum()
                for unit in indices[r, a * children + c]:
                    counts[unit] += 1
            coverage[r] += [(counts == 0).sum(), (counts == 1).sum(), (counts >= 2).sum()]
    return {"entropy": entropy, "mass": mass, "coverage": coverage}


@pytest.mark.slow
@pytest.mark.ddp
def test_two_rank_routing_statistics_equal_a_single_process_computation(ddp_run, small_data):
    """The routing statistics a 2-process DDP fit logs at its last validation equal, to float precision, a
    single-process loop over the same validation samples (both subjects; rank 1 holds only padding) with the same
    (final) weights; TensorBoard holds the scalars, the gate-mass histograms and the retrieval grid."""
    run, tmp_path = ddp_run
    val_cache = tmp_path / "vc"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_modules import BrainEncoderModule

    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0, "histograms": 0}).Reload()
    assert "val/truth_vs_retrieved" in events.Tags()["images"]
    assert "routing/level3/gate_mass_share" in events.Tags()["histograms"]
    model = BrainEncoderModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    dm = single_process_validation(model, small_data, val_cache)
    rows: list[dict] = [{"entropy": [], "mass": [], "coverage": []} for _ in model.moe.num_experts]
    seen = 0
    with torch.no_grad():
        for batch in (b for loader in dm.val_dataloader() for b in loader):
            out, _ = model.encode_repeats(batch["voxels"], batch["repeat_mask"], batch["subject"])
            keep = (batch["valid"][:, None] & batch["repeat_mask"]).reshape(-1).numpy()
            seen += int(batch["valid"].sum())
            for level, routing in enumerate(out.routing):
                stats = numpy_level_statistics(routing.probs.numpy()[keep], routing.indices.numpy()[keep])
                for key, value in stats.items():
                    rows[level][key].append(value)
    assert seen == 2 * VAL_IMAGES
    for level, parts in enumerate(rows):
        entropy, mass, coverage = (np.concatenate(parts[k]) for k in ("entropy", "mass", "coverage"))
        share = mass.sum(0) / mass.sum()
        expected = {"entropy": entropy.mean(), "share_cv": share.std() / share.mean(),
                    "share_max_min": share.max() / share.min(),
                    **{f"coverage_{name}": v for name, v in zip(("none", "one", "several"),
                                                                coverage.sum(0) / coverage.sum())}}
        for name, value in expected.items():
            logged = events.Scalars(f"routing/level{level}/{name}")
            assert len(logged) == 2  # one per validation
            # share_cv of nearly equal shares is ill-conditioned: float32 rounding of the masses moves it ~1e-8
            assert logged[-1].value == pytest.approx(value, rel=1e-4, abs=1e-6), (level, name)
    assert len(events.Scalars("routing/level0/stability_jaccard")) == 1  # from the second validation on
