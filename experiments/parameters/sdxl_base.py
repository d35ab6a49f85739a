"""SDXL base's architecture without its weights: the config files of stabilityai/stable-diffusion-xl-base-1.0
(architecture keys only), for the meta-device builds (``experiments.parameters.stage2``, ``experiments.gpu_check``).

``write_config_only_sdxl(dir)`` writes them in the snapshot's layout, so that ``sdxl_loading.sdxl_skeleton`` (what
``RoutedDiffusionModule.__init__`` reads) builds the real module on ``meta`` with nothing downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

# unet/config.json (feasibility.md section 2 (b)): 2,567,463,684 parameters
SDXL_BASE_UNET: dict = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), only_cross_attention=False,
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    upcast_attention=False)
SDXL_BASE_UNET_PARAMS = 2_567_463_684
# vae/config.json and scheduler/scheduler_config.json
SDXL_BASE_VAE: dict = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_BASE_SCHEDULER: dict = dict(
    _class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
    timestep_spacing="leading", steps_offset=1, clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False,
    skip_prk_steps=True, trained_betas=None)
# text_encoder (CLIP ViT-L/14 text) and text_encoder_2 (OpenCLIP ViT-bigG/14 text, with projection): the widths
# the prompts are built from (their weights are never module parameters: the prompts are encoded once)
SDXL_BASE_TEXT: dict = {
    "text_encoder": dict(model_type="clip_text_model", architectures=["CLIPTextModel"], hidden_size=768,
                         intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu"),
    "text_encoder_2": dict(model_type="clip_text_model", architectures=["CLIPTextModelWithProjection"],
                           hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                           projection_dim=1280, max_position_embeddings=77, vocab_size=49408, hidden_act="gelu"),
}
SDXL_BASE_TOKENIZER: dict = dict(model_max_length=77, tokenizer_class="CLIPTokenizer")


def write_config_only_sdxl(directory: str | Path) -> Path:
    """Write SDXL base's config files (no weights) in the snapshot's layout under ``directory``; returns it."""
    root = Path(directory)
    files = {"unet/config.json": {"_class_name": "UNet2DConditionModel", **SDXL_BASE_UNET},
             "vae/config.json": {"_class_name": "AutoencoderKL", **SDXL_BASE_VAE},
             "scheduler/scheduler_config.json": SDXL_BASE_SCHEDULER,
             **{f"{part}/config.json": config for part, config in SDXL_BASE_TEXT.items()},
             "tokenizer/tokenizer_config.json": SDXL_BASE_TOKENIZER,
             "tokenizer_2/tokenizer_config.json": SDXL_BASE_TOKENIZER}
    for name, config in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(config, indent=2) + "\n")
    return root
