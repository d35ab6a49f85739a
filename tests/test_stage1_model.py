"""Stage-1 model options: what the prior is trained on (detached, separately weighted expert rows), the
reference's identity level-0 experts, and model-side checks of checkpoints and target caches."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.brain_encoder import BrainEncoderModule
from lightning_modules.components import DiffusionPrior, HierarchicalMoE


def tiny_model(**kwargs) -> BrainEncoderModule:
    torch.manual_seed(0)
    moe = HierarchicalMoE(hidden_dim=32, out_dim=8, clip_hidden=8, num_blocks=1, dropout=0.0, gate_init=0.5)
    prior = DiffusionPrior(embed_dim=8, num_layers=1, num_heads=2, head_dim=4, timesteps=10)
    args = dict(num_voxels={"subj01": 20}, mixup_pct=0.0, prior_inputs=["mean", "experts"], clip_scale=0.0,
                cos_scale=0.0, prior_clip_scale=0.0, prior_scale=1.0)
    args.update(kwargs)
    return BrainEncoderModule(moe, prior, **args)


def test_the_prior_loss_sends_no_gradient_into_the_experts_through_their_rows():
    model = tiny_model(prior_inputs=["experts"])
    out = model.moe(model.adapters(torch.randn(6, 20), "subj01"))
    loss = model._losses(out, torch.randn(6, 8), None, 0.5)["loss"]
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prior.parameters())
    moe_grads = [p.grad for p in model.moe.parameters() if p.grad is not None]
    assert all(g.abs().sum() == 0 for g in moe_grads)  # the prior learns to map them; they are not pulled


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_mean_and_expert_rows_are_weighted_as_prior_expert_weight_says(weight):
    """A stand-in prior whose x0 prediction is off by 1 on the mean row and by 2 on every expert row: the prior
    loss is MSE(mean) + prior_expert_weight * MSE(experts) = 1 + weight * 4 (not the average over 1 + 30 rows)."""
    model = tiny_model(prior_expert_weight=weight)
    n_experts = sum(model.moe.num_experts)

    def loss(condition, target):
        offset = torch.tensor([1.0] + [2.0] * n_experts).repeat(len(target) // (1 + n_experts))
        return torch.zeros(()), target + offset[:, None]

    model.prior.loss = loss
    out = model.moe(model.adapters(torch.randn(6, 20), "subj01"))
    got = model._losses(out, torch.randn(6, 8), None, 0.5)["prior"]
    assert got.item() == pytest.approx(1 + weight * 4, rel=1e-6)


def test_a_checkpoint_with_other_voxel_counts_names_the_subject_and_both_counts(stage1_checkpoints):
    import copy

    source = BrainEncoderModule.load_from_checkpoint(stage1_checkpoints["image"], map_location="cpu",
                                                     weights_only=True)
    model = BrainEncoderModule(copy.deepcopy(source.moe), copy.deepcopy(source.prior),
                               num_voxels={"subj01": 123, "subj02": 240, "subj03": 360},
                               prior_inputs=["mean", "experts"])
    with pytest.raises(ValueError, match=r"model.init_from .*subj01 has 300 voxels there but 123 in the data"):
        model.load_from_stage1(str(stage1_checkpoints["image"]), [])
    model.load_from_stage1(str(stage1_checkpoints["image"]), ["subj01"])  # a fresh adapter is fine


def test_stage2s_frozen_encoders_name_the_subject_and_both_voxel_counts(tiny_models, stage1_checkpoints):
    from tests.test_stage2_module import build

    with pytest.raises(ValueError, match=r"model.image_encoder: subj01 has 300 voxels in .* but 123 in the data"):
        build(tiny_models, stage1_checkpoints, num_voxels={"subj01": 123})


@pytest.mark.parametrize("shapes", [False, True])
def test_a_target_cache_of_another_width_is_refused_in_setup(shapes, small_data, targets, tmp_path):
    """The tiny config predicts 32-wide targets; a 16-wide cache is refused when the fit starts (not as a size
    mismatch inside validation_step), with or without data.target_shapes."""
    import numpy as np

    from datamodules.target_cache import write_target_cache
    from experiments.run import cli_main
    from tests.test_stage1_cli import overrides

    ids = np.load(targets / "clip_text" / "ids.npy")
    narrow = tmp_path / "narrow"
    write_target_cache(narrow, ids, np.zeros((len(ids), 16), np.float32), model="narrow", layer="test")
    extra = [f"--data.init_args.targets={{clip_text: {narrow}}}", "--trainer.max_epochs=1"]
    if shapes:
        extra.append("--data.init_args.target_shapes={clip_text: [16]}")
    with pytest.raises(ValueError, match=rf"model.target 'clip_text': the target cache {narrow} holds 16-wide "
                                         r"items .*the model predicts 32"):
        cli_main(["fit", *overrides(small_data, tmp_path, *extra)])
