"""``make gpu-check`` cannot rot before a GPU is lent: the same code runs on CPU at tiny sizes, and without a GPU
the default command says so in one line, exits 0 and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from experiments._cli import run_main
from experiments.benchmarks import gpu_check
from experiments.gpu_check import NO_GPU, main

REPO = Path(__file__).resolve().parents[1]
TRAIN_KEYS = {"status", "batch", "latent", "gradient_checkpointing", "step_s", "step_s_median", "peak_memory_gib",
              "wall_s"}


def test_tiny_cpu_run_writes_every_part_and_one_failure_stays_in_its_part(tiny_models, tmp_path, monkeypatch,
                                                                          capsys):
    real = gpu_check.stage2_train

    def oom_at_32px_without_checkpointing(ours, sizes, px, batch, checkpointing, *args):
        if px == 32 and not checkpointing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(ours, sizes, px, batch, checkpointing, *args)

    monkeypatch.setattr(gpu_check, "stage2_train", oom_at_32px_without_checkpointing)
    out = tmp_path / "results" / "gpu_check.json"
    assert main(["--device", "cpu", "--tiny", "--out", str(out), "--models-dir", str(tiny_models)]) == 0
    result = json.loads(out.read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["gpu_check.json"]  # no temporary left beside it
    assert {"benchmark", "device", "sizes", "parts", "elapsed_s", "notes", "provenance"} <= set(result)
    assert {"git_commit", "package_versions", "created", "command"} <= set(result["provenance"])
    parts = result["parts"]
    assert list(parts) == ["stage1_fit", "stage1_forward", "stage2_build", "stage2_train_32px_ckpt_on",
                           "stage2_train_64px_ckpt_on", "generation_32px", "generation_64px",
                           "stage2_train_32px_ckpt_off", "stage2_train_64px_ckpt_off"]
    failed = parts.pop("stage2_train_32px_ckpt_off")
    assert failed["status"] == "oom" and "80.00 GiB" in failed["error"]
    assert all(p["status"] == "ok" for p in parts.values()), parts
    assert parts["stage1_fit"]["parameters"] > 0 and len(parts["stage1_fit"]["step_s"]) == result["sizes"]["steps"]
    assert parts["stage1_forward"]["step_s_median"] > 0
    assert parts["stage2_build"]["trainable_parameters"] > 0
    for px, ckpt in ((32, "on"), (64, "on"), (64, "off")):
        train = parts[f"stage2_train_{px}px_ckpt_{ckpt}"]
        assert TRAIN_KEYS <= set(train) and train["step_s_median"] > 0
        assert train["latent"] == [4, px // 4, px // 4] and train["gradient_checkpointing"] == (ckpt == "on")
    for px in (32, 64):
        gen = parts[f"generation_{px}px"]
        assert gen["pixels"] == [px, px] and gen["denoise_s"] > 0 and gen["vae_decode_s"] >= 0
    assert "not ok: stage2_train_32px_ckpt_off" in capsys.readouterr().out


def test_budget_spent_starts_no_part(tiny_models):
    result = gpu_check.run("cpu", tiny=True, models_dir=tiny_models, budget_s=1e-6, log=lambda line: None)
    assert {p["status"] for p in result["parts"].values()} == {"skipped"}
    assert all("time budget" in p["reason"] for p in result["parts"].values())


def test_without_a_gpu_the_default_command_prints_one_line_and_writes_nothing(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [NO_GPU]
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_one_line_and_status_2(tmp_path, capsys):
    for argv, option in ((["--device", "cpu"], "--device cpu"), (["--tiny", "--device", "cpu"], "--out"),
                         (["--budget-s", "0"], "--budget-s"),
                         (["--tiny", "--out", str(tmp_path / "x.json"), "--models-dir", str(tmp_path)],
                          "--models-dir")):
        assert run_main(main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and option in err[0], (argv, err)
    assert list(tmp_path.iterdir()) == []
