"""Plain ``nn.Module`` building blocks (no Lightning imports): routers, experts, adapters, prior, losses."""

from lightning_modules.components.diffusion_prior import DiffusionPrior
from lightning_modules.components.moe_encoder import HierarchicalMoE
from lightning_modules.components.subject_adapters import SubjectAdapters

__all__ = ["DiffusionPrior", "HierarchicalMoE", "SubjectAdapters"]
