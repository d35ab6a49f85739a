"""NSD data layer: shard format, importers, the synthetic dataset and the LightningDataModule.

``NSDDataModule`` is imported lazily so that the data commands (generation, import) do not pay for Lightning.
"""

from datamodules.common import DataFormatError

__all__ = ["DataFormatError", "NSDDataModule"]


def __getattr__(name: str):
    if name == "NSDDataModule":
        from datamodules.nsd import NSDDataModule

        return NSDDataModule
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
