"""Host memory of a stage-2 rank: measured on the tiny configs, extrapolated to paper scale by parameter bytes.

Measured: the peak RSS of a fresh process that builds the tiny stage-2 module (live stage-1 encoders, or the
conditioning cache), configures it (``configure_model``) and runs one training step, next to its RSS after the
imports (the process's own overhead). Estimated: the same loading phases with the byte counts of the real modules
built on ``meta`` (stage 2 from ``configs/stage2/sdxl_nsd.yaml``, stage 1 from ``configs/stage1/{image,text}_nsd``,
the SDXL text encoders from their configs), each parameter in the dtype the rank holds it in:

- now, with the cache: ``__init__`` builds the small trained parts and the IP key / value (fp32, cast at once to
  ``frozen_dtype`` when they are loaded frozen); configure_model loads the IP-Adapter file (fp16) into them and
  frees it, then the fp32 text encoders (prompts), frees them, then the UNet (``frozen_dtype``) and VAE (fp32);
  peak = overhead + the largest phase.
- before (this issue's starting point): ``__init__`` loaded UNet, VAE, both text encoders and the IP weights at once,
  and each stage-1 checkpoint whole (weights + Adam state, fp32) before keeping its module in ``frozen_dtype``.

The optimiser state (fp32 gradient + two Adam moments per trained parameter) is added as if it lived on the host
(a CPU rank; on a GPU rank it is device memory). The method is checked on the tiny module: its measured peak beside
the same formula's estimate.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

GB = 1e9
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def probe(args: list[str], cache: str | None) -> dict[str, Any]:
    """(in a fresh process) RSS after imports, peak after configure_model and one step, and the module's bytes."""
    import experiments.run  # noqa: F401 - the imports every rank pays
    from experiments.benchmarks.condition_step import build

    after_imports = rss_now()
    module, dm = build(args, Path(cache) if cache else None)
    sub = next(iter(dm.train_dataloader()))[0]["subj01"]
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad])
    latents = module.encode_latents(sub, sample=False)
    loss, _, _ = module.diffusion_loss(latents, module.expert_embeddings(sub, "subj01"),
                                       torch.randint(0, 1000, (len(latents),)), torch.randn_like(latents))
    loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = sum(p.numel() * p.element_size() for p in module.parameters())
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"rss_after_imports": after_imports, "peak_rss": peak, "module_bytes": held,
            "optimizer_bytes": 12 * trained}


def _measure(args: list[str], cache: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "experiments.benchmarks.stage2_memory", "--probe", json.dumps(args)]
    cmd += ["--cache", str(cache)] if cache else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def paper_estimate(overhead: int) -> dict[str, Any]:
    """Peak host bytes of a paper-scale rank, now (with the cache) and before, from meta-built module sizes."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from experiments._config import load_config
    from experiments.parameters.paper import STAGE1, STAGE2, build_stage1_on_meta
    from experiments.parameters.sdxl_base import SDXL_BASE_TEXT
    from experiments.parameters.stage2 import build_on_meta

    config = load_config(STAGE2)
    init = config["model"]["init_args"]
    frozen = BYTES[{"bfloat16": torch.bfloat16, "float16": torch.float16}.get(init["frozen_dtype"], torch.float32)]
    with tempfile.TemporaryDirectory() as tmp:
        module, _ = build_on_meta(init, Path(tmp))
    parts = module.parts()
    ip_kv = sum(_params(m) for m in module.ip_processors)  # registered inside the UNet, as the LoRA is
    unet = _params(module.unet) - sum(_params(m) for m in parts["lora"]) - ip_kv
    projection = _params(module.image_projection) if module.image_projection is not None else 0
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    vae = _params(module.vae)
    with torch.device("meta"):
        text = (_params(CLIPTextModel(CLIPTextConfig(**SDXL_BASE_TEXT["text_encoder"])))
                + _params(CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_BASE_TEXT["text_encoder_2"]))))
    stage1 = [build_stage1_on_meta(load_config([*STAGE1, f"configs/stage1/{t}_nsd.yaml"])).parameter_counts()["total"]
              for t in ("image", "text")]
    small = 4 * trained  # LoRA, routers (fp32)
    ip_file = 2 * (ip_kv + projection)  # the public file is fp16
    init_phase = small + frozen * (ip_kv + projection)  # built fp32, cast at once (the fp32 copy is transient)
    phases_now = {"__init__ (IP key / value built in fp32)": small + 4 * (ip_kv + projection),
                  "IP-Adapter file": init_phase + ip_file, "text encoders (prompts)": init_phase + 4 * text,
                  "UNet + VAE": init_phase + frozen * unet + 4 * vae}
    resident_now = small + frozen * (unet + ip_kv + projection) + 4 * vae
    kept1 = [frozen * n for n in stage1]
    before_phase = small + 4 * (ip_kv + projection) + frozen * unet + 4 * vae + 4 * text
    phases_before = {"__init__ with stage-1 checkpoint 1": before_phase + 12 * stage1[0] + 4 * stage1[0],
                     "__init__ with stage-1 checkpoint 2": before_phase + kept1[0] + 12 * stage1[1] + 4 * stage1[1]}
    optimizer = 12 * trained
    now, before = overhead + max(phases_now.values()), overhead + max(phases_before.values())
    return {"overhead_gb": round(overhead / GB, 2),
            "params": {"unet": unet, "vae": vae, "ip_kv": ip_kv, "image_projection": projection,
                       "trained": trained, "text_encoders": text, "stage1_image": stage1[0],
                       "stage1_text": stage1[1]},
            "now_with_cache": {"phases_gb": {k: round((overhead + v) / GB, 2) for k, v in phases_now.items()},
                               "peak_gb": round(now / GB, 2),
                               "resident_after_load_gb": round((overhead + resident_now) / GB, 2),
                               "resident_plus_host_optimizer_gb": round((overhead + resident_now + optimizer) / GB,
                                                                        2)},
            "before": {"phases_gb": {k: round((overhead + v) / GB, 2) for k, v in phases_before.items()},
                       "peak_gb": round(before / GB, 2)},
            "target_gb": 8.0}


def run(work: str | Path = "data/bench/conditions") -> dict[str, Any]:
    from experiments.benchmarks.condition_step import prepare

    args, cache = prepare(Path(work))
    live, cached = _measure(args, None), _measure(args, cache)
    tiny = {name: {"rss_after_imports_mb": round(m["rss_after_imports"] / 1e6, 1),
                   "peak_rss_mb": round(m["peak_rss"] / 1e6, 1),
                   "module_mb": round(m["module_bytes"] / 1e6, 2),
                   # the formula on the tiny module: overhead + what it holds + host optimiser
                   "estimate_mb": round((m["rss_after_imports"] + m["module_bytes"] + m["optimizer_bytes"]) / 1e6,
                                        1)}
            for name, m in (("live", live), ("cached", cached))}
    return {"benchmark": "stage2_host_memory_per_rank", "tiny_measured": tiny,
            # the overhead a paper rank pays too: the tiny rank's RSS after imports plus what its peak exceeded
            # the formula by (libraries loaded later, activations, allocator slack)
            "paper_estimate": paper_estimate(cached["rss_after_imports"] + max(
                0, cached["peak_rss"] - cached["rss_after_imports"] - cached["module_bytes"]
                - cached["optimizer_bytes"]))}


def main(argv: list[str] | None = None) -> int:
    """The probe's door (``run``'s subprocesses): prints the probe's JSON on its last line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.stage2_memory")
    parser.add_argument("--probe", required=True, help="the stage-2 CLI arguments, as a JSON list")
    parser.add_argument("--cache", default=None)
    args = parser.parse_args(argv)
    print(json.dumps(probe(json.loads(args.probe), args.cache)))
    return 0


if __name__ == "__main__":
    from experiments._cli import run_main

    sys.exit(run_main(main))
