"""LightningModules of both stages; plain ``nn.Module`` building blocks live in ``lightning_modules.components``."""

from lightning_modules.brain_encoder import BrainEncoderModule

__all__ = ["BrainEncoderModule"]
