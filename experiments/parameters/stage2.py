"""Stage-2 parameter counts at any scale, built on the ``meta`` device (no weights, no files).

``stage2_parameter_report`` assembles what ``RoutedDiffusionModule`` trains and freezes, in the module's order:
the UNet from its config, ``install_processors`` (decoupled ``to_k_ip``/``to_v_ip`` in every cross-attention
layer), the peft LoRA, one ``RoutedBranch`` per enabled branch, the image token projection and the text prompt
construction. The frozen stage-1 encoders (and their priors) come from their checkpoints and are not counted; the
VAE and the SDXL text encoders are not part of the module's parameters either (the prompts are encoded once).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_modules.components.brain_prompt import BrainPrompt, PooledMode, PromptMode
from lightning_modules.components.injection import ImageTokenProjection, install_processors
from lightning_modules.components.routed_branch import BranchSpec, RoutedBranch
from lightning_modules.run_records import count_parameters
from lightning_modules.sdxl_loading import LORA_TARGETS, add_lora
from lightning_modules.stage2_parts import apply_trainable, stage2_parts, trained_and_stored

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the architecture keys; feasibility.md section 2 (b))
SDXL_BASE_UNET: dict = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), only_cross_attention=False,
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, upcast_attention=False)
SDXL_BASE_UNET_PARAMS = 2_567_463_684
# the same snapshot's vae/config.json (architecture keys) and scheduler/scheduler_config.json: what a random-weight
# SDXL-sized stack needs besides the UNet (experiments.benchmarks.gpu_check)
SDXL_BASE_VAE: dict = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_BASE_SCHEDULER: dict = dict(
    _class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
    timestep_spacing="leading", steps_offset=1, clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False,
    skip_prk_steps=True, trained_betas=None)


def _row(key: str, name: str, params: int, trainable: int, depth: int = 1) -> dict:
    return {"key": key, "name": name, "params": params, "trainable": trainable, "depth": depth}


def stage2_parameter_report(unet_config: dict, image_branch: BranchSpec | None, text_branch: BranchSpec | None,
                            embed_dim: int = 1280, num_experts: Sequence[int] = (2, 4, 8, 16), ip_tokens: int = 4,
                            lora_rank: int = 16, lora_alpha: int = 16,
                            lora_targets: Sequence[str] | None = LORA_TARGETS, ip_trainable: bool = True,
                            prompt_mode: PromptMode = "reference", pooled_text: PooledMode = "zeros",
                            prompt_length: int = 77, trainable: Sequence[str] | None = None,
                            ip_adapter_loaded: bool | None = None, ip_adapter_trainable: bool | None = None
                            ) -> list[dict]:
    """Rows ``{key, name, params, trainable, depth}`` (``format_table``'s layout; the last row is the total, which
    also carries ``trainable_share``). ``embed_dim`` / ``num_experts``: the stage-1 experts' width and tree (both
    branches); ``ip_adapter_loaded`` / ``ip_adapter_trainable`` / ``trainable``: the module's
    (``model.ip_adapter_weights`` set, ``model.ip_adapter_trainable``, ``model.trainable``), resolved by
    ``stage2_parts`` exactly as the module resolves them. ``ip_trainable`` (when ``ip_adapter_loaded`` is None):
    shorthand for no IP-Adapter file (True) or a loaded, frozen one (False)."""
    from diffusers import UNet2DConditionModel

    if image_branch is None and text_branch is None:
        raise ValueError("image_branch and text_branch are both None: enable at least one")
    num_experts = list(num_experts)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
        unet.requires_grad_(False)
        base_before, _ = count_parameters(unet.parameters())
        cross_dim = unet.config.cross_attention_dim
        time_dim = unet.time_proj.num_channels
        latent_channels = unet.config.in_channels
        # before the LoRA, as in RoutedDiffusionModule; IP key/value weights only with an image branch
        processors = install_processors(unet, with_ip=image_branch is not None)
        add_lora(unet, lora_rank, lora_alpha, lora_targets, "gaussian")
        routers = {}
        for branch, spec in (("image", image_branch), ("text", text_branch)):
            if spec is not None:
                routers[branch] = RoutedBranch(spec, embed_dim, num_experts, time_dim, latent_channels)
        projection = None
        if image_branch is not None:
            projection = ImageTokenProjection(embed_dim, cross_dim, ip_tokens)
        prompt = None
        if text_branch is not None:
            pooled_dim = (unet.config.projection_class_embeddings_input_dim
                          - 6 * unet.config.addition_time_embed_dim)
            prompt = BrainPrompt(embed_dim, cross_dim, pooled_dim, torch.zeros(cross_dim), prompt_length,
                                 prompt_mode, pooled_text)

        # the module's own definition of what is trained (RoutedDiffusionModule.parts(), same module references)
        loaded = (not ip_trainable) if ip_adapter_loaded is None else bool(ip_adapter_loaded)
        parts = stage2_parts(unet, list(routers.values()), projection, prompt, processors, loaded)
        trained, stored = trained_and_stored(image_branch is not None, loaded, ip_adapter_trainable, trainable)
        apply_trainable(parts, trained, stored)
    lora_total, lora_trainable = count_parameters(p for n, p in unet.named_parameters() if "lora_" in n)
    ip_total, ip_train = count_parameters(processors.parameters())
    unet_total, _ = count_parameters(unet.parameters())
    base = unet_total - lora_total - ip_total
    if base != base_before:
        raise AssertionError(f"UNet base count changed from {base_before} to {base} (LoRA inside a processor?)")
    targets = len(lora_targets or LORA_TARGETS)
    rows = [_row("unet_base", "UNet (frozen)", base, 0),
            _row("lora", f"UNet LoRA r={lora_rank}, {targets} targets", lora_total, lora_trainable),
            _row("ip_kv", f"IP key/value, {len(processors)} layers", ip_total, ip_train)]
    if projection is not None:
        total, trainable = count_parameters(projection.parameters())
        rows.append(_row("image_projection", f"image projection ({embed_dim} -> {ip_tokens} x {cross_dim})",
                         total, trainable))
    for branch, router in routers.items():
        spec: BranchSpec = router.spec
        total, trainable = count_parameters(router.parameters())
        rows.append(_row(f"{branch}_router", f"{branch} router", total, trainable))
        t_total, t_train = count_parameters(router.temporal.parameters())
        rows.append(_row(f"{branch}_router.temporal", f"temporal ({spec.temporal})", t_total, t_train, 2))
        s_total, s_train = count_parameters(router.spatial.parameters()) if router.spatial is not None else (0, 0)
        label = f"spatial (grid {spec.grid})" if router.spatial is not None else "spatial (off: level pooling)"
        rows.append(_row(f"{branch}_router.spatial", label, s_total, s_train, 2))
    if prompt is not None:
        total, trainable = count_parameters(prompt.parameters())
        rows.append(_row("text_prompt", f"text prompt ({prompt_mode}, pooled {pooled_text})",
                         total, trainable))
    parts: list[nn.Module] = [unet, *routers.values(), *(m for m in (projection, prompt) if m is not None)]
    total, trainable = count_parameters(p for m in parts for p in m.parameters())
    rows.append({**_row("total", "total", total, trainable, 0), "trainable_share": trainable / total})
    return rows


def format_report(rows: list[dict]) -> str:
    """``format_table`` plus the trainable total and share."""
    from experiments.parameters.table import format_table

    total = rows[-1]
    return (f"{format_table(rows)}\ntrainable {total['trainable']:,d} of {total['params']:,d} "
            f"({total['trainable'] / max(total['params'], 1):.2%})")
