"""Stage 1 under a real two-process CPU DDP (gloo) fit through the entry point, one rank holding only padding."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.test_ddp_data import REPO, free_port


@pytest.mark.slow
@pytest.mark.ddp
def test_two_rank_fit_reduces_validation_over_valid_rows_only(small_data, targets, tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    cmd = ["timeout", "-k", "10", "300", sys.executable, "-m", "experiments.run", "fit",
           "--config", "configs/base/trainer.yaml", "--config", "configs/stage1/tiny_synthetic.yaml",
           f"--data.init_args.data_dir={small_data}", f"--data.init_args.val_cache_dir={tmp_path / 'vc'}",
           "--data.init_args.subjects=[subj01, subj02]", "--data.init_args.val_images=1",
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_epochs=2",
           "--trainer.check_val_every_n_epoch=1", f"--trainer.default_root_dir={tmp_path}",
           f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.version=ddp",
           "--trainer.enable_progress_bar=false"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=360)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "stage1_tiny" / "ddp"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    # one validation image per subject: rank 1 holds only a padding copy, which must not count
    for subject in ("subj01", "subj02"):
        candidates = [e.value for e in events.Scalars(f"val/{subject}/candidates")]
        assert candidates == [1.0, 1.0]
        assert [e.value for e in events.Scalars(f"val/{subject}/fwd_top1")] == [1.0, 1.0]
    assert len(events.Scalars("train/loss")) >= 1
