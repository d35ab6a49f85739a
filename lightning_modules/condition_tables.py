"""Fixed per-image embeddings in place of a branch's frozen stage-1 experts (stage 2's reference rows).

A condition table is a target cache (``datamodules.target_cache``: ``ids.npy``, ``values.npy``, ``meta.json``)
keyed by ``nsd_id``: either one directory for every subject (the true CLIP targets, what a perfect stage 1 would
give) or one sub-directory per subject (``DIR/subj01``: e.g. a ridge baseline's predicted test embeddings).
``lookup`` spreads each image's embedding (D,) over the experts of every level so that the branch's pooling gives
the embedding back: every expert holds ``e / E_l`` under ``pool: sum`` (the level sum is ``e``) and ``e`` under
``pool: mean``; routers then see identical experts, so the table row is what the branch injects at every step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datamodules.shard_format import subject_name
from datamodules.target_cache import TargetCache


class ConditionTable:
    """``directory`` (shared or per subject) -> ``lookup(subject, nsd_ids)`` = [(b, E_l, D)] per level."""

    def __init__(self, directory: str | Path, option: str, num_experts: list[int], embed_dim: int, pool: str):
        self.directory, self.option = Path(directory), option
        self.num_experts, self.embed_dim, self.pool = list(num_experts), int(embed_dim), pool
        self._caches: dict[str, TargetCache] = {}
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{option}: no condition table at {self.directory} (a target-cache directory, "
                                    "or one per subject below it)")

    def cache(self, subject: str) -> TargetCache:
        name = subject_name(subject)
        if name not in self._caches:
            own = self.directory / name
            directory = own if (own / "meta.json").is_file() else self.directory
            cache = TargetCache(directory)
            width = int(np.prod(cache.shape))
            if width != self.embed_dim:
                raise ValueError(f"{self.option}: {directory} holds {width}-d embeddings, but the branch's "
                                 f"experts are {self.embed_dim}-d")
            self._caches[name] = cache
        return self._caches[name]

    def lookup(self, subject: str, nsd_ids: torch.Tensor, device: torch.device | None = None
               ) -> list[torch.Tensor]:
        """(b,) nsd_ids -> [(b, E_l, D)] float32, every expert of level l set so that its pooling gives the row."""
        cache = self.cache(subject)
        ids = nsd_ids.detach().cpu().numpy()
        rows = torch.from_numpy(cache.lookup(ids).reshape(len(ids), -1).astype("float32"))
        rows = rows.to(device) if device is not None else rows
        return [(rows / count if self.pool == "sum" else rows)[:, None].expand(-1, count, -1).contiguous()
                for count in self.num_experts]


def build_condition_tables(tables: dict[str, str] | None, branches: dict[str, tuple]) -> dict[str, ConditionTable]:
    """``model.condition_tables`` (branch -> directory) -> branch -> ``ConditionTable``; ``branches``: every enabled
    branch -> (its ``FrozenStage1`` encoder, its ``BranchSpec``)."""
    out: dict[str, ConditionTable] = {}
    for branch, directory in (tables or {}).items():
        if branch not in branches:
            raise ValueError(f"model.condition_tables.{branch}: no such branch in this configuration "
                             f"(branches: {list(branches)})")
        encoder, spec = branches[branch]
        out[branch] = ConditionTable(directory, f"model.condition_tables.{branch}", encoder.num_experts,
                                     encoder.embed_dim, spec.pool)
    return out


def expert_embeddings(encoders: dict[str, torch.nn.Module], tables: dict[str, ConditionTable], sub: dict,
                      subject: str, shuffle: bool, device: torch.device | None) -> dict[str, list[torch.Tensor]]:
    """One sub-batch's voxels (b, V) or (b, R, V) -> {branch: [(b, E_l, D)] float32} per branch of ``encoders``
    (frozen, computed once): a branch's condition table if it has one, else its frozen stage-1 encoder;
    ``shuffle`` (the chance-level control) rolls the rows by one within the batch."""
    out = {}
    for branch, encoder in encoders.items():
        if branch in tables:
            experts = tables[branch].lookup(subject, sub["nsd_id"], device)
        else:
            experts = encoder.embed(sub, subject)  # FrozenStage1 or CachedStage1
        if shuffle:
            if len(experts[0]) < 2:
                raise ValueError("model.shuffle_conditions needs batches of at least 2 images")
            experts = [x.roll(1, 0) for x in experts]
        out[branch] = [x.float() for x in experts]
    return out
