"""The learned miniature world: the reduced build through the real loaders, its quality against controls, resume
and atomicity, the validation refusals, and the committed full world."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.world.validate import IncompleteWorldError, WorldMismatchError, check_world

DEFAULT = Path(__file__).resolve().parent.parent / "experiments" / "world" / "default"
REBUILD_TOLERANCE = 1e-4  # max abs weight difference of a rebuilt part from the committed one (other CPUs' kernels)


def _one_line(err: Exception, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, (needle, text)


# ---------------------------------------------------------------- the committed full world (fast)


FULL_TARGETS = {  # the full world's quality targets (quality.json keys)
    "clip_retrieval_10x_chance": lambda q: q["clip"]["retrieval_top1"] >= 10 * q["clip"]["retrieval_chance"],
    "clip_colour_probe": lambda q: q["clip"]["probes"]["colour"] > 0.9,
    "clip_shape_probe": lambda q: q["clip"]["probes"]["shape"] > 0.9,
    "clip_position_probe": lambda q: q["clip"]["probes"]["position"] > 0.8,  # the brains' low-level voxels carry it
    "vae_ssim": lambda q: q["vae"]["ssim"] > 0.8 and q["vae"]["ssim"] > q["vae"]["control_untrained_ssim"],
    "unet_clip_score_above_shuffled": lambda q: q["unet"]["clip_score_own"] > q["unet"]["clip_score_shuffled"],
    "ip_two_way": lambda q: q["ip_adapter"]["two_way"] > 0.9,
    "ip_two_way_above_shuffled": lambda q: q["ip_adapter"]["two_way"]
    > q["ip_adapter"]["control_shuffled"]["two_way"] + 0.1,
}
KNOWN_MISSES = {  # target -> what the committed world measures (strict xfail: a better world flags the fix)
    "clip_shape_probe": "shape probe 0.42: the 32 px tower input and 1000 steps learn colour, texture and position "
                        "(0.84) first",
}


def test_committed_world_is_complete():
    manifest = check_world(DEFAULT, "--world", image_size=64)
    assert manifest["complete"] and manifest["preset"] == "full"
    assert manifest["weights_bytes"] <= 20e6


@pytest.mark.parametrize("target", list(FULL_TARGETS))
def test_committed_world_meets_full_targets(target, request):
    if target in KNOWN_MISSES:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_MISSES[target], strict=True))
    quality = json.loads((DEFAULT / "quality.json").read_text())
    assert FULL_TARGETS[target](quality)


@pytest.mark.parametrize("name", ["default", "reduced"])
def test_committed_worlds_were_built_by_todays_presets(name, reduced_world):
    """A committed world is what `make world` (its preset, its seeds) builds today: change a preset, rebuild it."""
    from dataclasses import asdict

    from experiments.world.build import PRESETS, SEEDS, THREADS

    manifest = check_world(DEFAULT if name == "default" else reduced_world, "--world")
    preset = PRESETS[manifest["preset"]]
    assert manifest["image_size"] == preset.image_size and manifest["seeds"] == SEEDS
    assert manifest["threads"] == THREADS
    configs = {"clip": preset.clip, "vae": preset.vae, "unet": preset.unet, "ip_adapter": preset.ip}
    for part, config in configs.items():
        recorded = manifest["parts"][part]["config"]
        assert recorded == json.loads(json.dumps(asdict(config))), (name, part)


def test_committed_world_refusals(tmp_path):
    with pytest.raises(WorldMismatchError) as err:
        check_world(DEFAULT, "--world", image_size=32)
    _one_line(err.value, str(DEFAULT), "image_size", "--world")
    width = json.loads((DEFAULT / "image_encoder" / "config.json").read_text())["projection_dim"]
    with pytest.raises(WorldMismatchError) as err:
        check_world(DEFAULT, "--image-world", image_embed_dim=width + 1)
    _one_line(err.value, str(DEFAULT), "image_encoder", "--image-world")
    with pytest.raises(WorldMismatchError) as err:
        check_world(DEFAULT, "--text-world", text_embed_dim=1)
    _one_line(err.value, str(DEFAULT), "text_encoder_2", "--text-world")
    copy = tmp_path / "world"
    shutil.copytree(DEFAULT, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(IncompleteWorldError) as err:
        check_world(copy, "--world")
    _one_line(err.value, str(copy), "clip", "--world")
    with pytest.raises(FileNotFoundError) as err:
        check_world(tmp_path / "nothing", "--world")
    _one_line(err.value, str(tmp_path / "nothing"), "world.json", "--world")


def test_tokenizer_one_token_per_word(tmp_path):
    from transformers import AutoTokenizer

    from experiments.world.scenes import all_caption_words
    from experiments.world.tokenizer import build_tokenizer, caption_words, check_single_tokens

    captions = all_caption_words()
    tok = build_tokenizer(captions, tmp_path / "tok")
    words = caption_words(captions)
    check_single_tokens(tok, words)
    check_single_tokens(AutoTokenizer.from_pretrained(tmp_path / "tok"), words)
    assert tok.model_max_length == max(len(tok(c).input_ids) for c in captions)


def test_vae_loss_weights_the_object_not_the_background():
    """The foreground mask covers the drawn object (where the generator's shape mask is) and little else, and the
    weighted loss is plain L1 + MSE when every weight is 1."""
    from datamodules.synthetic import SHAPES, _shape_mask
    from experiments.world.scenes import make_scenes
    from experiments.world.vae import foreground_mask, weighted_reconstruction_loss

    scenes = make_scenes(5, 16, 64)
    x = torch.from_numpy(scenes.pixels()) * 2 - 1
    found = foreground_mask(x, 0.1)[:, 0].numpy().astype(bool)
    coords = (np.arange(64) + 0.5) / 64
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    f = scenes.factors
    drawn = np.stack([_shape_mask(SHAPES[f.category[i]], xx - f.cx[i], yy - f.cy[i], f.size[i]) for i in range(16)])
    recall = (found & drawn).sum() / drawn.sum()
    outside = (found & ~drawn).sum() / (~drawn).sum()
    assert recall > 0.9 and outside < 0.01, (recall, outside)
    rec = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    plain = torch.nn.functional.l1_loss(rec, x) + torch.nn.functional.mse_loss(rec, x)
    assert torch.allclose(weighted_reconstruction_loss(rec, x, torch.ones_like(x[:, :1])), plain)


# ---------------------------------------------------------------- the reduced build (slow)


@pytest.mark.slow
def test_reduced_world_loads_through_the_real_loaders(reduced_world):
    from diffusers import StableDiffusionXLPipeline

    from lightning_modules.components.injection import (
        ImageTokenProjection,
        install_processors,
        load_ip_adapter_weights,
    )
    from lightning_modules.components.target_embedders import ClipImageEmbedder, ClipTextEmbedder
    from lightning_modules.sdxl_loading import encode_prompt, load_sdxl

    manifest = check_world(reduced_world, "--world", image_size=32)
    pipe = StableDiffusionXLPipeline.from_pretrained(reduced_world, local_files_only=True)
    out = pipe("a red cat", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    parts = load_sdxl(reduced_world)
    prompt, pooled = encode_prompt(parts, "a red cat")
    assert prompt.shape[-1] == parts.unet.config.cross_attention_dim
    assert pooled.shape[-1] + 6 * parts.unet.config.addition_time_embed_dim == \
        parts.unet.config.projection_class_embeddings_input_dim
    image = ClipImageEmbedder(str(reduced_world / "image_encoder"))
    assert image(torch.rand(2, 3, 32, 32)).shape == (2, manifest["widths"]["image_embed_dim"])
    text = ClipTextEmbedder(str(reduced_world))
    assert text([["a red cat", "a blue car"]]).shape == (1, manifest["widths"]["text_embed_dim"])
    processors = install_processors(parts.unet, with_ip=True)
    projection = ImageTokenProjection(image.dim, parts.unet.config.cross_attention_dim, 4)
    load_ip_adapter_weights(reduced_world / "ip_adapter.safetensors", projection, processors)


def test_an_fp16_variant_snapshot_loads_in_float32_and_missing_weights_name_the_part(reduced_world, tmp_path):
    """SDXL snapshots often keep only ``*.fp16.safetensors``: the loader takes that variant (upcast to float32
    where the model runs in float32) and gives the same outputs to fp16 rounding; no weights at all is one line."""
    from lightning_modules.components.target_embedders import MissingWeightsError
    from lightning_modules.sdxl_loading import WEIGHT_STEMS, encode_prompt, load_sdxl

    snapshot = tmp_path / "sdxl"
    shutil.copytree(reduced_world, snapshot)
    reference, halved = load_sdxl(reduced_world), load_sdxl(reduced_world)
    for part, stem in WEIGHT_STEMS.items():
        getattr(halved, part).to(torch.float16).save_pretrained(snapshot / part, variant="fp16")
        (snapshot / part / f"{stem}.safetensors").unlink()
    parts = load_sdxl(snapshot)
    for part in WEIGHT_STEMS:
        assert next(getattr(parts, part).parameters()).dtype == torch.float32, part
    prompt, pooled = encode_prompt(parts, "a red cat")
    ref_prompt, ref_pooled = encode_prompt(reference, "a red cat")
    assert torch.allclose(prompt, ref_prompt, atol=2e-2) and torch.allclose(pooled, ref_pooled, atol=2e-2)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(parts.vae.decode(latents).sample, reference.vae.decode(latents).sample, atol=2e-2)
    assert load_sdxl(snapshot, dtype="bfloat16").unet.dtype == torch.bfloat16
    (snapshot / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(MissingWeightsError) as err:
        load_sdxl(snapshot, option="--sdxl-dir")
    _one_line(err.value, str(snapshot / "vae"), "--sdxl-dir", "fp16")


@pytest.mark.slow
def test_reduced_world_quality_beats_controls(reduced_world):
    quality = json.loads((reduced_world / "quality.json").read_text())
    clip = quality["clip"]
    assert clip["retrieval_top1"] >= 5 * clip["retrieval_chance"]
    assert np.mean(list(clip["probes"].values())) > np.mean(list(clip["control_untrained_probes"].values())) + 0.1
    vae = quality["vae"]
    assert vae["ssim"] > 0.5 and vae["ssim"] > vae["control_untrained_ssim"] + 0.2
    unet = quality["unet"]
    assert unet["clip_score_own"] > unet["clip_score_shuffled"]
    ip = quality["ip_adapter"]
    assert ip["two_way"] > ip["control_shuffled"]["two_way"] + 0.05  # measured: 0.85 vs 0.55 (24 scenes)
    assert ip["pixcorr"] > ip["control_shuffled"]["pixcorr"]


@pytest.mark.slow
def test_interrupted_build_resumes_without_retraining(reduced_world, tmp_path):
    from experiments.world.build import build_world

    world = tmp_path / "world"
    shutil.copytree(reduced_world, world)
    manifest = json.loads((world / "world.json").read_text())
    del manifest["parts"]["ip_adapter"]
    (world / "world.json").write_text(json.dumps(manifest))
    (world / "ip_adapter.safetensors").unlink()
    kept = {p: p.stat().st_mtime_ns for p in world.rglob("*.safetensors")}  # the finished parts' weights
    stale = world / ".ip_adapter.tmp"
    stale.mkdir()
    (stale / "ip_adapter.safetensors").write_bytes(b"half written")
    with pytest.raises(IncompleteWorldError) as err:
        check_world(world, "--world")
    _one_line(err.value, str(world), "ip_adapter", "--world")
    resumed = build_world(world, "reduced", show=False)
    assert not list(world.glob(".*.tmp")) and not list(world.glob(".*.part"))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished parts not retrained
    for part in ("clip", "vae", "unet"):
        assert resumed["parts"][part] == manifest["parts"][part]
    check_world(world, "--world", image_size=32)
    from experiments.world.compare import compare_worlds

    # the committed part is what the code builds: bit-identical on the machine that built it
    assert compare_worlds(world, reduced_world)["ip_adapter"] <= REBUILD_TOLERANCE
