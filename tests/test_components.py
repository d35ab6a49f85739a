"""Stage-1 building blocks: routing partition and capacity, shapes, gradients, batched == per-expert loop,
determinism, and losses against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.components.batched_layers import BatchedLinear, BatchedProjector, BatchedResidualMLP
from lightning_modules.components.losses import (
    cosine_anneal,
    cosine_loss,
    mixco_inputs,
    mixco_nce,
    soft_clip_loss,
)
from lightning_modules.components.moe_encoder import HierarchicalMoE
from lightning_modules.components.routers import ExpertChoiceRouter, balance_loss, routing_entropy
from lightning_modules.components.subject_adapters import SubjectAdapters


def tiny_moe(**kw):
    args = dict(hidden_dim=64, out_dim=16, clip_hidden=24, num_blocks=2, dropout=0.0, gate_init=0.5)
    args.update(kw)
    torch.manual_seed(0)
    return HierarchicalMoE(**args)


def test_binary_router_partitions_units_with_capacity():
    router = ExpertChoiceRouter(num_parents=3, num_children=2, units=10, gate_init=1.0).eval()
    x = torch.randn(4, 3, 10)
    r = router(x)
    assert r.inputs.shape == r.indices.shape == r.gates.shape == (4, 6, 5)
    for b in range(4):
        for p in range(3):
            taken = torch.cat([r.indices[b, 2 * p], r.indices[b, 2 * p + 1]]).sort().values
            assert torch.equal(taken, torch.arange(10))  # complementary split of the parent's units
    assert (r.indices.diff(dim=-1) > 0).all()  # sorted positions
    expected = x[0, 1][r.indices[0, 2]] * r.probs[0, 1, r.indices[0, 2], 0]
    assert torch.allclose(r.inputs[0, 2], expected)


def test_router_capacity_factor_and_overlap():
    router = ExpertChoiceRouter(1, 4, 12, capacity_factor=2.0).eval()
    assert router.capacity == 6
    assert router(torch.randn(2, 1, 12)).indices.shape == (2, 4, 6)
    with pytest.raises(ValueError, match="capacity"):
        ExpertChoiceRouter(1, 4, 12, capacity_factor=0.1)


def test_moe_shapes_at_every_level_and_routing_record():
    moe = tiny_moe().eval()
    out = moe(torch.randn(5, 64))
    assert moe.num_experts == [2, 4, 8, 16] and moe.widths == [32, 16, 8, 4]
    for level, (b, c, r) in enumerate(zip(out.backbone, out.clip, out.routing)):
        e, k = moe.num_experts[level], moe.widths[level]
        assert b.shape == c.shape == (5, e, 16)
        assert r.gates.shape == r.indices.shape == (5, e, k)
        units = 64 if level == 0 else moe.widths[level - 1]
        assert int(r.indices.max()) < units
        assert r.parent.tolist() == ([-1, -1] if level == 0 else [i // 2 for i in range(e)])
    assert out.backbone_level_sums.shape == (5, 4, 16)
    assert torch.allclose(out.clip_mean, torch.stack([c.sum(1) for c in out.clip]).mean(0), atol=1e-6)


def test_gradients_reach_every_gate_and_expert():
    moe = tiny_moe().train()
    out = moe(torch.randn(8, 64))
    (out.clip_mean.square().sum() + out.balance).backward()
    for level, router in enumerate(moe.routers):
        assert router.weight.grad is not None and (router.weight.grad.abs() > 0).all(), level
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _loop_linear(layer: BatchedLinear, x):
    return torch.stack([x[:, e] @ layer.weight[e] + layer.bias[e] for e in range(layer.num_experts)], 1)


def test_batched_layers_equal_a_per_expert_loop():
    torch.manual_seed(1)
    lin = BatchedLinear(5, 7, 3)
    x = torch.randn(4, 5, 7)
    assert torch.allclose(lin(x), _loop_linear(lin, x), atol=1e-6)
    mlp = BatchedResidualMLP(5, 7, num_blocks=2, dropout=0.0)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_()
    expected = []
    for e in range(5):
        h = x[:, e]
        for block in mlp.blocks:
            n = F.layer_norm(h, (7,), block["norm"].weight[e], block["norm"].bias[e])
            a = F.gelu(n @ block["fc1"].weight[e] + block["fc1"].bias[e])
            h = h + a @ block["fc2"].weight[e] + block["fc2"].bias[e]
        expected.append(h)
    assert torch.allclose(mlp(x), torch.stack(expected, 1), atol=1e-5)
    proj = BatchedProjector(5, 7, 9)
    expected = []
    for e in range(5):
        h = x[:, e]
        for norm, linear in zip(proj.norms, proj.linears):
            h = F.gelu(F.layer_norm(h, h.shape[-1:], norm.weight[e], norm.bias[e])) @ linear.weight[e] + linear.bias[e]
        expected.append(h)
    assert torch.allclose(proj(x), torch.stack(expected, 1), atol=1e-5)


def test_moe_equals_a_straightforward_per_expert_implementation():
    """The whole tree against a loop over levels, parents and experts with per-sample top-k (1e-6)."""
    moe = tiny_moe(deep_expert="linear").eval()
    x = torch.randn(3, 64)
    out = moe(x)
    for b in range(3):
        feats = [x[b]]  # outputs of the previous level's experts
        for level in range(4):
            router = moe.routers[level]
            outs = []
            for p, parent_units in enumerate(feats):
                probs = torch.softmax(parent_units[:, None] * router.weight[p][None], -1)  # (u, f)
                for c in range(router.num_children):
                    idx = torch.topk(probs[:, c], router.capacity).indices.sort().values
                    inp = parent_units[idx] * probs[idx, c]
                    e = p * router.num_children + c
                    expert = moe.experts[level]
                    if level == 0:
                        h = expert(inp[None, None].expand(1, moe.num_experts[0], -1).contiguous())[0, e]
                    else:
                        h = inp @ expert.weight[e] + expert.bias[e]
                    head = moe.backbone_heads[level]
                    emb = h @ head.weight[e] + head.bias[e]
                    assert torch.allclose(out.backbone[level][b, e], emb, atol=1e-6)
                    outs.append(h)
            feats = outs


def test_routing_is_deterministic_in_eval_and_noisy_in_training():
    moe = tiny_moe(gate_init=1e-4).eval()
    x = torch.randn(4, 64)
    a, b = moe(x), moe(x)
    assert all(torch.equal(p.indices, q.indices) for p, q in zip(a.routing, b.routing))
    moe.train()
    torch.manual_seed(0)
    c = moe(x)
    torch.manual_seed(1)
    d = moe(x)
    assert any(not torch.equal(p.indices, q.indices) for p, q in zip(c.routing, d.routing))


def test_balance_and_entropy():
    uniform = torch.full((2, 1, 6, 3), 1 / 3)
    assert balance_loss(uniform).item() == pytest.approx(0.0, abs=1e-12)
    assert routing_entropy(uniform).item() == pytest.approx(np.log(3))
    skewed = torch.tensor([0.8, 0.1, 0.1]).expand(2, 1, 6, 3)
    load = np.array([0.8, 0.1, 0.1])
    assert balance_loss(skewed).item() == pytest.approx(load.var() / load.mean() ** 2, rel=1e-5)


def test_subject_adapters_and_bottleneck():
    adapters = SubjectAdapters({"subj01": 30, "subj02": 20}, hidden_dim=8, bottleneck=4)
    assert adapters(torch.randn(2, 20), "subj02").shape == (2, 8)
    assert [m.out_features for m in adapters.adapters["subj01"]] == [4, 8]
    with pytest.raises(ValueError, match="expects 30"):
        adapters(torch.randn(2, 20), "subj01")
    with pytest.raises(KeyError, match="subj05"):
        adapters(torch.randn(2, 20), "subj05")


def _np_log_softmax(a, axis):
    a = a - a.max(axis, keepdims=True)
    return a - np.log(np.exp(a).sum(axis, keepdims=True))


def test_soft_clip_loss_against_numpy():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    temp = 0.05
    soft = np.exp(_np_log_softmax(t @ t.T / temp, -1))
    logits = p @ t.T / temp
    expected = (-(_np_log_softmax(logits, -1) * soft).sum(-1).mean()
                - (_np_log_softmax(logits.T, -1) * soft).sum(-1).mean()) / 2
    got = soft_clip_loss(torch.tensor(p), torch.tensor(t), temp).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_mixco_against_numpy():
    rng = np.random.default_rng(1)
    p, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    betas, perm = np.array([1.0, 0.3, 1.0, 0.9, 0.2]), np.array([2, 0, 4, 1, 3])
    labels = np.diag(betas)
    labels[np.arange(5), perm] += 1 - betas
    logits = p @ t.T / 0.1
    expected = (-(_np_log_softmax(logits, -1) * labels).sum(-1).mean()
                - (_np_log_softmax(logits.T, -1) * labels.T).sum(-1).mean()) / 2
    got = mixco_nce(torch.tensor(p), torch.tensor(t), 0.1, torch.tensor(betas), torch.tensor(perm)).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_mixco_inputs_mix_each_row_with_the_partner_its_label_names():
    """Independently of mixco_inputs' own formula: numpy finds, for every mixed row, the pair of original rows and
    the weight it is made of (least squares over every candidate partner); they must be (i, perm[i]) and betas[i],
    which is what ``mixco_labels`` puts the soft label on."""
    torch.manual_seed(0)
    voxels = torch.randn(64, 7, dtype=torch.float64)
    mixed, b, pm = mixco_inputs(voxels, torch.Generator().manual_seed(0))
    x, m, b, pm = voxels.numpy(), mixed.numpy(), b.numpy(), pm.numpy()
    assert sorted(pm.tolist()) == list(range(64))  # a permutation
    assert 0.25 < (b < 1).mean() < 0.75  # about half the samples are mixed
    identified = 0
    for i in range(64):
        if b[i] == 1:
            np.testing.assert_array_equal(m[i], x[i])  # unmixed rows are untouched
        if not 0.02 < b[i] < 0.98:  # (nearly) one row alone: its partner cannot be told from the data
            continue
        identified += 1
        # m = beta x_i + (1 - beta) x_j  <=>  m - x_j = beta (x_i - x_j): one-parameter least squares per j
        d, r = x[i][None] - x, m[i][None] - x
        beta = (d * r).sum(1) / np.maximum((d * d).sum(1), 1e-300)
        residual = np.linalg.norm(r - beta[:, None] * d, axis=1)
        residual[i] = np.inf
        j = int(residual.argmin())
        assert residual[j] < 1e-9 and j == pm[i], (i, j, pm[i])
        assert beta[j] == pytest.approx(b[i], abs=1e-9)
        assert np.sort(residual)[1] > 1e-3  # no other partner explains the row
    assert identified >= 8


def test_contrastive_losses_are_float32_under_bf16_autocast():
    """bf16 logits at T = 0.02 are off by ~0.1; the losses must be what float32 computes, to float32 precision."""
    torch.manual_seed(0)
    p = F.normalize(torch.randn(32, 64), dim=-1)
    t = F.normalize(p + 0.5 * torch.randn(32, 64), dim=-1)
    betas, perm = torch.rand(32), torch.randperm(32)
    losses = {"softclip": lambda: soft_clip_loss(p, t, 0.02),
              "mixco": lambda: mixco_nce(p, t, 0.03, betas, perm), "cosine": lambda: cosine_loss(p, t)}
    for name, loss in losses.items():
        reference = loss()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = loss()
        assert got.dtype == torch.float32, name
        assert got.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-7), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_logits = p @ t.T / 0.02
    assert (bf16_logits.float() - p @ t.T / 0.02).abs().max() > 1e-2


def test_cosine_helpers():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert cosine_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert cosine_loss(a, -a).item() == pytest.approx(2.0)
    assert cosine_anneal(1.0, 3.0, 0.0) == 1.0 and cosine_anneal(1.0, 3.0, 1.0) == 3.0
    assert cosine_anneal(1.0, 3.0, 0.5) == pytest.approx(2.0)


@pytest.mark.parametrize("steps", [10, 30, 100])
def test_prior_sampling_starts_at_the_last_training_timestep(steps):
    """Trailing DDIM spacing: the first step denoises pure noise at t = T - 1 (leading spacing started at 90 of 100
    for 10 steps) and the last reaches the clean sample."""
    from lightning_modules.components.diffusion_prior import DiffusionPrior

    prior = DiffusionPrior(embed_dim=8, num_layers=1, num_heads=2, head_dim=4, timesteps=100).eval()
    seen = []
    original = prior.predict_x0

    def spy(noisy, timesteps, condition):
        seen.append(int(timesteps[0]))
        return original(noisy, timesteps, condition)

    prior.predict_x0 = spy
    prior.sample(torch.randn(2, 8), generator=torch.Generator().manual_seed(0), steps=steps, guidance_scale=1.0)
    assert seen[0] == 99 and len(seen) == steps and seen == sorted(seen, reverse=True)


def test_level0_identity_is_the_input_plus_learned_constants_as_in_the_reference():
    moe = tiny_moe(level0="identity", num_blocks=4).eval()
    expert = moe.experts[0]
    assert sum(p.numel() for p in expert.parameters()) == 2 * 4 * 6  # the reference's 48 channel-block scalars
    x = torch.randn(5, 2, 32)
    shift = expert(x) - x
    constant = expert(torch.zeros(1, 2, 32))  # (1, E, d): one value per expert, the same for every feature
    assert torch.allclose(shift, constant.expand_as(shift), atol=1e-6)
    assert torch.allclose(constant, constant[..., :1].expand_as(constant))
    # the constant is what the reference's channel blocks compute: sum_k w2 * gelu(w1 * ln_bias + b1) + b2
    e = expert
    expected = (e.w2 * F.gelu(e.w1 * e.norm_bias + e.b1) + e.b2).sum(1)
    assert torch.allclose(constant[0, :, 0], expected, atol=1e-6)
    out = moe(torch.randn(4, 64))
    out.clip_mean.sum().backward()
    assert e.b2.grad is not None and e.b2.grad.abs().sum() > 0
    assert tiny_moe().experts[0].__class__.__name__ == "BatchedResidualMLP"  # the default stays ours
    with pytest.raises(ValueError, match="level0"):
        tiny_moe(level0="linear")
