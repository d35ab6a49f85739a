"""NSD data layer: shard format, importers, the synthetic dataset and the LightningDataModule."""

from datamodules.errors import DataFormatError
from datamodules.nsd import NSDDataModule

__all__ = ["DataFormatError", "NSDDataModule"]
