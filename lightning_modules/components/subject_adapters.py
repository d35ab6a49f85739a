"""Per-subject input adapters: voxels of each subject -> the shared hidden width."""

from __future__ import annotations

import torch
from torch import nn


class SubjectAdapters(nn.Module):
    """One Linear(V_s -> H) per subject ("ridge"), or with an information bottleneck V_s -> b -> H (two Linears,
    no activation) when ``bottleneck`` is set. (B, V_s) -> (B, H)."""

    def __init__(self, num_voxels: dict[str, int], hidden_dim: int, bottleneck: int | None = None):
        super().__init__()
        self.hidden_dim, self.bottleneck = hidden_dim, bottleneck
        self.adapters = nn.ModuleDict()
        for subject, voxels in num_voxels.items():
            self.add_subject(subject, voxels)

    def add_subject(self, subject: str, num_voxels: int) -> nn.Module:
        if subject in self.adapters:
            raise ValueError(f"adapter for {subject} already exists")
        if self.bottleneck:
            adapter = nn.Sequential(nn.Linear(num_voxels, self.bottleneck), nn.Linear(self.bottleneck, self.hidden_dim))
        else:
            adapter = nn.Linear(num_voxels, self.hidden_dim)
        self.adapters[subject] = adapter
        return adapter

    @property
    def subjects(self) -> list[str]:
        return list(self.adapters)

    def forward(self, voxels: torch.Tensor, subject: str) -> torch.Tensor:
        if subject not in self.adapters:
            raise KeyError(f"no adapter for {subject}; the model has adapters for {self.subjects} "
                           "(add one with model.new_subjects)")
        adapter = self.adapters[subject]
        expected = adapter[0].in_features if isinstance(adapter, nn.Sequential) else adapter.in_features
        if voxels.shape[-1] != expected:
            raise ValueError(f"{subject}: voxels have {voxels.shape[-1]} values, its adapter expects {expected}")
        return adapter(voxels)
