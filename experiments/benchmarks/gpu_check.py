"""GPU check (``make gpu-check``): does paper scale fit on one large GPU, and how fast is it, in at most 8 minutes.

Parts, each guarded (an out-of-memory or other error is recorded for that part and the next one still runs), none
started once ``budget_s`` has passed:

- ``stage1_fit``: the stage-1 ``BrainEncoderModule`` built from its config (paper: ``configs/stage1/image_nsd.yaml``:
  V 15724 -> H 4096 -> experts 2-4-8-16, the prior; batch 24), a few steps of ``Trainer.fit`` in bf16-mixed
  (forward, losses, backward, fused AdamW, OneCycle): step times and peak memory.
- ``stage1_forward``: a fresh module of the same config, eval ``encode`` of one batch under bf16 autocast.
- ``stage2_build``: the SDXL-sized UNet (``SDXL_BASE_UNET``, random weights, frozen in bfloat16) with
  ``RoutedDiffusionModule``'s trained stack (``stage2_step.build_routed``: processors, LoRA, both ``RoutedBranch``,
  ``ImageTokenProjection``, ``BrainPrompt``) as ``configs/stage2/sdxl_nsd.yaml`` sets it, and SDXL's VAE.
- ``stage2_train_{px}px_ckpt_{on,off}``: training steps (``stage2_step.routed_step``: the module's own
  ``diffusion_loss`` + ``kl_terms``, AdamW) at each resolution, gradient checkpointing on and off, under bf16
  autocast (the module's bf16-mixed): step times and peak memory.
- ``generation_{px}px``: one image: ``routed_sampling.sample_latents`` (routers re-run every step, classifier-free
  guidance) for ``generation_steps`` steps, then ``decode_images`` with the VAE.

Prompt embeddings are random tensors of SDXL's shapes (no text encoders), expert embeddings random (B, E_l, D):
stage 1 is not run inside stage 2. ``tiny``: the same code on the tiny configs (``configs/stage1/tiny_synthetic.yaml``,
``configs/stage2/tiny_synthetic.yaml`` and a ``make_tiny_sdxl`` directory's UNet / VAE / scheduler configs), so the
check runs on CPU in seconds.
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


@dataclass(frozen=True)
class Sizes:
    """What one check measures: stage-1 config stack, voxels, batch; stage-2 config, resolutions (px) with their
    batches, steps timed after ``warmup`` untimed ones, generation steps and guidance."""

    stage1_configs: tuple[str, ...]
    stage2_config: str
    voxels: int
    stage1_batch: int
    resolutions: tuple[int, ...]
    stage2_batches: tuple[int, ...]
    steps: int = 3
    warmup: int = 1
    generation_steps: int = 30
    guidance_scale: float = 5.0


PAPER = Sizes(stage1_configs=("configs/base/trainer.yaml", "configs/stage1/image_nsd.yaml"),
              stage2_config="configs/stage2/sdxl_nsd.yaml", voxels=15724, stage1_batch=24,
              resolutions=(512, 1024), stage2_batches=(48, 12))  # 48: the paper config's per-device batch at 512
TINY = Sizes(stage1_configs=("configs/base/trainer.yaml", "configs/stage1/tiny_synthetic.yaml"),
             stage2_config="configs/stage2/tiny_synthetic.yaml", voxels=64, stage1_batch=4,
             resolutions=(32, 64), stage2_batches=(2, 2), steps=2, generation_steps=3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Free what earlier parts left (on CUDA: a full ``gc`` pass, 0.5-1 s with diffusers loaded) and restart the
    peak memory count."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since ``reset_peak`` in GiB (None on CPU: no per-part peak there)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def timings(times: list[float]) -> dict[str, Any]:
    return {"step_s": [round(t, 4) for t in times], "step_s_median": round(statistics.median(times), 4),
            "step_s_min": round(min(times), 4)}


def guarded(fn: Callable[[], dict], device: torch.device) -> dict:
    """``fn()``'s record with ``status: ok`` and its wall time; an error becomes ``status: oom`` or ``error`` with
    its one-line message (and the peak memory reached), so the next part still runs."""
    reset_peak(device)
    start = time.perf_counter()
    try:
        record = {"status": "ok", **fn()}
    except Exception as exc:  # noqa: BLE001 - every failure of one part is a result, not the end of the check
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
        record = {"status": "oom" if oom else "error",
                  "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400],
                  "peak_memory_gib": peak_gib(device)}
    record["wall_s"] = round(time.perf_counter() - start, 2)
    return record  # what the part left (a failed part's tensors too) is freed by the next part's ``reset_peak``


# ---------------------------------------------------------------- stage 1

def stage1_spec(sizes: Sizes) -> dict:
    """The stage-1 model spec of the config stack, through the real CLI parser, with ``sizes.voxels`` voxels."""
    from experiments._config import load_config

    config = load_config([str(ROOT / c) for c in sizes.stage1_configs])
    spec = config["model"]
    spec["init_args"]["num_voxels"] = {"subj01": sizes.voxels}
    return spec


def build_stage1(spec: dict, device: torch.device):
    from experiments._config import build

    with torch.device(device):
        return build(spec)


def stage1_batch(module, sizes: Sizes, seed: int = 0) -> dict:
    """One training batch in the data module's layout: {subject: {voxels (B, V), <target> (B, D), nsd_id (B,)}}."""
    g = torch.Generator().manual_seed(seed)
    b = sizes.stage1_batch
    target = torch.nn.functional.normalize(torch.randn(b, module.moe.out_dim, generator=g), dim=-1)
    return {"subj01": {"voxels": torch.randn(b, sizes.voxels, generator=g), module.hparams.target: target,
                       "nsd_id": torch.arange(b)}}


def stage1_fit(spec: dict, sizes: Sizes, device: torch.device, precision: str) -> dict:
    import lightning as L

    module = build_stage1(spec, device)
    times: list[float] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            synchronize(device)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize(device)
            times.append(time.perf_counter() - self.start)

    batch = stage1_batch(module, sizes)
    total = sizes.warmup + sizes.steps
    loader = torch.utils.data.DataLoader([batch] * total, batch_size=None)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                            max_steps=total, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp, callbacks=[StepTimer()])
        trainer.fit(module, train_dataloaders=loader)
    params = sum(p.numel() for p in module.parameters())
    return {"parameters": params, "steps": total, "warmup": sizes.warmup, **timings(times[sizes.warmup:]),
            "peak_memory_gib": peak_gib(device)}


def stage1_forward(spec: dict, sizes: Sizes, device: torch.device) -> dict:
    module = build_stage1(spec, device).eval()
    voxels = stage1_batch(module, sizes)["subj01"]["voxels"].to(device)
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for _ in range(sizes.warmup + sizes.steps):
            synchronize(device)
            start = time.perf_counter()
            module.encode(voxels, "subj01")
            synchronize(device)
            times.append(time.perf_counter() - start)
    return {"batch": sizes.stage1_batch, **timings(times[sizes.warmup:]), "peak_memory_gib": peak_gib(device)}


# ---------------------------------------------------------------- stage 2

def model_configs(models_dir: Path | None) -> tuple[dict, dict, dict, str]:
    """(UNet, VAE, scheduler) configs: SDXL base's built in, or a diffusers directory's (a ``make_tiny_sdxl``
    output), and where they came from."""
    if models_dir is None:
        from experiments.parameters.sdxl_base import SDXL_BASE_SCHEDULER, SDXL_BASE_UNET, SDXL_BASE_VAE

        return dict(SDXL_BASE_UNET), dict(SDXL_BASE_VAE), dict(SDXL_BASE_SCHEDULER), "SDXL base (built in)"

    def read(part: str, name: str = "config.json") -> dict:
        return json.loads((Path(models_dir) / part / name).read_text())

    return read("unet"), read("vae"), read("scheduler", "scheduler_config.json"), str(models_dir)


def build_stage2(sizes: Sizes, models_dir: Path | None, embed_dim: int, num_experts: list[int],
                 device: torch.device) -> tuple[Any, Any, dict]:
    """(stand-in with the routed stack on the random-weight UNet, VAE, record): the UNet frozen in bfloat16, the
    trained parts float32, as ``RoutedDiffusionModule`` with ``frozen_dtype: bfloat16``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from experiments.benchmarks.stage2_step import build_routed
    from lightning_modules.components.routed_branch import BranchSpec
    from lightning_modules.sdxl_loading import LORA_TARGETS

    unet_config, vae_config, scheduler_config, source = model_configs(models_dir)
    args = yaml.safe_load((ROOT / sizes.stage2_config).read_text())["model"]["init_args"]
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config).to(torch.bfloat16).requires_grad_(False).train()
        vae = AutoencoderKL.from_config(vae_config).requires_grad_(False).eval()  # float32, as the module's
    cross = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    g = torch.Generator().manual_seed(0)
    prompts = {"sos_embeds": torch.randn(77, cross, generator=g), "sos_pooled": torch.randn(pooled, generator=g)}
    for kind in ("negative", "empty"):
        prompts[f"{kind}_prompt_embeds"] = torch.randn(77, cross, generator=g)
        prompts[f"{kind}_pooled"] = torch.randn(pooled, generator=g)
    ip_loaded = bool(args.get("ip_adapter_weights"))  # the paper's IP-Adapter file: frozen (random weights here)
    ours = build_routed(unet, scheduler_config, prompts, 2 ** (len(vae.config.block_out_channels) - 1), embed_dim,
                        num_experts, BranchSpec(**args["image_branch"]), BranchSpec(**args["text_branch"]),
                        int(args.get("lora_rank", 16)), int(args.get("lora_alpha", 16)), int(args.get("ip_tokens", 4)),
                        ip_adapter_loaded=ip_loaded, lora_targets=tuple(args.get("lora_targets") or LORA_TARGETS)
                        ).to(device)
    record = {"models": source, "unet_parameters": sum(p.numel() for p in unet.parameters()),
              "trainable_parameters": sum(p.numel() for p in ours.parameters() if p.requires_grad),
              "vae_parameters": sum(p.numel() for p in vae.parameters()), "ip_adapter_frozen": ip_loaded,
              "lora_rank": int(args.get("lora_rank", 16)), "vae_factor": ours.vae_factor}
    return ours, vae, record


def stage2_inputs(ours, batch: int, px: int, embed_dim: int, num_experts: list[int], device: torch.device,
                  seed: int = 0) -> tuple[torch.Tensor, dict, torch.Generator]:
    g = torch.Generator(device).manual_seed(seed)
    latent = px // ours.vae_factor
    latents = torch.randn(batch, ours.unet.config.in_channels, latent, latent, generator=g, device=device)
    experts = {b: [torch.randn(batch, e, embed_dim, generator=g, device=device) for e in num_experts]
               for b in ("image", "text")}
    return latents, experts, g


def stage2_train(ours, sizes: Sizes, px: int, batch: int, checkpointing: bool, embed_dim: int,
                 num_experts: list[int], device: torch.device) -> dict:
    from experiments.benchmarks.stage2_step import routed_step

    if checkpointing:
        ours.unet.enable_gradient_checkpointing()
    else:
        ours.unet.disable_gradient_checkpointing()
    ours.train()
    latents, experts, g = stage2_inputs(ours, batch, px, embed_dim, num_experts, device)
    params = [p for p in ours.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)  # RoutedDiffusionModule.configure_optimizers
    times = []
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            for _ in range(sizes.warmup + sizes.steps):
                synchronize(device)
                start = time.perf_counter()
                routed_step(ours, optimizer, latents, experts, g)  # returns the loss: a host sync
                times.append(time.perf_counter() - start)
    finally:
        for p in params:
            p.grad = None
        optimizer.state.clear()
    return {"batch": batch, "latent": list(latents.shape[1:]), "gradient_checkpointing": checkpointing,
            **timings(times[sizes.warmup:]), "peak_memory_gib": peak_gib(device)}


def generation(ours, vae, sizes: Sizes, px: int, embed_dim: int, num_experts: list[int],
               device: torch.device) -> dict:
    from lightning_modules.routed_sampling import decode_images, sample_latents

    ours.unet.disable_gradient_checkpointing()
    ours.eval()
    noise, experts, _ = stage2_inputs(ours, 1, px, embed_dim, num_experts, device, seed=1)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        synchronize(device)
        start = time.perf_counter()
        latents, _ = sample_latents(ours, noise, experts, "euler", sizes.generation_steps, sizes.guidance_scale,
                                    record_routing=False)
        synchronize(device)
        denoise = time.perf_counter() - start
        image = decode_images(vae, latents)
        synchronize(device)
    total = time.perf_counter() - start
    return {"pixels": list(image.shape[-2:]), "steps": sizes.generation_steps, "guidance_scale": sizes.guidance_scale,
            "sampler": "euler", "denoise_s": round(denoise, 3), "per_step_ms": round(denoise / sizes.generation_steps
                                                                                  * 1e3, 2),
            "vae_decode_s": round(total - denoise, 3), "total_s": round(total, 3), "peak_memory_gib": peak_gib(device)}


# ---------------------------------------------------------------- the check

def experts_of(spec: dict) -> tuple[int, list[int]]:
    """(embed width D, experts per level) of a stage-1 model spec (``HierarchicalMoE``'s defaults where unset)."""
    import inspect

    from lightning_modules.components.moe_encoder import HierarchicalMoE

    defaults = {k: v.default for k, v in inspect.signature(HierarchicalMoE).parameters.items()}
    moe = {**defaults, **(spec["init_args"]["moe"].get("init_args") or {})}
    return int(moe["out_dim"]), [moe["num_experts_0"] * moe["factor"] ** level for level in range(moe["num_levels"])]


def run(device: str = "cuda", tiny: bool = False, models_dir: str | Path | None = None, budget_s: float = 480.0,
        precision: str = "bf16-mixed", sizes: Sizes | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Every part in order, none started after ``budget_s`` seconds; returns the record (``parts`` by name)."""
    sizes = sizes or (TINY if tiny else PAPER)
    dev = torch.device(device)
    start = time.perf_counter()
    parts: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if tiny and models_dir is None:
            from experiments.world.tiny_models import make_tiny_clip, make_tiny_sdxl

            models_dir = make_tiny_sdxl(make_tiny_clip(tmp, embed_dim=32))
        spec = stage1_spec(sizes)
        embed_dim, num_experts = experts_of(spec)
        state: dict[str, Any] = {}

        def build() -> dict:
            state["ours"], state["vae"], record = build_stage2(sizes, Path(models_dir) if tiny else None, embed_dim,
                                                               num_experts, dev)
            return record

        plan: list[tuple[str, Callable[[], dict], bool]] = [
            ("stage1_fit", lambda: stage1_fit(spec, sizes, dev, precision), False),
            ("stage1_forward", lambda: stage1_forward(spec, sizes, dev), False),
            ("stage2_build", build, False)]
        trains = [(px, b, ckpt) for ckpt in (True, False) for px, b in zip(sizes.resolutions, sizes.stage2_batches)]

        def train(px: int, b: int, ckpt: bool) -> Callable[[], dict]:
            return lambda: stage2_train(state["ours"], sizes, px, b, ckpt, embed_dim, num_experts, dev)

        def generate(px: int) -> Callable[[], dict]:
            return lambda: generation(state["ours"], state["vae"], sizes, px, embed_dim, num_experts, dev)

        # checkpointing on first, then generation, then checkpointing off (the parts most likely to run out of memory)
        plan += [(f"stage2_train_{px}px_ckpt_on", train(px, b, ckpt), True) for px, b, ckpt in trains if ckpt]
        plan += [(f"generation_{px}px", generate(px), True) for px in sizes.resolutions]
        plan += [(f"stage2_train_{px}px_ckpt_off", train(px, b, ckpt), True) for px, b, ckpt in trains if not ckpt]
        for name, fn, needs_stage2 in plan:
            elapsed = time.perf_counter() - start
            if elapsed > budget_s:
                parts[name] = {"status": "skipped", "reason": f"time budget {budget_s:g} s spent ({elapsed:.0f} s)"}
            elif needs_stage2 and "ours" not in state:
                parts[name] = {"status": "skipped", "reason": "stage2_build failed"}
            else:
                parts[name] = guarded(fn, dev)
            log(f"{name}: {json.dumps(parts[name])}")
        state.clear()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"benchmark": "gpu_check", "device": name, "tiny": tiny, "precision": precision, "budget_s": budget_s,
            "sizes": {**asdict(sizes), "embed_dim": embed_dim, "experts": num_experts},
            "parts": parts, "elapsed_s": round(time.perf_counter() - start, 1),
            "notes": ["random weights everywhere: times and memory, not quality",
                      "stage 2: precomputed random expert embeddings and random prompt embeddings (no stage-1 "
                      "encoder, prior or text encoders inside the stage-2 parts)",
                      "peak_memory_gib: torch.cuda.max_memory_allocated per part (null on CPU)"]}
