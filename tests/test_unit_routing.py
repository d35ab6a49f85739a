"""Expert choice that keeps unit identity (``scoring: unit / value_unit``) against the reference (``value``)."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components.moe_encoder import HierarchicalMoE
from lightning_modules.components.routers import ExpertChoiceRouter


def test_unit_scoring_routes_the_same_units_for_every_sample_and_value_scoring_does_not():
    x = torch.randn(16, 1, 24)
    reference = ExpertChoiceRouter(1, 2, 24, gate_init=1.0).eval()(x)
    # the reference: an expert's unit set depends on the values, so samples disagree
    assert not all(torch.equal(reference.indices[0], reference.indices[b]) for b in range(16))
    unit = ExpertChoiceRouter(1, 2, 24, scoring="unit").eval()(x)
    assert all(torch.equal(unit.indices[0], unit.indices[b]) for b in range(16))
    # two children at capacity 1 split the parent's units: a partition, each unit exactly once
    assert sorted(unit.indices[0].flatten().tolist()) == list(range(24))
    # inputs are still the selected values times their gates
    torch.testing.assert_close(unit.inputs, x[:, 0].gather(1, unit.indices.flatten(1)).reshape(16, 2, 12)
                               * unit.gates)


def test_value_unit_adds_the_affinity_to_the_value_term_and_both_train():
    router = ExpertChoiceRouter(3, 2, 10, gate_init=1.0, scoring="value_unit")
    x = torch.randn(4, 3, 10)
    expected = x.unsqueeze(-1) * router.weight[None, :, None, :] + router.affinity[None]
    torch.testing.assert_close(router.logits(x), expected)
    router.eval()(x).inputs.sum().backward()
    assert router.affinity.grad.abs().sum() > 0 and router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="scoring"):
        ExpertChoiceRouter(1, 2, 10, scoring="position")


def test_the_moe_passes_the_scoring_to_every_level():
    moe = HierarchicalMoE(hidden_dim=32, out_dim=8, num_levels=3, num_blocks=1, scoring="unit").eval()
    assert all(r.scoring == "unit" and r.affinity is not None for r in moe.routers)
    out = moe(torch.randn(5, 32))
    level0 = out.routing[0].indices
    assert all(torch.equal(level0[0], level0[b]) for b in range(5))
