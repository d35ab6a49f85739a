"""Stage 2's frozen weights, loaded lazily: ``RoutedDiffusionModule.__init__`` builds the architecture only
(``sdxl_loading.sdxl_skeleton``: the UNet and VAE from their config files on ``meta``, zero prompt placeholders),
so the real module builds on the ``meta`` device for its parameter report; ``configure_model`` (Lightning calls it
once per process, where the model is built, before the checkpoint is restored and the optimiser made) loads what
the files hold (``load_frozen_parts``).

Loading, in phases so that a rank never holds two large parts at once: the IP-Adapter file (into the processors
built at ``__init__``, frozen ones already in ``frozen_dtype``); the text encoders, for the fixed prompts and the
text branch's SOS token, then freed; the UNet and VAE (``load_frozen_sdxl``), the module's attention processors
moved onto the loaded UNet (the same modules, so their names and loaded weights are kept) and a fresh LoRA on it;
then what is trained (``stage2_parts.apply_trainable``) and, for a fit, the ``init_from`` transfer.
"""

from __future__ import annotations

from pathlib import Path

from lightning_modules import sdxl_loading, stage2_parts
from lightning_modules.components.injection import load_ip_adapter_weights
from lightning_modules.components.target_embedders import MissingWeightsError
from lightning_modules.sdxl_loading import DTYPES


def check_frozen_files(ip_adapter_weights: str | None) -> None:
    """The files ``load_frozen_parts`` will read beyond the SDXL directory (checked by ``sdxl_skeleton``) exist
    (nothing is read when building on ``meta``)."""
    if ip_adapter_weights and not sdxl_loading.building_on_meta() and not Path(ip_adapter_weights).is_file():
        raise MissingWeightsError(f"model.ip_adapter_weights: no IP-Adapter file at {ip_adapter_weights} (e.g. "
                                  "h94/IP-Adapter sdxl_models/ip-adapter_sdxl.bin, downloaded beforehand)")


def load_frozen_parts(module, fitting: bool) -> None:
    """Fill ``module`` (a ``RoutedDiffusionModule`` built from its skeleton) with its frozen weights (see the
    module docstring); ``fitting``: load ``init_from`` as well."""
    h = module.hparams
    if h.ip_adapter_weights and module.image_projection is not None:  # first, so the file is freed before the UNet
        load_ip_adapter_weights(h.ip_adapter_weights, module.image_projection, module.ip_processors)
    # then in two phases, so a process never holds the fp32 text encoders and the UNet at once: prompts first
    text = sdxl_loading.load_sdxl(h.sdxl_dir, "model.sdxl_dir", h.frozen_dtype, include=("text",))
    for name, value in sdxl_loading.fixed_prompts(text, h.negative_prompt).items():
        setattr(module, name, value)
    if module.brain_prompt is not None:
        module.brain_prompt.set_sos(sdxl_loading.sos_embedding(text, h.sos_prompt))
    del text
    parts = sdxl_loading.load_frozen_sdxl(h.sdxl_dir, "model.sdxl_dir", h.frozen_dtype, include=("unet", "vae"))
    unet = parts.unet
    unet.set_attn_processor(dict(module.unet.attn_processors))
    sdxl_loading.add_lora(unet, h.lora_rank, h.lora_alpha, h.lora_targets, h.lora_init)
    if h.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    module.unet, module.vae = unet, parts.vae
    # frozen, loaded IP-Adapter weights stay in the frozen dtype like the UNet they extend (half of 1.4 GB in fp32)
    stage2_parts.apply_trainable(module.parts(), module.trainable, module.stored_parts, DTYPES[h.frozen_dtype])
    if fitting and h.init_from:
        module.load_from_stage2(h.init_from)
