"""Target embedders from local directories, target caching, the token-target option, and parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.target_cache import TargetCache
from experiments.caching.targets import cache_targets
from experiments.world.tiny_models import make_tiny_clip
from lightning_modules.components.target_embedders import (
    ClipImageEmbedder,
    ClipTextEmbedder,
    MissingWeightsError,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny"), embed_dim=16, image_size=32)


def test_missing_weights_name_the_option(tmp_path):
    with pytest.raises(MissingWeightsError, match="model.image_model"):
        ClipImageEmbedder(str(tmp_path / "absent"), option="model.image_model")
    with pytest.raises(MissingWeightsError, match=r"--text-model \(text_encoder_2/\)"):
        ClipTextEmbedder(str(tmp_path))


def test_text_target_is_the_penultimate_layer_at_eos_averaged_over_captions(tiny):
    embedder = ClipTextEmbedder(str(tiny))
    tok = embedder.tokenizer(["a red cat"], padding="max_length", max_length=32, return_tensors="pt")
    ids = tok["input_ids"]
    eos = int((ids[0] == embedder.tokenizer.eos_token_id).nonzero()[0])
    assert eos == len("aredcat") + 1  # one token per character (spaces split words) after the start token
    hidden = embedder.model(input_ids=ids, output_hidden_states=True).hidden_states[-2][0, eos]
    assert torch.allclose(embedder.embed_texts(["a red cat"])[0], hidden, atol=1e-6)
    a, b = embedder.embed_texts(["a red cat", "blue car"])
    assert torch.allclose(embedder([["a red cat", "blue car"]])[0], (a + b) / 2, atol=1e-6)


def test_image_target_and_tokens(tiny):
    pooled = ClipImageEmbedder(str(tiny / "image_encoder"))
    tokens = ClipImageEmbedder(str(tiny / "image_encoder"), output="tokens")
    images = torch.rand(2, 3, 48, 48)
    assert pooled(images).shape == (2, 16)
    assert tokens(images).shape == (2, 16, 48)  # (32 / 8)^2 patches, hidden 48, no CLS, no projection
    pixels = pooled.preprocess(images)
    assert pixels.shape == (2, 3, 32, 32)
    expected = pooled.model(pixel_values=pixels).image_embeds
    assert torch.allclose(pooled(images), expected, atol=1e-6)


def test_cache_targets_covers_every_image_once(small_data, small_sim, tiny, tmp_path):
    written = cache_targets(small_data, [1, 2], tmp_path, image_model=str(tiny / "image_encoder"),
                            text_model=str(tiny), image_tokens=True, batch_size=16)
    assert set(written) == {"clip_image", "clip_text", "clip_image_tokens"}
    image = TargetCache(written["clip_image"], expected_shape=[16])
    expected_ids = sorted(set(small_sim.trials["subj01"].nsd_id) | set(small_sim.trials["subj02"].nsd_id))
    assert image.ids.tolist() == expected_ids
    nsd_id = int(small_sim.test_ids[3])
    picture = torch.from_numpy(small_sim.images[nsd_id]).permute(2, 0, 1)[None].float() / 255
    direct = ClipImageEmbedder(str(tiny / "image_encoder"))(picture)[0].numpy()
    assert np.allclose(image.lookup(np.array([nsd_id]))[0], direct, atol=1e-5)
    text = TargetCache(written["clip_text"])
    captions = small_sim.captions()[nsd_id]
    direct = ClipTextEmbedder(str(tiny))([captions])[0].numpy()
    assert np.allclose(text.lookup(np.array([nsd_id]))[0], direct, atol=1e-5)
    assert TargetCache(written["clip_image_tokens"]).shape == (16, 48)


def test_token_target_trains_through_one_shared_head():
    from lightning_modules.brain_encoder import BrainEncoderModule
    from lightning_modules.components import HierarchicalMoE
    from lightning_modules.components.token_head import TokenHead

    torch.manual_seed(0)
    model = BrainEncoderModule(HierarchicalMoE(hidden_dim=32, out_dim=8, clip_hidden=8, num_blocks=1),
                               num_voxels={"subj01": 20}, token_head=TokenHead(8, 4, 6), token_target="tokens",
                               mixup_pct=0.0)
    batch = {"subj01": {"voxels": torch.randn(6, 20), "nsd_id": torch.arange(6), "clip_image": torch.randn(6, 8),
                        "tokens": torch.randn(6, 4, 6)}}
    out = model.moe(model.adapters(batch["subj01"]["voxels"], "subj01"))
    losses = model._losses(out, batch["subj01"]["clip_image"], None, 0.5)
    token_loss = model._contrastive(model.token_head(out.backbone_mean).flatten(1),
                                    batch["subj01"]["tokens"].flatten(1), None, 0.5)
    (losses["loss"] + token_loss).backward()
    assert model.token_head.linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="token_head and model.token_target"):
        BrainEncoderModule(HierarchicalMoE(hidden_dim=32, out_dim=8), num_voxels={"subj01": 20}, token_target="t")


def test_params_command_matches_the_reference_counts(capsys):
    from experiments.params import main

    assert main(["--config", "configs/base/trainer.yaml", "--config", "configs/stage1/image_nsd.yaml",
                 "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r["params"] for r in report["modules"]}
    groups = report["groups"]["groups"]
    assert groups["adapters"]["params"] == 64_409_600 and groups["routers"]["params"] == 30
    # reference-morebrain.md section 9, subject 1 (V = 15724)
    assert rows["adapters"] == 64_409_600
    assert rows["moe.backbone_heads"] == 21_009_920
    assert rows["moe.clip_heads"] == 393_792_000
    assert rows["moe.routers"] == 30
    assert rows["moe.experts.1"] + rows["moe.experts.2"] + rows["moe.experts.3"] == 7_352_320


def test_supervise_levels_adds_every_level_to_the_contrastive_loss():
    import torch.nn.functional as F

    from lightning_modules.brain_encoder import BrainEncoderModule
    from lightning_modules.components import HierarchicalMoE
    from lightning_modules.components.losses import soft_clip_loss

    torch.manual_seed(0)
    moe = HierarchicalMoE(hidden_dim=32, out_dim=8, clip_hidden=8, num_blocks=1).eval()
    target = torch.randn(6, 8)
    model = BrainEncoderModule(moe, num_voxels={"subj01": 20}, supervise_levels=True, mixup_pct=0.0,
                               softclip_temperature=(0.05, 0.05))
    out = moe(torch.randn(6, 32))
    preds = [out.clip_mean] + [out.clip_level_sums[:, level] for level in range(4)]
    expected = torch.stack([soft_clip_loss(F.normalize(p, dim=-1), F.normalize(target, dim=-1), 0.05)
                            for p in preds]).mean()
    assert torch.allclose(model._losses(out, target, None, 0.5)["clip"], expected)
    model.hparams.supervise_levels = False
    only_mean = soft_clip_loss(F.normalize(out.clip_mean, dim=-1), F.normalize(target, dim=-1), 0.05)
    assert torch.allclose(model._losses(out, target, None, 0.5)["clip"], only_mean)


def test_a_scheduler_from_the_config_replaces_onecycle(small_data, targets, tmp_path):
    from experiments.run import cli_main

    cli = cli_main(["--config", "configs/base/trainer.yaml", "--config", "configs/stage1/tiny_synthetic.yaml",
                    f"--data.init_args.data_dir={small_data}", f"--data.init_args.val_cache_dir={tmp_path}",
                    "--model.init_args.lr_scheduler.class_path=torch.optim.lr_scheduler.StepLR",
                    "--model.init_args.lr_scheduler.init_args.step_size=7"], run=False)
    config = cli.model.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 7
    decay = {g["weight_decay"] for g in config["optimizer"].param_groups}
    assert decay == {0.0, 0.01}  # biases and norms are not decayed


def test_a_cache_from_other_weights_at_the_same_path_is_stale(small_data, tiny, tmp_path):
    """The demo redoes a target cache when the model directory's weights changed (a rebuilt world), not only when
    the path did."""
    import shutil

    from experiments.demo import targets_current

    model = tmp_path / "image_encoder"
    shutil.copytree(tiny / "image_encoder", model)
    written = cache_targets(small_data, [1], tmp_path / "targets", image_model=str(model), batch_size=16)
    assert targets_current(written["clip_image"], model)
    assert not targets_current(written["clip_image"], tiny / "image_encoder")  # another path
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # other weights, same path
    assert not targets_current(written["clip_image"], model)
