"""Caching of the stages' fixed targets (CLIP embeddings: ``targets``) and of SDXL VAE latents (``latents``)."""
