"""Stage 1's parts / freezing, transfer-loading and evaluation helpers (``stage1_parts``, ``stage1_evaluation``)
on their own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.brain_encoder import BrainEncoderModule
from lightning_modules.checkpoint_files import load_state_dict_file
from lightning_modules.components import HierarchicalMoE
from lightning_modules.components.batched_layers import BatchedLayerNorm
from lightning_modules.stage1_evaluation import encode_repeats, repeat_weights
from lightning_modules.stage1_parts import (
    ALL_PARTS,
    check_subjects,
    check_target_widths,
    decay_groups,
    parameter_summary,
    stage1_parts,
)


def _model(**kw) -> BrainEncoderModule:
    torch.manual_seed(0)
    return BrainEncoderModule(HierarchicalMoE(hidden_dim=16, out_dim=8, clip_hidden=8, num_blocks=1),
                              num_voxels={"subj01": 20, "subj02": 12}, **kw)


def test_every_parameter_is_in_exactly_one_part_and_trainable_freezes_by_part():
    model = _model(trainable=["routers"])
    parts = stage1_parts(model, model.new_subjects)
    assert set(parts) == set(ALL_PARTS)
    ids = [id(p) for modules in parts.values() for m in modules for p in m.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    trained = {id(p) for m in parts["routers"] for p in m.parameters()}
    assert all(p.requires_grad == (id(p) in trained) for p in model.parameters())
    counts = model.parameter_counts()
    assert counts["trainable"] == sum(p.numel() for m in parts["routers"] for p in m.parameters())
    assert parameter_summary(counts).startswith("stage 1 parameters: adapters ")


def test_biases_and_norms_get_no_weight_decay():
    model = _model()
    decay, plain = decay_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    norms = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, BatchedLayerNorm)) for p in m.parameters(recurse=False)}
    biases = {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    assert {id(p) for p in plain["params"]} == norms | biases
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_subject_and_target_checks_name_the_option():
    assert check_subjects({"1": 5}, ["subj01"], "x.ckpt") == ({"subj01": 5}, ["subj01"])
    with pytest.raises(ValueError, match="model.num_voxels is empty"):
        check_subjects({}, None, None)
    with pytest.raises(ValueError, match="not among the data subjects"):
        check_subjects({"subj01": 5}, ["subj02"], "x.ckpt")
    with pytest.raises(ValueError, match="needs model.init_from"):
        check_subjects({"subj01": 5}, ["subj01"], None)
    cache = type("Cache", (), {"shape": (4, 2), "directory": "d"})()
    check_target_widths({"clip_image": cache}, {("model.target", "clip_image"): 8})
    check_target_widths(None, {("model.target", "clip_image"): 8})  # no data module: nothing to check
    with pytest.raises(ValueError, match="holds 8-wide items"):
        check_target_widths({"clip_image": cache}, {("model.target", "clip_image"): 6})
    with pytest.raises(ValueError, match="is not among data.targets"):
        check_target_widths({}, {("model.target", "clip_image"): 8})
    with pytest.raises(FileNotFoundError, match="model.init_from: no checkpoint at"):
        load_state_dict_file("/nowhere.ckpt", "model.init_from")


def test_repeat_averaging_at_the_output_or_the_input():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.allclose(repeat_weights(mask), torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    voxels = torch.randn(2, 3, 4)
    encode = lambda x, subject: x * 2  # noqa: E731 - a linear "encoder": both averagings agree
    out, average = encode_repeats(encode, voxels, mask, "subj01", "output")
    assert out.shape == (6, 4)
    out_in, identity = encode_repeats(encode, voxels, mask, "subj01", "input")
    assert out_in.shape == (2, 4) and torch.allclose(average(out), identity(out_in))
