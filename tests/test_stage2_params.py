"""Stage-2 parameter report at paper scale (the real module on the meta device) and the stage-2 benchmark's smoke
run."""

from __future__ import annotations

import json

import pytest

from experiments.parameters.stage2 import stage2_report

QKVO = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def paper_rows() -> dict[str, dict]:
    spec = {"temporal": "soft", "spatial": True, "grid": 4}  # BranchSpec's defaults otherwise
    rows, source = stage2_report({"image_branch": spec, "text_branch": spec})
    assert source == "SDXL base (built in)"
    return {r["key"]: r for r in rows}


def test_paper_scale_counts(paper_rows):
    # feasibility.md section 2 (b): the SDXL base UNet on meta
    assert paper_rows["unet_base"]["params"] == 2_567_463_684
    assert paper_rows["unet_base"]["trainable"] == 0
    # reference-morebrain.md section 9: LoRA r 16 on the six targets of the 70 transformer blocks
    assert paper_rows["lora"]["params"] == paper_rows["lora"]["trainable"] == 41_861_120
    # IP-Adapter SDXL layout: to_k_ip / to_v_ip in the 70 cross-attention layers, projection 1280 -> 4 x 2048
    assert paper_rows["ip_kv"]["params"] == 340_787_200
    assert paper_rows["image_projection"]["params"] == 1280 * 4 * 2048 + 4 * 2048 + 2 * 2048
    for branch in ("image", "text"):
        temporal = paper_rows[f"{branch}_router.temporal"]["params"]
        assert temporal == 320 * 768 + 768 + 4 * 768  # 249,600, the reference's DiffuseTimeRouterAttn
        assert paper_rows[f"{branch}_router"]["params"] == temporal + paper_rows[f"{branch}_router.spatial"]["params"]
    assert paper_rows["text_prompt"]["params"] == 0  # reference prompt: no projection
    total = paper_rows["total"]
    parts = [r for k, r in paper_rows.items() if k != "total" and "." not in k]
    assert total["params"] == sum(r["params"] for r in parts)
    assert total["trainable"] == sum(r["trainable"] for r in parts)
    assert total["trainable_share"] == pytest.approx(total["trainable"] / total["params"])


def test_lora_on_attention_only_and_frozen_ip_adapter():
    rows, _ = stage2_report({"image_branch": {"temporal": "fixed", "spatial": False}, "text_branch": None,
                             "lora_targets": QKVO, "ip_adapter_weights": "/absent/ip-adapter_sdxl.bin",
                             "prompt_mode": "projected"})
    rows = {r["key"]: r for r in rows}
    assert rows["lora"]["trainable"] == 23_224_320  # feasibility.md section 2 (b)
    assert rows["unet_base"]["params"] == 2_567_463_684
    assert rows["ip_kv"]["trainable"] == rows["image_projection"]["trainable"] == 0
    assert rows["image_router"]["params"] == 0 and "text_router" not in rows
    assert rows["total"]["trainable"] == 23_224_320


def test_params_command_on_the_paper_config_and_an_ablation(capsys):
    from experiments.params import main

    base = ["--config", "configs/base/stage2_trainer.yaml", "--config", "configs/stage2/sdxl_nsd.yaml"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "UNet (frozen)" in out and "2,567,463,684" in out and "41,861,120" in out
    assert "image router" in out and "text router" in out and "not counted" in out and "VAE (frozen)" in out
    assert main(base + ["--config", "configs/stage2/ablations/text_only.yaml", "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert "image_router" not in rows and "image_projection" not in rows
    assert rows["text_router"]["params"] == 0  # uniform temporal, no spatial router
    assert rows["ip_kv"]["trainable"] == 0
    assert rows["total"]["trainable"] == rows["lora"]["trainable"] == 41_861_120


def test_stage2_benchmark_smoke(tiny_models):
    from experiments.benchmarks import stage2_step

    result = stage2_step.run(repeats=2, warmup=1, threads=1, models_dir=tiny_models)
    for key in ("ours_ms", "baseline_ms", "overhead_ratio", "prior_passes_per_image", "config"):
        assert key in result
    assert result["ours_ms"] > 0 and result["baseline_ms"] > 0 and result["overhead_ratio"] > 0
    passes = result["prior_passes_per_image"]
    assert passes["reference"]["passes_per_branch"] == 50 * 30 * 2
    assert passes["ours"]["batched_calls_per_branch"] == 10  # configs/stage2/sdxl_nsd.yaml prior_steps
    assert passes["ours"]["rows_per_branch"] == 30 * 10 * 2


def test_paper_host_memory_estimate_counts_the_loading_phases(monkeypatch):
    """The memory benchmark's paper-scale estimate (``make bench``) runs on the meta-built modules: with the
    cache a rank's peak is its UNet + VAE phase, far below the old all-at-once load with two stage-1 checkpoints."""
    from pathlib import Path

    from experiments.benchmarks.stage2_memory import paper_estimate

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    est = paper_estimate(overhead=10**9)
    assert est["params"]["unet"] == 2_567_463_684 and est["params"]["trained"] == 43_042_304
    now, before = est["now_with_cache"], est["before"]
    assert now["peak_gb"] == max(now["phases_gb"].values()) == now["phases_gb"]["UNet + VAE"]
    assert 1 + 2 * 2.567 < now["peak_gb"] < before["peak_gb"] / 2  # at least the bf16 UNet, under half of before
