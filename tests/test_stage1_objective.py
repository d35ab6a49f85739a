"""Stage 1's objective (``components.stage1_objective``): the BiMixCo / SoftCLIP schedule and the weighted sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.components import DiffusionPrior, HierarchicalMoE
from lightning_modules.components.losses import cosine_loss, mixco_inputs, mixco_nce, soft_clip_loss
from lightning_modules.components.stage1_objective import Stage1Objective


def _out(seed: int = 0):
    torch.manual_seed(seed)
    moe = HierarchicalMoE(hidden_dim=32, out_dim=8, clip_hidden=8, num_blocks=1).eval()
    return moe(torch.randn(6, 32)), torch.randn(6, 8)


def test_bimixco_during_mixup_then_softclip_with_the_annealed_temperature():
    objective = Stage1Objective(mixup_pct=0.25, mixco_temperature=0.03, softclip_temperature=(0.02, 0.05))
    assert objective.mixing(0.0) and objective.mixing(0.249) and not objective.mixing(0.25)
    preds, target = torch.randn(6, 8), torch.randn(6, 8)
    p, t = F.normalize(preds, dim=-1), F.normalize(target, dim=-1)
    _, betas, perm = mixco_inputs(torch.randn(6, 4), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(objective.contrastive(preds, target, (betas, perm), 0.1), mixco_nce(p, t, 0.03, betas, perm))
    # right after mixup the start temperature, at the end of training the end temperature, cosine in between
    assert torch.allclose(objective.contrastive(preds, target, None, 0.25), soft_clip_loss(p, t, 0.02))
    assert torch.allclose(objective.contrastive(preds, target, None, 1.0), soft_clip_loss(p, t, 0.05))
    assert torch.allclose(objective.contrastive(preds, target, None, 0.625), soft_clip_loss(p, t, 0.035))


def test_the_loss_is_the_weighted_sum_of_its_terms():
    out, target = _out()
    prior = DiffusionPrior(embed_dim=8, num_layers=1, num_heads=2, head_dim=4, timesteps=10)
    objective = Stage1Objective(clip_scale=2.0, prior_scale=3.0, cos_scale=0.5, mse_scale=0.25,
                                prior_clip_scale=0.125, balance_scale=0.75, mixup_pct=0.0)
    torch.manual_seed(1)
    losses = objective.losses(out, target, None, 0.5, prior)
    assert set(losses) == {"clip", "mse", "prior", "prior_cos", "prior_clip", "balance", "loss"}
    expected = (2.0 * losses["clip"] + 0.25 * losses["mse"] + 3.0 * losses["prior"] + 0.5 * losses["prior_cos"]
                + 0.125 * losses["prior_clip"] + 0.75 * losses["balance"])
    assert torch.allclose(losses["loss"], expected)
    assert torch.allclose(losses["mse"], F.mse_loss(out.clip_mean, target))
    # without a prior (or with zero weights) the prior and mse terms are absent
    plain = Stage1Objective(mse_scale=0.0, mixup_pct=0.0).losses(out, target, None, 0.5)
    assert set(plain) == {"clip", "balance", "loss"} and torch.allclose(plain["loss"], plain["clip"])
    tokens = dict(plain)
    objective.add_token_term(tokens, out.clip_mean, target, None, 0.5)
    assert torch.allclose(tokens["loss"], plain["loss"] + objective.token_scale * tokens["token"])
    assert cosine_loss(target, target).abs() < 1e-6


@pytest.mark.parametrize("inputs,weight", [(("mean",), 1.0), (("mean", "level_sums", "experts"), 0.5)])
def test_prior_conditions_weigh_each_kind_as_one_term(inputs, weight):
    out, _ = _out()
    cond, weights = Stage1Objective(prior_inputs=inputs, prior_expert_weight=weight).prior_conditions(out)
    levels, experts = len(out.clip), sum(b.shape[1] for b in out.backbone)
    sizes = {"mean": 1, "level_sums": levels, "experts": experts}
    assert cond.shape == (6, sum(sizes[k] for k in inputs), 8)
    assert torch.allclose(weights.sum(), torch.tensor(sum(weight if k == "experts" else 1.0 for k in inputs)))
    assert torch.equal(cond[:, 0], out.backbone_mean)


def test_the_module_reads_its_objective_from_the_hyperparameters():
    from lightning_modules.brain_encoder import BrainEncoderModule

    model = BrainEncoderModule(HierarchicalMoE(hidden_dim=32, out_dim=8, clip_hidden=8, num_blocks=1),
                               num_voxels={"subj01": 20}, clip_scale=2.0, mixup_pct=0.5, token_scale=3.0)
    assert model.objective == Stage1Objective(clip_scale=2.0, mixup_pct=0.5, token_scale=3.0)
    model.hparams.mixup_pct = 0.1
    assert model.objective.mixup_pct == 0.1
