"""Load SDXL's parts from a local diffusers directory (``from_pretrained``, never a download).

The directory has the layout of ``stabilityai/stable-diffusion-xl-base-1.0``: ``unet/``, ``vae/``, ``scheduler/``,
``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``. Each model's weights are its fp32 files
or, when those are absent, the snapshot's ``fp16`` variant (``*.fp16.safetensors``, what many downloads keep),
loaded in the dtype asked for (the VAE and text encoders always in float32). A missing part or weight file raises
``MissingWeightsError`` naming the option to set. Also what stage 2 installs on them: the frozen UNet and VAE
(``load_frozen_sdxl``), the DDPM training schedule, the fixed prompt buffers (``fixed_prompts``) and the text
branch's ``brain_prompt``, the peft UNet LoRA (``add_lora``, ``LORA_TARGETS``) and its export, and VAE latents.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_modules.components.target_embedders import MissingWeightsError

NEEDS = {"unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json",
         "text_encoder": "config.json", "text_encoder_2": "config.json", "tokenizer": "tokenizer_config.json",
         "tokenizer_2": "tokenizer_config.json"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}


def weights_variant(root: Path, part: str, option: str = "model.sdxl_dir") -> str | None:
    """``None`` when ``root/part`` holds fp32 weights (one file or an index of shards), ``"fp16"`` when it holds only
    the fp16 variant; otherwise ``MissingWeightsError`` naming the part, the files looked for and ``option``."""
    stem = WEIGHT_STEMS[part]
    for variant, infix in ((None, ""), ("fp16", ".fp16")):
        names = [f"{stem}{infix}.safetensors", f"{stem}{infix}.safetensors.index.json"]
        if any((root / part / name).is_file() for name in names):
            return variant
    raise MissingWeightsError(f"{option}: {root / part} has no weights ({stem}.safetensors, its .fp16 variant or "
                              "a sharded index of either); copy the snapshot's weight files there")


@dataclass
class SDXLParts:
    unet: Any
    vae: Any
    scheduler_config: dict
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any


def check_sdxl_dir(directory: str | Path | None, option: str = "model.sdxl_dir") -> Path:
    root = Path(directory) if directory else None
    missing = [f"{part}/{name}" for part, name in NEEDS.items() if root is None or not (root / part / name).is_file()]
    if missing:
        raise MissingWeightsError(
            f"{option}: {directory!r} is not a local SDXL directory (missing {', '.join(missing[:3])}"
            f"{'...' if len(missing) > 3 else ''}). Point {option} at a copy of stable-diffusion-xl-base-1.0 "
            "saved with save_pretrained (nothing is downloaded); tiny random test models: "
            "`python -m experiments.make_tiny_models --out DIR`.")
    return root


def load_sdxl(directory: str | Path, option: str = "model.sdxl_dir", dtype: str = "float32",
              include: Sequence[str] = ("unet", "vae", "text")) -> SDXLParts:
    """SDXL's parts from ``directory``: of ``include``, ``unet`` and ``vae`` (the UNet in ``dtype``) and ``text``
    (both text encoders and tokenizers); the others are None (loaded in phases, a process never holds all)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    root = check_sdxl_dir(directory, option)
    kw = {"local_files_only": True}
    variant = {part: weights_variant(root, part, option) for part in WEIGHT_STEMS}
    unet = vae = None
    if "unet" in include:
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=DTYPES[dtype],
                                                    variant=variant["unet"], **kw)
    if "vae" in include:  # float32 always: SDXL's VAE overflows in fp16
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32, variant=variant["vae"],
                                            **kw)
    text = {"text_encoder": None, "text_encoder_2": None, "tokenizer": None, "tokenizer_2": None}
    if "text" in include:
        text.update({part: cls.from_pretrained(root / part, dtype=torch.float32, variant=variant[part], **kw)
                     for part, cls in (("text_encoder", CLIPTextModel),
                                       ("text_encoder_2", CLIPTextModelWithProjection))})
        text.update({name: AutoTokenizer.from_pretrained(root / name, **kw) for name in ("tokenizer", "tokenizer_2")})
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    return SDXLParts(unet=unet, vae=vae, scheduler_config=scheduler_config, **text)


@dataclass
class SDXLSkeleton:
    """The frozen SDXL parts' architecture without weights: UNet and VAE on ``meta`` (from their config.json), the
    scheduler config, the encoded prompt's shape (S, C), the pooled width P and text encoder 2's width."""

    unet: Any
    vae: Any
    scheduler_config: dict
    prompt_shape: tuple[int, int]
    pooled_dim: int
    te2_width: int


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def building_on_meta() -> bool:
    """Whether modules are being built on the ``meta`` device (a ``torch.device("meta")`` context): no files are
    read then, only shapes."""
    return torch.empty(0).device.type == "meta"


def sdxl_skeleton(directory: str | Path, option: str = "model.sdxl_dir", dtype: str = "float32") -> SDXLSkeleton:
    """The architecture of ``directory``'s UNet (in ``dtype``) and VAE on the ``meta`` device, from the config
    files alone; built off ``meta``, every weight file the later ``load_sdxl`` needs must exist (one line naming
    ``option`` otherwise), so a run fails at once rather than when its model is configured."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = check_sdxl_dir(directory, option)
    if not building_on_meta():
        for part in WEIGHT_STEMS:
            weights_variant(root, part, option)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
    torch.nn.Module.to(unet, DTYPES[dtype])  # a plain cast of the architecture (diffusers' to() warns about it)
    unet.requires_grad_(False).train()  # it trains through its LoRA; only the frozen parts stay in eval mode
    vae.requires_grad_(False).eval()
    te1, te2 = _json(root / "text_encoder" / "config.json"), _json(root / "text_encoder_2" / "config.json")
    length = int(_json(root / "tokenizer_2" / "tokenizer_config.json").get("model_max_length", 77))
    return SDXLSkeleton(unet, vae, _json(root / "scheduler" / "scheduler_config.json"),
                        (length, int(te1["hidden_size"]) + int(te2["hidden_size"])), int(te2["projection_dim"]),
                        int(te2["hidden_size"]))


@torch.no_grad()
def encode_prompt(parts: SDXLParts, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding: penultimate hidden states of both text encoders concatenated -> (S, C), and text
    encoder 2's projected pooled embedding -> (P,)."""
    hidden, pooled = [], None
    for tokenizer, encoder in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2][0])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds[0]
    return torch.cat(hidden, -1), pooled


# the UNet LoRA's default target modules (every attention projection and feed-forward Linear)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def load_frozen_sdxl(directory: str | Path, option: str = "model.sdxl_dir", dtype: str = "float32",
                     include: Sequence[str] = ("unet", "vae", "text")) -> SDXLParts:
    """``load_sdxl`` with the UNet and VAE frozen (``requires_grad_(False)``); the UNet in train mode (diffusers
    loads it in eval mode; it trains through its LoRA), the VAE in eval mode."""
    parts = load_sdxl(directory, option, dtype, include)
    for model in (parts.unet, parts.vae):
        if model is not None:
            model.requires_grad_(False)
    if parts.unet is not None:
        parts.unet.train()  # diffusers loads it in eval mode; it trains (LoRA): only the frozen parts stay eval
    return parts


def training_scheduler(scheduler_config: dict):
    """The DDPM noise schedule SDXL was trained with (``add_noise``, ``alphas_cumprod``)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config)


def fixed_prompts(parts: SDXLParts | SDXLSkeleton, negative_prompt: str) -> dict[str, torch.Tensor]:
    """The prompts stage 2 encodes once: the negative prompt (classifier-free guidance's negative half) and the
    empty prompt (the text conditioning without a text branch), as buffer name -> (S, C) or (P,) tensor; of a
    skeleton, zero placeholders of those shapes (filled when the weights are loaded)."""
    if isinstance(parts, SDXLSkeleton):
        embeds, pooled = torch.zeros(parts.prompt_shape), torch.zeros(parts.pooled_dim)
        return {"negative_prompt_embeds": embeds, "negative_pooled": pooled, "empty_prompt_embeds": embeds.clone(),
                "empty_pooled": pooled.clone()}
    negative_embeds, negative_pooled = encode_prompt(parts, negative_prompt)
    empty_embeds, empty_pooled = encode_prompt(parts, "")
    return {"negative_prompt_embeds": negative_embeds, "negative_pooled": negative_pooled,
            "empty_prompt_embeds": empty_embeds, "empty_pooled": empty_pooled}


def add_lora(unet, rank: int, alpha: int, targets: Sequence[str] | None = None, init: str = "gaussian") -> None:
    """Add the peft UNet LoRA (rank, alpha, ``targets`` default ``LORA_TARGETS``); peft then leaves only the LoRA
    weights of the UNet trainable."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init,
                                target_modules=list(targets or LORA_TARGETS)))


def export_lora(unet, directory: str | Path) -> Path:
    """Write the UNet LoRA in diffusers' format (``pytorch_lora_weights.safetensors``), loadable with
    ``StableDiffusionXLPipeline.load_lora_weights``."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(str(directory), unet_lora_layers=layers)
    return Path(directory)


@torch.no_grad()
def encode_latents(vae, sub: dict[str, Any], key: str | None, size: tuple[int, int] | None,
                   sample: bool = True) -> torch.Tensor:
    """Images ``sub["image"]`` (b, 3, H, W) in [0, 1], resized to ``size`` (bicubic, antialiased), or a cached
    latent distribution ``sub[key]`` (b, 2, 4, h, w) -> scaled latents (b, 4, h, w) (a sample, or the mode)."""
    import torch.nn.functional as F

    scale = vae.config.scaling_factor
    if key:
        if key not in sub:
            raise KeyError(f"model.latents_key {key!r} is not in the batch: add it to data.targets")
        mean, std = sub[key].float().unbind(1)
        noise = torch.randn_like(mean) if sample else torch.zeros_like(mean)
        return (mean + std * noise) * scale
    images = sub["image"]
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
    dist = vae.encode(images.clamp(0, 1).to(vae.dtype) * 2 - 1).latent_dist
    return (dist.sample() if sample else dist.mode()).float() * scale


def brain_prompt(sdxl: SDXLSkeleton, embed_dim: int, cross_dim: int, prompt_mode: str, pooled_text: str):
    """The text branch's ``BrainPrompt`` for the skeleton's prompt length and pooled width (its SOS embedding is
    set when the text encoders are loaded: ``sos_embedding``); ``prompt_mode: reference`` needs experts as wide as
    text encoder 2."""
    from lightning_modules.components.brain_prompt import BrainPrompt

    if prompt_mode == "reference" and embed_dim != sdxl.te2_width:
        raise ValueError(f"model.text_encoder embeds {embed_dim}-d, but prompt_mode "
                         f"reference needs text encoder 2's width {sdxl.te2_width}; use prompt_mode projected")
    return BrainPrompt(embed_dim, cross_dim, sdxl.pooled_dim, torch.zeros(sdxl.prompt_shape[1]),
                       sdxl.prompt_shape[0], prompt_mode, pooled_text)


def sos_embedding(parts: SDXLParts, sos_prompt: str) -> torch.Tensor:
    """The first position (C,) of the encoded ``sos_prompt``: the text branch's start token."""
    return encode_prompt(parts, sos_prompt)[0][0]
