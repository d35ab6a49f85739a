"""Build the learned miniature world part by part: CLIP -> VAE -> UNet -> IP-Adapter, resumable and atomic.

Each part is trained into ``OUT/.<part>.tmp/``, saved in its real on-disk format, loaded back through the real
loaders (its quality figures come from the loaded copy), then its entries are renamed into ``OUT`` and the part
is recorded in ``OUT/world.json``. A rerun skips recorded parts and removes stale temporaries, so an interrupted
build never leaves a half-written model. Everything is seeded and runs on a fixed number of threads.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from datamodules.common import provenance, remove_stale_temporaries, write_json_atomic
from experiments.world import quality as q
from experiments.world.build_helpers import seed_everything
from experiments.world.clip import (
    ClipConfig,
    build_clip,
    embed_images,
    embed_texts,
    load_clip,
    save_clip,
    train_clip,
)
from experiments.world.ip_adapter import IpConfig, load_ip_adapter, save_ip_adapter, train_ip_adapter
from experiments.world.scenes import Scenes, all_caption_words, make_scenes
from experiments.world.tokenizer import build_tokenizer
from experiments.world.unet import UnetConfig, encode_prompts, euler_scheduler, sample, train_unet
from experiments.world.vae import VaeConfig, build_vae, reconstruct, scaling_factor, train_vae

PARTS = ("clip", "vae", "unet", "ip_adapter")
ENTRIES = {"clip": ("image_encoder", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
           "vae": ("vae",), "unet": ("unet", "scheduler", "model_index.json"), "ip_adapter": ("ip_adapter.safetensors",)}
SEEDS = {"clip": 11, "vae": 12, "unet": 13, "ip_adapter": 14, "scenes_clip": 101, "scenes_vae": 102,
         "scenes_diffusion": 103, "heldout_a": 201, "heldout_b": 202}
THREADS = 2  # the budget is `make world` alone on 2 cores: 2 threads train 1.5-2.6x faster than 1 there


@dataclass
class Preset:
    name: str
    image_size: int
    clip: ClipConfig
    vae: VaeConfig
    unet: UnetConfig
    ip: IpConfig
    train_scenes: int = 4000
    heldout: int = 400  # per held-out split (A fits the probes, B scores everything)
    retrieval_n: int = 100
    generate_n: int = 48
    sample_steps: int = 20
    guidance: float = 4.0


PRESETS = {
    "full": Preset("full", 64, ClipConfig(steps=1000, input_size=32, patches=4, full_caption_prob=0.5, view_weight=0.5,
                                          blur=1.0, noise=0.04),
                   VaeConfig(blocks=(16, 32, 64), groups=2, steps=1200, batch=16, lr=1e-3, crop=32),
                   UnetConfig(blocks=(32, 64, 64), heads=(2, 4, 4), groups=8, steps=1000, batch=32, lr=2e-3,
                              noise_offset=0.3),
                   IpConfig(steps=320, batch=48, drop_text=0.7, noise_offset=0.3), train_scenes=4000, heldout=300, generate_n=32, sample_steps=15),
    "reduced": Preset("reduced", 32, ClipConfig(steps=300, input_size=32, patches=4, full_caption_prob=0.5,
                                                 view_weight=0.5, blur=1.0, noise=0.04),
                      VaeConfig(blocks=(8, 16, 32), groups=2, steps=400, batch=16, lr=1e-3),
                      UnetConfig(blocks=(32, 64), heads=(2, 4), groups=8, steps=400, batch=32, lr=2e-3,
                                 noise_offset=0.3),
                      IpConfig(steps=500, batch=32, lr=3e-3, drop_text=0.7, noise_offset=0.3), train_scenes=2000, heldout=200, generate_n=24, sample_steps=12),
}


class WorldBuildError(ValueError):
    """An output directory holds a world built with other settings."""


@dataclass
class Context:
    """What the parts share within one run (scenes, caches) plus the output paths."""

    out: Path
    preset: Preset
    show: bool = True
    cache: dict = field(default_factory=dict)

    def scenes(self, key: str, n: int) -> Scenes:
        if key not in self.cache:
            self.cache[key] = make_scenes(SEEDS[key], n, self.preset.image_size)
        return self.cache[key]


# ---------------------------------------------------------------- parts


def part_clip(ctx: Context, tmp: Path) -> dict:
    p = ctx.preset
    tok = build_tokenizer(all_caption_words(), tmp / "tokenizer_2")
    train = ctx.scenes("scenes_clip", p.train_scenes)
    t0 = time.time()
    vision, text, info = train_clip(p.clip, train, tok, p.image_size, SEEDS["clip"], ctx.show)
    train_s = time.time() - t0
    save_clip(vision, text, tok, p.clip.input_size, tmp)
    image, text, tok = load_clip(tmp)
    quality = clip_quality(ctx, image, text, tok)
    seed_everything(SEEDS["clip"], THREADS)
    control_v, _ = build_clip(p.clip, tok)  # the untrained tower: the probes' control
    quality["control_untrained_probes"] = _probes(ctx, lambda px: control_v(
        pixel_values=_clip_input(px, p.clip.input_size)).image_embeds)
    return {"config": asdict(p.clip), "train_s": train_s, "train_info": info, "quality": quality,
            "params": {"vision": _count(vision), "text": _count(text)}}


def _clip_input(pixels: np.ndarray, size: int) -> torch.Tensor:
    from experiments.world.clip import clip_pixels

    return clip_pixels(torch.from_numpy(pixels), size)


@torch.no_grad()
def _probes(ctx: Context, embed) -> dict:
    a = ctx.scenes("heldout_a", ctx.preset.heldout)
    b = ctx.scenes("heldout_b", ctx.preset.heldout)
    return q.probes(embed(a.pixels()).numpy(), a, embed(b.pixels()).numpy(), b)


def clip_quality(ctx: Context, image, text, tok) -> dict:
    b = ctx.scenes("heldout_b", ctx.preset.heldout)
    n = ctx.preset.retrieval_n
    caps = [c[0] for c in b.captions[:n]]
    top1 = q.retrieval_top1(embed_images(image, b.pixels()[:n]), embed_texts(text, tok, caps), caps)
    return {"retrieval_top1": top1, "retrieval_n": n, "retrieval_chance": 1.0 / n,
            "probes": _probes(ctx, lambda px: embed_images(image, px))}


def part_vae(ctx: Context, tmp: Path) -> dict:
    from diffusers import AutoencoderKL

    p = ctx.preset
    train = ctx.scenes("scenes_vae", p.train_scenes)
    t0 = time.time()
    vae, info = train_vae(p.vae, train, p.image_size, SEEDS["vae"], ctx.show)
    train_s = time.time() - t0
    factor = scaling_factor(vae, ctx.scenes("heldout_a", p.heldout).pixels())
    vae.register_to_config(scaling_factor=factor)
    vae.save_pretrained(tmp / "vae")
    vae = AutoencoderKL.from_pretrained(tmp / "vae", local_files_only=True).eval()
    b = ctx.scenes("heldout_b", p.heldout).pixels()[:200]
    rec = reconstruct(vae, b)
    seed_everything(SEEDS["vae"], THREADS)
    control = reconstruct(build_vae(p.vae, p.image_size).eval(), b)
    quality = {"ssim": float(q.ssim(b, rec).mean()), "pixcorr": float(q.pixcorr(b, rec).mean()),
               "control_untrained_ssim": float(q.ssim(b, control).mean()),
               "control_untrained_pixcorr": float(np.nan_to_num(q.pixcorr(b, control)).mean()),
               "scaling_factor": factor, "downscale": 2 ** (len(p.vae.blocks) - 1), "n": len(b)}
    return {"config": asdict(p.vae), "train_s": train_s, "train_info": info, "quality": quality,
            "params": {"vae": _count(vae)}}


def _diffusion_data(ctx: Context, vae, te1, te2, tok) -> dict:
    """Scaled latents, posterior std, caption indices and encoded prompts of the diffusion training scenes."""
    if "diffusion" not in ctx.cache:
        p = ctx.preset
        train = ctx.scenes("scenes_diffusion", p.train_scenes)
        sf = vae.config.scaling_factor
        mean, std = [], []
        with torch.no_grad():
            px = train.pixels()
            for i in range(0, len(px), 128):
                post = vae.encode(torch.from_numpy(px[i: i + 128]) * 2 - 1).latent_dist
                mean.append(post.mean * sf)
                std.append(post.std * sf)
        uniq = sorted({c for caps in train.captions for c in caps} | {""})
        where = {c: i for i, c in enumerate(uniq)}
        prompt, pooled = encode_prompts(te1, te2, tok, uniq)
        ctx.cache["diffusion"] = {
            "latents": torch.cat(mean), "latent_std": torch.cat(std), "prompt": prompt, "pooled": pooled,
            "caption_index": torch.tensor([[where[c] for c in caps] for caps in train.captions]),
            "empty": where[""], "scenes": train}
    return ctx.cache["diffusion"]


def part_unet(ctx: Context, tmp: Path) -> dict:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from lightning_modules.sdxl_loading import load_sdxl

    p, out = ctx.preset, ctx.out
    kw = {"local_files_only": True}
    vae = AutoencoderKL.from_pretrained(out / "vae", **kw).eval()
    te1 = CLIPTextModel.from_pretrained(out / "text_encoder", **kw).eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2", **kw).eval()
    tok1 = AutoTokenizer.from_pretrained(out / "tokenizer", **kw)
    tok2 = AutoTokenizer.from_pretrained(out / "tokenizer_2", **kw)
    data = _diffusion_data(ctx, vae, te1, te2, tok2)
    t0 = time.time()
    unet, info = train_unet(p.unet, data["latents"], data["latent_std"], data["caption_index"], data["prompt"],
                            data["pooled"], data["empty"], p.image_size, SEEDS["unet"], ctx.show)
    train_s = time.time() - t0
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=unet, scheduler=euler_scheduler(),
                                     force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(tmp)
    parts = load_sdxl(tmp)
    quality = unet_quality(ctx, parts)
    return {"config": asdict(p.unet), "train_s": train_s, "train_info": info, "quality": quality,
            "params": {"unet": _count(unet)}, "cross_attention_dim": unet.config.cross_attention_dim}


def _prompts(parts, captions: list[str]):
    from experiments.world.unet import encode_prompts as enc

    return enc(parts.text_encoder, parts.text_encoder_2, parts.tokenizer_2, captions)


@torch.no_grad()
def _decode(vae, latents: torch.Tensor) -> np.ndarray:
    return ((vae.decode(latents / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1).numpy()


def unet_quality(ctx: Context, parts) -> dict:
    from lightning_modules.components.target_embedders import ClipImageEmbedder

    p = ctx.preset
    b = ctx.scenes("heldout_b", p.heldout)
    n = p.generate_n
    caps = [c[0] for c in b.captions[:n]]
    prompt, pooled = _prompts(parts, caps)
    neg, neg_pooled = _prompts(parts, [""] * n)
    lat = sample(parts.unet, parts.scheduler_config, prompt, pooled, neg, neg_pooled, p.image_size,
                 p.sample_steps, p.guidance, SEEDS["unet"])
    images = _decode(parts.vae, lat)
    image = ClipImageEmbedder(str(ctx.out / "image_encoder"))
    text = parts.text_encoder_2
    img = torch.nn.functional.normalize(embed_images(image, images), dim=-1)
    txt = torch.nn.functional.normalize(embed_texts(text, parts.tokenizer_2, caps), dim=-1)
    perm = torch.from_numpy(q.derangement(n, SEEDS["unet"]))
    ctx.cache["samples"] = (caps[:12], images[:12])
    truth_img = torch.nn.functional.normalize(embed_images(image, b.pixels()[:n]), dim=-1)
    return {"clip_score_own": float((img * txt).sum(1).mean()),
            "clip_score_shuffled": float((img * txt[perm]).sum(1).mean()),
            "clip_score_truth_images": float((truth_img * txt).sum(1).mean()),
            "n": n, "guidance": p.guidance, "steps": p.sample_steps}


def part_ip_adapter(ctx: Context, tmp: Path) -> dict:
    from lightning_modules.components.target_embedders import ClipImageEmbedder
    from lightning_modules.sdxl_loading import load_sdxl

    p, out = ctx.preset, ctx.out
    parts = load_sdxl(out)
    image = ClipImageEmbedder(str(out / "image_encoder"))
    data = _diffusion_data(ctx, parts.vae, parts.text_encoder, parts.text_encoder_2, parts.tokenizer_2)
    embeds = embed_images(image, data["scenes"].pixels())
    t0 = time.time()
    projection, processors, info = train_ip_adapter(
        p.ip, parts.unet, data["latents"], data["latent_std"], embeds, data["caption_index"], data["prompt"],
        data["pooled"], data["empty"], p.image_size, SEEDS["ip_adapter"], ctx.show)
    train_s = time.time() - t0
    save_ip_adapter(projection, processors, tmp / "ip_adapter.safetensors")
    fresh = load_sdxl(out)
    projection, _ = load_ip_adapter(tmp / "ip_adapter.safetensors", fresh.unet, embeds.shape[-1])
    quality = ip_quality(ctx, fresh, projection, image)
    return {"config": asdict(p.ip), "train_s": train_s, "train_info": info, "quality": quality,
            "params": {"ip_adapter": _count(projection) + _count(processors)}}


@torch.no_grad()
def ip_quality(ctx: Context, parts, projection, image) -> dict:
    p = ctx.preset
    b = ctx.scenes("heldout_b", p.heldout)
    n = p.generate_n
    truth = b.pixels()[:n]
    emb = embed_images(image, truth)
    prompt, pooled = _prompts(parts, [""] * n)
    neg_tokens = projection(torch.zeros_like(emb)[:, None])
    perm = q.derangement(n, SEEDS["ip_adapter"])
    result, recons = {}, {}
    for name, e in (("true", emb), ("shuffled", emb[torch.from_numpy(perm)])):
        lat = sample(parts.unet, parts.scheduler_config, prompt, pooled, prompt, pooled, p.image_size,
                     p.sample_steps, p.guidance, SEEDS["ip_adapter"], projection(e[:, None]), neg_tokens)
        rec = _decode(parts.vae, lat)
        recons[name] = rec
        result[name] = {"two_way": q.two_way(embed_images(image, rec), emb),
                        "pixcorr": float(q.pixcorr(truth, rec).mean()), "ssim": float(q.ssim(truth, rec).mean())}
    ctx.cache["ceiling"] = (truth[:12], recons["true"][:12], recons["shuffled"][:12])
    return {"two_way": result["true"]["two_way"], "pixcorr": result["true"]["pixcorr"],
            "ssim": result["true"]["ssim"], "control_shuffled": result["shuffled"], "n": n,
            "prompt": "", "guidance": p.guidance, "steps": p.sample_steps}


PART_FUNCS = {"clip": part_clip, "vae": part_vae, "unet": part_unet, "ip_adapter": part_ip_adapter}


def _count(module) -> int:
    return int(sum(t.numel() for t in module.parameters()))


# ---------------------------------------------------------------- orchestration


def _manifest(out: Path) -> dict | None:
    path = out / "world.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _remove_temporaries(out: Path) -> list[str]:
    removed = []
    for tmp in sorted(out.glob(".*.tmp")):
        if tmp.is_dir():
            shutil.rmtree(tmp)
            removed.append(tmp.name)
    for part_file in sorted(out.glob(".*.part")):
        part_file.unlink()
        removed.append(part_file.name)
    removed += [str(p) for p in remove_stale_temporaries(out)]
    return removed


def _install(tmp: Path, out: Path, part: str) -> None:
    """Rename the part's entries from ``tmp`` into ``out`` (replacing older copies), then drop ``tmp``."""
    for name in ENTRIES[part]:
        src, dst = tmp / name, out / name
        if not src.exists():
            raise RuntimeError(f"part {part} did not write {name}")
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        os.replace(src, dst)
    shutil.rmtree(tmp)


def build_world(out: str | Path, preset: str = "full", image_size: int | None = None, show: bool = True,
                stop_after: str | None = None) -> dict:
    """Build (or resume) the world in ``out``; returns the manifest. ``stop_after`` ends after that part. Trains on
    ``THREADS`` threads and gives the caller its thread count back."""
    threads = torch.get_num_threads()
    try:
        return _build(Path(out), preset, image_size, show, stop_after)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, preset: str, image_size: int | None, show: bool, stop_after: str | None) -> dict:
    base = PRESETS[preset]
    p = replace(base, image_size=image_size or base.image_size)
    out.mkdir(parents=True, exist_ok=True)
    removed = _remove_temporaries(out)
    manifest = _manifest(out)
    if manifest is not None and (manifest["preset"] != p.name or manifest["image_size"] != p.image_size):
        raise WorldBuildError(f"{out}: holds a world built with preset {manifest['preset']!r} at "
                              f"{manifest['image_size']} px, not {p.name!r} at {p.image_size} px; use another --out")
    if manifest is None:
        manifest = {"preset": p.name, "image_size": p.image_size, "threads": THREADS, "seeds": SEEDS, "parts": {}}
    if removed and show:
        print(f"removed stale temporaries: {', '.join(removed)}")
    ctx = Context(out=out, preset=p, show=show)
    for part in PARTS:
        if part in manifest["parts"]:
            if show:
                print(f"{part}: complete, skipped")
        else:
            seed_everything(SEEDS[part], THREADS)
            tmp = out / f".{part}.tmp"
            tmp.mkdir()
            t0 = time.time()
            entry = PART_FUNCS[part](ctx, tmp)
            _write_figures(ctx, part, tmp)
            entry.update(seed=SEEDS[part], steps=entry["config"]["steps"], part_s=round(time.time() - t0, 1),
                         files=list(ENTRIES[part]) + _figure_names(part))
            _install(tmp, out, part)
            for name in _figure_names(part):
                os.replace(out / f".{name}.part", out / name)
            manifest["parts"][part] = entry
            _finish_manifest(manifest, out, p)
            if show:
                print(f"{part}: trained in {entry['train_s']:.0f} s (part {entry['part_s']:.0f} s)")
        if part == stop_after:
            break
    return manifest


def _figure_names(part: str) -> list[str]:
    return {"unet": ["samples.png"], "ip_adapter": ["ip_adapter_ceiling.png"]}.get(part, [])


def _write_figures(ctx: Context, part: str, tmp: Path) -> None:
    from experiments.world.figures import ceiling_grid, samples_grid

    if part == "unet":
        samples_grid(*ctx.cache["samples"]).save(ctx.out / ".samples.png.part", format="PNG")
    elif part == "ip_adapter":
        ceiling_grid(*ctx.cache["ceiling"]).save(ctx.out / ".ip_adapter_ceiling.png.part", format="PNG")


def _finish_manifest(manifest: dict, out: Path, p: Preset) -> None:
    parts = manifest["parts"]
    if "clip" in parts:
        cfg = json.loads((out / "image_encoder" / "config.json").read_text())
        text_cfg = json.loads((out / "text_encoder_2" / "config.json").read_text())
        manifest["widths"] = {"image_embed_dim": cfg["projection_dim"], "text_embed_dim": text_cfg["hidden_size"],
                              "pooled_dim": text_cfg["projection_dim"],
                              "cross_attention_dim": parts.get("unet", {}).get("cross_attention_dim")}
    manifest["complete"] = all(k in parts for k in PARTS)
    manifest["train_s_total"] = round(sum(v["part_s"] for v in parts.values()), 1)
    manifest["quality"] = {k: v["quality"] for k, v in parts.items()}
    manifest["weights_bytes"] = sum(f.stat().st_size for f in out.rglob("*.safetensors") if not
                                    any(s.startswith(".") for s in f.relative_to(out).parts))
    manifest["provenance"] = provenance(preset=p.name)
    write_json_atomic(out / "quality.json", manifest["quality"])
    write_json_atomic(out / "world.json", manifest)


def quality_table(manifest: dict) -> str:
    """A short text table of the quality figures with their controls."""
    qd = manifest.get("quality", {})
    rows = []
    if "clip" in qd:
        c = qd["clip"]
        pr = " ".join(f"{k} {v:.2f}" for k, v in c["probes"].items())
        cp = " ".join(f"{k} {v:.2f}" for k, v in c["control_untrained_probes"].items())
        rows += [f"CLIP  retrieval top-1 among {c['retrieval_n']}: {c['retrieval_top1']:.2f} "
                 f"(chance {c['retrieval_chance']:.2f})", f"CLIP  probes: {pr}", f"      untrained: {cp}"]
    if "vae" in qd:
        v = qd["vae"]
        rows.append(f"VAE   SSIM {v['ssim']:.3f} PixCorr {v['pixcorr']:.3f} (untrained: SSIM "
                    f"{v['control_untrained_ssim']:.3f} PixCorr {v['control_untrained_pixcorr']:.3f}), "
                    f"downscale {v['downscale']}, scaling {v['scaling_factor']:.4f}")
    if "unet" in qd:
        u = qd["unet"]
        rows.append(f"UNet  CLIP score own caption {u['clip_score_own']:.3f} vs shuffled "
                    f"{u['clip_score_shuffled']:.3f} (true images {u['clip_score_truth_images']:.3f})")
    if "ip_adapter" in qd:
        i, s = qd["ip_adapter"], qd["ip_adapter"]["control_shuffled"]
        rows.append(f"IP    two-way {i['two_way']:.3f} PixCorr {i['pixcorr']:.3f} SSIM {i['ssim']:.3f} "
                    f"(shuffled: {s['two_way']:.3f} {s['pixcorr']:.3f} {s['ssim']:.3f})")
    return "\n".join(rows)
