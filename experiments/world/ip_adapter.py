"""The world's IP-Adapter: image projection + decoupled ``to_k_ip``/``to_v_ip`` per cross-attention layer.

``ImageTokenProjection`` (B, 1, P) world-CLIP ``image_embeds`` -> (B, 4, C) image tokens, read by every
cross-attention layer through ``install_processors(unet, with_ip=True)`` and a global ``Injection``. Trained as
IP-Adapter is trained: UNet and CLIP frozen, denoising loss on the image's own embedding, the text dropped (empty
caption), the image dropped (zero embedding) or both for a fraction of samples each. ``to_k_ip``/``to_v_ip`` start
from the layer's text ``to_k``/``to_v`` (as the public recipe initialises them). Saved in the public layout
(``image_proj.*``, ``ip_adapter.<1 + 2 i>.to_k_ip.weight``) that ``load_ip_adapter_weights`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from experiments.world.build_helpers import optimiser_step, progress, seed_everything
from experiments.world.unet import alphas_cumprod, noisy, time_ids

NUM_TOKENS = 4


@dataclass
class IpConfig:
    steps: int = 600
    batch: int = 64
    lr: float = 1e-3
    drop_text: float = 0.3
    drop_image: float = 0.05
    drop_both: float = 0.05
    noise_offset: float = 0.0  # as UnetConfig.noise_offset


def attach(unet, embed_dim: int):
    """Install IP processors on ``unet``; returns (projection, processors), the IP weights initialised."""
    from lightning_modules.components.injection import ImageTokenProjection, install_processors

    processors = install_processors(unet, with_ip=True)
    projection = ImageTokenProjection(embed_dim, unet.config.cross_attention_dim, NUM_TOKENS)
    return projection, processors


def _init_from_text(unet, processors) -> None:
    modules = dict(unet.named_modules())
    cross = [modules[n[: -len(".processor")]] for n in unet.attn_processors if not n.endswith("attn1.processor")]
    with torch.no_grad():
        for attn, proc in zip(cross, processors):
            proc.to_k_ip.weight.copy_(attn.to_k.weight)
            proc.to_v_ip.weight.copy_(attn.to_v.weight)


def train_ip_adapter(cfg: IpConfig, unet, latents: torch.Tensor, latent_std: torch.Tensor, image_embeds: torch.Tensor,
                     caption_index: torch.Tensor, prompt: torch.Tensor, pooled: torch.Tensor, empty: int,
                     image_size: int, seed: int, show: bool = True):
    """Train on scaled latents (N, 4, h, w), the images' embeddings (N, P) and caption indices (N, 5) into the
    encoded prompts; returns (projection, processors, info)."""
    from lightning_modules.components.injection import Injection

    gen = seed_everything(seed)
    unet.requires_grad_(False)
    projection, processors = attach(unet, image_embeds.shape[-1])
    _init_from_text(unet, processors)
    params = [*projection.parameters(), *processors.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    acp = alphas_cumprod()
    ids = time_ids(cfg.batch, image_size)
    unet.eval()
    projection.train()
    losses = []
    for _ in progress(range(cfg.steps), "ip-adapter", enabled=show):
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        cap = caption_index[idx, torch.randint(0, caption_index.shape[1], (cfg.batch,), generator=gen)]
        r = torch.rand(cfg.batch, generator=gen)
        no_text = r < cfg.drop_text + cfg.drop_both
        no_image = (r >= cfg.drop_text) & (r < cfg.drop_text + cfg.drop_both + cfg.drop_image)
        cap = torch.where(no_text, empty, cap)
        emb = torch.where(no_image[:, None], 0.0, image_embeds[idx])
        z0 = latents[idx] + latent_std[idx] * torch.randn(latents[idx].shape, generator=gen)
        zt, noise, t = noisy(z0, gen, acp, cfg.noise_offset)
        tokens = projection(emb[:, None])
        pred = unet(zt, t, encoder_hidden_states=prompt[cap],
                    added_cond_kwargs={"text_embeds": pooled[cap], "time_ids": ids},
                    cross_attention_kwargs={"injection": Injection(ip_tokens=tokens)}).sample
        loss = F.mse_loss(pred, noise)
        losses.append(optimiser_step(loss, opt, sched, params))
    return projection.eval(), processors, {"final_loss": float(np.mean(losses[-100:]))}


def save_ip_adapter(projection, processors, path: Path) -> None:
    """Write the flat public-layout safetensors file (``image_proj.<k>``, ``ip_adapter.<k>``)."""
    from safetensors.torch import save_file

    from lightning_modules.components.injection import ip_adapter_state_dict

    state = ip_adapter_state_dict(projection, processors)
    flat = {f"{head}.{k}": v.contiguous() for head, sub in state.items() for k, v in sub.items()}
    save_file(flat, str(path))


def load_ip_adapter(path: Path, unet, embed_dim: int):
    """Install fresh IP processors on ``unet`` and load ``path`` into them through ``load_ip_adapter_weights``."""
    from lightning_modules.components.injection import load_ip_adapter_weights

    projection, processors = attach(unet, embed_dim)
    load_ip_adapter_weights(path, projection, processors)
    return projection.eval(), processors
