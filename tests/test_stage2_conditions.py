"""Stage 2's reference rows and guidance dropout: condition tables, shuffled conditions, condition dropout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.target_cache import write_target_cache
from lightning_modules.condition_tables import ConditionTable
from tests.test_stage2_module import build


def _table(directory: Path, ids: np.ndarray, dim: int, seed: int = 0) -> tuple[Path, np.ndarray]:
    values = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
    return write_target_cache(directory, ids, values, model="test", layer="test"), values


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_table_rows_come_back_through_the_branch_pooling(tmp_path, pool):
    ids = np.array([5, 2, 9])
    directory, values = _table(tmp_path / "t", ids, 6)
    table = ConditionTable(directory, "model.condition_tables.image", [2, 4], 6, pool)
    levels = table.lookup("subj01", torch.tensor([9, 5]))
    assert [tuple(x.shape) for x in levels] == [(2, 2, 6), (2, 4, 6)]
    expected = torch.from_numpy(values[[2, 0]])
    for x in levels:
        pooled = x.sum(1) if pool == "sum" else x.mean(1)
        torch.testing.assert_close(pooled, expected)
        assert torch.equal(x[:, 0], x[:, -1])  # every expert of a level holds the same row


def test_per_subject_tables_and_bad_tables_are_named(tmp_path):
    ids = np.array([1, 2])
    _, own = _table(tmp_path / "ridge" / "subj02", ids, 4, seed=1)
    table = ConditionTable(tmp_path / "ridge", "model.condition_tables.text", [2], 4, "mean")
    torch.testing.assert_close(table.lookup("subj02", torch.tensor([2]))[0][:, 0], torch.from_numpy(own[[1]]))
    with pytest.raises(ValueError, match=r"model.condition_tables.text: .* 4-d embeddings, but .* 8-d"):
        ConditionTable(tmp_path / "ridge", "model.condition_tables.text", [2], 8, "mean").lookup(
            "subj02", torch.tensor([1]))
    with pytest.raises(FileNotFoundError, match="model.condition_tables.image: no condition table"):
        ConditionTable(tmp_path / "absent", "model.condition_tables.image", [2], 4, "mean")
    with pytest.raises(Exception, match="no entry for nsd_id 7"):
        table.lookup("subj02", torch.tensor([7]))


@pytest.fixture(scope="module")
def batch(small_data):
    from datamodules import NSDDataModule

    dm = NSDDataModule(str(small_data), subjects=["subj01"], batch_size=4, eval_batch_size=6, num_workers=0,
                       val_images=4, samples_per_epoch=8)
    dm.prepare_data()
    dm.setup("test")
    sub = next(iter(dm.test_dataloader()[0]))
    return {k: (v[sub["valid"]] if isinstance(v, torch.Tensor) and len(v) == len(sub["valid"]) else v)
            for k, v in sub.items()}


def test_tables_replace_the_brain_and_shuffling_rolls_it(tiny_models, stage1_checkpoints, batch, targets):
    plain = build(tiny_models, stage1_checkpoints).eval()
    brain = plain.expert_embeddings(batch, "subj01")
    shuffled = build(tiny_models, stage1_checkpoints, shuffle_conditions=True).eval().expert_embeddings(
        batch, "subj01")
    for branch in brain:
        for a, b in zip(brain[branch], shuffled[branch]):
            torch.testing.assert_close(b, a.roll(1, 0))  # image i gets image i-1's brain: no image keeps its own
            assert not torch.allclose(a, b)
    tables = {"image": str(targets / "clip_image"), "text": str(targets / "clip_text")}
    model = build(tiny_models, stage1_checkpoints, condition_tables=tables).eval()
    silent = {**batch, "voxels": torch.zeros_like(batch["voxels"])}
    from_table = model.expert_embeddings(silent, "subj01")
    truth = torch.from_numpy(np.load(targets / "clip_image" / "values.npy"))
    ids = np.load(targets / "clip_image" / "ids.npy")
    rows = truth[np.searchsorted(ids, batch["nsd_id"].numpy())]
    for level in from_table["image"]:  # the image branch pools with mean: every expert is the true embedding
        torch.testing.assert_close(level[:, 0], rows)
    with pytest.raises(ValueError, match="model.condition_tables.sound: no such branch"):
        build(tiny_models, stage1_checkpoints, condition_tables={"sound": tables["image"]})


def test_condition_dropout_trains_dropped_rows_on_the_unconditional_half(tiny_models, stage1_checkpoints, batch):
    model = build(tiny_models, stage1_checkpoints, condition_dropout=0.5).eval()
    experts = model.expert_embeddings(batch, "subj01")
    latents = torch.randn(len(batch["nsd_id"]), 4, 8, 8)
    t = torch.full((len(latents),), 500)
    prompt, pooled, injection, _ = model.route(latents, t, experts)
    drop = torch.zeros(len(latents), dtype=torch.bool)
    drop[1] = True
    neg_prompt, neg_pooled, neg_ip = model.unconditional(injection, len(latents), latents.device)
    kept_ip = injection.ip_tokens.clone()
    new_prompt, new_pooled = model.drop_conditions(drop, prompt, pooled, injection)
    torch.testing.assert_close(new_prompt[1], neg_prompt[1])
    torch.testing.assert_close(new_pooled[1], neg_pooled[1])
    torch.testing.assert_close(injection.ip_tokens[1], neg_ip[1])
    torch.testing.assert_close(new_prompt[0], prompt[0])
    torch.testing.assert_close(injection.ip_tokens[0], kept_ip[0])
    assert not bool(injection.text_rows[1]) and bool(injection.text_rows[0])
    with pytest.raises(ValueError, match="model.condition_dropout"):
        build(tiny_models, stage1_checkpoints, condition_dropout=1.0)
