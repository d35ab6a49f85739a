"""LightningModules of both stages; plain ``nn.Module`` building blocks live in ``lightning_modules.components``."""

from lightning_modules.brain_encoder import BrainEncoderModule
from lightning_modules.routed_diffusion import RoutedDiffusionModule

__all__ = ["BrainEncoderModule", "RoutedDiffusionModule"]
