"""The stage-2 LightningModule on the tiny SDXL-shaped models and tiny stage-1 checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.reconstruction_grid import ReconstructionGrid
from callbacks.routing_statistics import DiffusionRoutingStatistics
from datamodules import NSDDataModule
from lightning_modules import BrainEncoderModule, RoutedDiffusionModule
from lightning_modules.components.routed_branch import BranchSpec
from lightning_modules.components.target_embedders import MissingWeightsError

IMAGE = BranchSpec(temporal="soft", spatial=True, grid=4, source="prior", pool="mean", query_dim=16, spatial_dim=16)
TEXT = BranchSpec(temporal="hard", spatial=True, grid=4, source="clip", pool="sum", query_dim=16, spatial_dim=16)


def build(tiny_models: Path, ckpts: dict[str, Path], **overrides) -> RoutedDiffusionModule:
    kwargs = dict(sdxl_dir=str(tiny_models), image_encoder=str(ckpts["image"]), text_encoder=str(ckpts["text"]),
                  image_branch=IMAGE, text_branch=TEXT, num_voxels={"subj01": 300}, prior_steps=3,
                  prior_guidance=1.5, lora_rank=4, lora_alpha=4, resolution=32, weight_decay=0.0, lr=1e-3,
                  warmup_steps=1, val_timesteps=[300, 700],
                  inference_steps=4, guidance_scale=2.0)
    kwargs.update(overrides)
    module = RoutedDiffusionModule(**kwargs)
    module.configure_model()  # what the Trainer does before using it: load the frozen weights
    return module


def datamodule(data: Path, tmp: Path) -> NSDDataModule:
    return NSDDataModule(str(data), subjects=["subj01"], batch_size=4, eval_batch_size=4, num_workers=0,
                         val_images=4, val_cache_dir=str(tmp / "val_cache"), samples_per_epoch=8)


@pytest.fixture(scope="module")
def fitted(small_data, tiny_models, stage1_checkpoints, tmp_path_factory):
    """Two optimisation steps through the real Trainer; returns (module, initial trained state, log dir)."""
    tmp = tmp_path_factory.mktemp("stage2_fit")
    model = build(tiny_models, stage1_checkpoints)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("unet.conv_in", "vae.",
                                                                                    "image_encoder.moe"))}
    before = {k: v.clone() for k, v in model.trained_state_dict().items()}
    callbacks = [ReconstructionGrid(num_images=2, steps=3), DiffusionRoutingStatistics(bins=4)]
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, enable_progress_bar=False,
                        default_root_dir=str(tmp), logger=L.pytorch.loggers.TensorBoardLogger(str(tmp)),
                        enable_model_summary=False, callbacks=callbacks, log_every_n_steps=1)
    trainer.fit(model, datamodule(small_data, tmp))
    return model, before, frozen, trainer


def test_after_two_steps_every_router_projection_and_lora_parameter_has_changed(fitted):
    """What this proves: every trained tensor receives a non-zero gradient and is stepped (no part is cut off from
    the loss or left out of the optimiser), nothing else is trained, and the frozen UNet, VAE and stage-1 encoders do
    not move. It does not prove that training helps: test_stage2_trainable checks that the loss falls against an
    lr-0 control."""
    model, before, frozen, _ = fitted
    after = model.trained_state_dict()
    groups = {"lora": [k for k in after if "lora_" in k], "image_router": [k for k in after if "image_router" in k],
              "text_router": [k for k in after if "text_router" in k],
              "projection": [k for k in after if "image_projection" in k],
              "ip_key_value": [k for k in after if "to_k_ip" in k or "to_v_ip" in k]}
    assert all(groups.values()), {g: len(v) for g, v in groups.items()}
    assert sum(map(len, groups.values())) == len(after)  # nothing else is trained
    unchanged = [k for k in after if torch.equal(after[k], before[k])]
    assert not unchanged
    for key, value in frozen.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_checkpoint_holds_only_trained_parameters_and_restores_exactly(fitted, tiny_models, stage1_checkpoints):
    model, _, _, trainer = fitted
    path = Path(trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == set(model.trained_state_dict())
    assert not any(k.startswith(("vae.", "image_encoder.", "text_encoder.")) for k in ckpt["state_dict"])
    assert ckpt["provenance"]["sources"]["sdxl_dir"] == str(tiny_models)
    restored = RoutedDiffusionModule.load_from_checkpoint(path, map_location="cpu")
    for key, value in model.trained_state_dict().items():
        assert torch.equal(restored.trained_state_dict()[key], value), key
    other = build(tiny_models, stage1_checkpoints, text_branch=None)
    with pytest.raises(ValueError, match="does not match this configuration"):
        other.on_load_checkpoint(ckpt)


def test_validation_and_callbacks_log_losses_routing_and_a_reconstruction_grid(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, _, _, trainer = fitted
    assert "val/diffusion_loss" in trainer.callback_metrics
    assert "val/diffusion_loss_t300" in trainer.callback_metrics
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    images, scalars = set(events.Tags()["images"]), set(events.Tags()["scalars"])
    assert {"val/truth_vs_reconstruction", "routing/image/temporal_curve", "routing/text/temporal_curve"} <= images
    grid = events.Images("val/truth_vs_reconstruction")[-1]
    assert (grid.height, grid.width) == (2 * 34 + 2, 2 * 34 + 2)  # 2 probe rows of [truth | reconstruction]
    assert {"routing/image/spatial_entropy/level3", "routing/text/level0/t000-249",
            "routing/image/level3/t750-999", "train/kl_image"} <= scalars
    # the logged curve is the router evaluated at those timesteps, nothing multiplied in
    t = torch.arange(750, 1000)
    with torch.no_grad():
        direct, _ = model.image_router.temporal(model.time_embedding(t).float(), t)
    logged = events.Scalars("routing/image/level3/t750-999")[-1].value
    assert logged == pytest.approx(direct[:, 3].mean().item(), rel=1e-5)
    spatial = events.Scalars("routing/image/spatial_entropy/level3")[-1].value
    assert 0 < spatial <= math.log(16) + 1e-6


def test_reconstruction_is_deterministic_and_independent_of_batching(fitted, small_data):
    model, *_ = fitted
    model.eval()
    voxels = torch.randn(3, 300)
    ids = torch.tensor([4, 9, 11])
    experts = model.expert_embeddings({"voxels": voxels}, "subj01")
    first, routing = model.reconstruct(experts, "subj01", ids)
    again, _ = model.reconstruct(experts, "subj01", ids)
    assert torch.equal(first, again)
    single, _ = model.reconstruct({b: [x[1:2] for x in v] for b, v in experts.items()}, "subj01", ids[1:2])
    assert torch.allclose(single[0], first[1], atol=1e-5)
    steps = model.hparams.inference_steps
    assert routing["image_level_weights"].shape == (steps, 3, 4)
    assert routing["text_spatial_level3"].shape == (steps, 3, 16, 16)
    assert torch.allclose(routing["image_level_weights"].sum(-1), torch.ones(steps, 3), atol=1e-5)


def test_uniform_levels_without_spatial_router_route_the_stage1_level_average(tiny_models, stage1_checkpoints):
    spec = BranchSpec(temporal="uniform", spatial=False, source="clip", pool="sum")
    model = build(tiny_models, stage1_checkpoints, image_branch=spec, text_branch=None).eval()
    stage1 = BrainEncoderModule.load_from_checkpoint(stage1_checkpoints["image"], map_location="cpu").eval()
    voxels = torch.randn(5, 300)
    experts = model.expert_embeddings({"voxels": voxels}, "subj01")
    _, _, injection, routing = model.route(torch.randn(5, 4, 8, 8), torch.randint(0, 1000, (5,)), experts)
    with torch.no_grad():
        expected = stage1(voxels, "subj01")
    assert torch.allclose(routing["image"].tokens[:, 0], expected, atol=1e-5)
    assert injection.ip_tokens.shape == (5, 4, 64) and injection.ip_cells is None


def test_lora_exports_in_diffusers_format(fitted, tiny_models, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    model, *_ = fitted
    model.export_lora(tmp_path / "lora")
    state, _ = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path / "lora"))
    fresh = UNet2DConditionModel.from_pretrained(tiny_models, subfolder="unet")
    fresh.load_lora_adapter(state, prefix="unet")
    torch.manual_seed(0)
    inputs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor([5, 500]),
                  encoder_hidden_states=torch.randn(2, 6, 64),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)})
    with torch.no_grad():
        ours = model.unet(**inputs).sample  # no injection: our processors compute the stock attention
        exported = fresh(**inputs).sample
        plain = UNet2DConditionModel.from_pretrained(tiny_models, subfolder="unet")(**inputs).sample
    assert torch.allclose(ours, exported, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-4)


def test_missing_or_unsuitable_inputs_name_the_option(tiny_models, stage1_checkpoints, tmp_path):
    with pytest.raises(MissingWeightsError, match="model.sdxl_dir"):
        build(tmp_path / "no_sdxl", stage1_checkpoints)
    with pytest.raises(FileNotFoundError, match="model.image_encoder"):
        build(tiny_models, {**stage1_checkpoints, "image": tmp_path / "none.ckpt"})
    with pytest.raises(ValueError, match="model.text_encoder.*subj09"):
        build(tiny_models, stage1_checkpoints, num_voxels={"subj09": 10}, image_branch=None)
    ckpt = torch.load(stage1_checkpoints["image"], map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["prior_inputs"] = ["mean"]
    torch.save(ckpt, tmp_path / "mean_prior.ckpt")
    with pytest.raises(ValueError, match="prior_inputs including 'experts'"):
        build(tiny_models, {**stage1_checkpoints, "image": tmp_path / "mean_prior.ckpt"})
    with pytest.raises(ValueError, match="both null"):
        build(tiny_models, stage1_checkpoints, image_branch=None, text_branch=None)


def test_cached_latents_match_the_vae_path(fitted, small_data, tiny_models, tmp_path):
    from datamodules.target_cache import TargetCache
    from experiments.caching.latents import cache_latents

    model, *_ = fitted
    cache = cache_latents(small_data, [1], tmp_path / "vae_latents", tiny_models, resolution=32)
    dm = NSDDataModule(str(small_data), subjects=["subj01"], eval_batch_size=4, num_workers=0, val_images=4,
                       val_cache_dir=str(tmp_path / "val_cache"), targets={"vae_latents": str(cache)})
    dm.prepare_data()
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()[0]))
    stored = torch.from_numpy(TargetCache(cache).lookup(batch["nsd_id"].numpy()).astype("float32"))
    assert stored.shape[1:] == (2, 4, 8, 8)
    assert torch.allclose(batch["vae_latents"].float(), stored)
    from_images = model.encode_latents(batch, sample=False)
    model.hparams.latents_key = "vae_latents"
    try:
        from_cache = model.encode_latents(batch, sample=False)
    finally:
        model.hparams.latents_key = None
    assert torch.allclose(from_cache, from_images, atol=2e-3)
