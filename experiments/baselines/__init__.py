"""Baselines that are not LightningModules: the ridge regression from voxels to targets (``ridge``)."""
