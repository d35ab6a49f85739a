"""The helpers the stage-2 LightningModule composes, on their own (no SDXL weights): classifier-free guidance
assembly, the KL guidance terms, the conditioning (condition tables, shuffling), parts and checkpoint checks, and
the per-image noise of generation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.components.guidance import drop_conditions, guide, guided_batch, unconditional
from lightning_modules.components.injection import ImageTokenProjection, Injection
from lightning_modules.components.level_prior import gaussian_level_target, kl_terms, level_kl
from lightning_modules.components.routed_branch import BranchSpec
from lightning_modules.condition_tables import build_condition_tables, expert_embeddings
from lightning_modules.routed_sampling import image_noise
from lightning_modules.stage2_parts import check_stored, regional_grid, stored_names


def _negative(batch=3, projection=None, tokens=2):
    injection = Injection(ip_tokens=torch.randn(batch, tokens * 4, 8) if projection is not None else None)
    return injection, unconditional(torch.randn(5, 8), torch.randn(6), projection, 7, injection, batch,
                                    torch.device("cpu"))


def test_the_unconditional_half_is_the_negative_prompt_and_zero_brain_tokens():
    torch.manual_seed(0)
    projection = ImageTokenProjection(7, 8, 4)
    injection, (prompt, pooled, ip) = _negative(projection=projection)
    assert prompt.shape == (3, 5, 8) and pooled.shape == (3, 6)
    assert torch.equal(ip, projection(torch.zeros(3, 2, 7)))
    assert _negative(projection=None)[1][2] is None  # no image branch: no image tokens


def test_condition_dropout_replaces_exactly_the_dropped_rows():
    torch.manual_seed(0)
    projection = ImageTokenProjection(7, 8, 4)
    injection, negative = _negative(projection=projection)
    injection.text_rows = torch.ones(3, dtype=torch.bool)
    kept_ip = injection.ip_tokens.clone()
    prompt, pooled = torch.randn(3, 5, 8), torch.randn(3, 6)
    drop = torch.tensor([True, False, True])
    new_prompt, new_pooled = drop_conditions(drop, prompt, pooled, injection, negative)
    assert torch.equal(new_prompt[1], prompt[1]) and torch.equal(new_prompt[0], negative[0][0])
    assert torch.equal(new_pooled[2], negative[1][2]) and torch.equal(new_pooled[1], pooled[1])
    assert torch.equal(injection.ip_tokens[1], kept_ip[1]) and torch.equal(injection.ip_tokens[0], negative[2][0])
    assert injection.text_rows.tolist() == [False, True, False]


def test_a_guided_step_doubles_the_batch_negative_first_and_extrapolates():
    torch.manual_seed(0)
    projection = ImageTokenProjection(7, 8, 4)
    injection, negative = _negative(projection=projection)
    injection.text_rows = torch.ones(3, dtype=torch.bool)
    prompt, pooled = torch.randn(3, 5, 8), torch.randn(3, 6)
    cond_ip = injection.ip_tokens.clone()
    both_prompt, both_pooled = guided_batch(prompt, pooled, injection, negative)
    assert torch.equal(both_prompt[:3], negative[0]) and torch.equal(both_prompt[3:], prompt)
    assert torch.equal(both_pooled[3:], pooled) and torch.equal(injection.ip_tokens[3:], cond_ip)
    assert injection.text_rows.tolist() == [False] * 3 + [True] * 3
    eps_u, eps_c = torch.randn(2, 4), torch.randn(2, 4)
    assert torch.allclose(guide(eps_u, eps_c, 1.0), eps_c)
    assert torch.allclose(guide(eps_u, eps_c, 3.0), eps_u + 3.0 * (eps_c - eps_u))


def test_kl_terms_cover_the_branches_with_a_temporal_router():
    t = torch.tensor([10, 500, 990])
    probs = torch.softmax(torch.randn(3, 4), -1)
    out = kl_terms({"image": probs, "text": None}, t, 1.0, 0.0, None, "coarse_first", 1000)
    assert set(out) == {"image"}
    assert torch.allclose(out["image"], level_kl(probs, gaussian_level_target(t, 4, 1.0, 0.0, 1000, "coarse_first",
                                                                              1000)))


class _Encoder(nn.Module):
    num_experts, embed_dim = [1, 2], 3

    def embed(self, sub, subject):  # the expert source interface (FrozenStage1, CachedStage1)
        return [sub["voxels"][:, None, :3].expand(-1, e, -1).double() for e in self.num_experts]


def test_expert_embeddings_come_from_the_encoder_as_float32_and_shuffle_rolls_them_by_one():
    encoders = {"image": _Encoder()}
    sub = {"voxels": torch.arange(12.0).reshape(4, 3), "nsd_id": torch.arange(4)}
    plain = expert_embeddings(encoders, {}, sub, "subj01", False, None)
    assert [x.dtype for x in plain["image"]] == [torch.float32] * 2
    assert torch.equal(plain["image"][0][:, 0], sub["voxels"])
    rolled = expert_embeddings(encoders, {}, sub, "subj01", True, None)
    assert torch.equal(rolled["image"][1], plain["image"][1].roll(1, 0))
    with pytest.raises(ValueError, match="at least 2 images"):
        expert_embeddings(encoders, {}, {"voxels": sub["voxels"][:1], "nsd_id": sub["nsd_id"][:1]}, "subj01",
                          True, None)
    with pytest.raises(ValueError, match="model.condition_tables.text: no such branch"):
        build_condition_tables({"text": "/nowhere"}, {"image": (_Encoder(), BranchSpec())})


def test_regional_branches_share_one_grid_and_checkpoints_hold_exactly_the_stored_parts():
    assert regional_grid(None, BranchSpec(spatial=True, regional=False, grid=4)) == 1
    assert regional_grid(BranchSpec(spatial=True, regional=True, grid=2), None) == 2
    with pytest.raises(ValueError, match="same grid"):
        regional_grid(BranchSpec(spatial=True, regional=True, grid=2), BranchSpec(spatial=True, regional=True, grid=4))
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    names = stored_names(module, {"a": [module[0]], "b": [module[1]]}, ["a"])
    assert names == {"0.weight", "0.bias"}
    check_stored(names, set(names))
    with pytest.raises(ValueError, match=r"missing \['0.weight'\]"):
        check_stored(names, {"0.bias"})


def test_the_noise_of_an_image_depends_only_on_subject_id_and_salt():
    ids = torch.tensor([3, 7, 9])
    both = image_noise("subj01", ids, (2, 4, 4), salt=5)
    assert torch.equal(both[1:2], image_noise("subj01", ids[1:2], (2, 4, 4), salt=5))
    assert not torch.equal(both, image_noise("subj02", ids, (2, 4, 4), salt=5))
    assert not torch.equal(both, image_noise("subj01", ids, (2, 4, 4), salt=6))
