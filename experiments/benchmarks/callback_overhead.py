"""What the monitoring callbacks cost: their share of fit time on the tiny configs (``make bench``).

One run with the callbacks, every hook of the measured callbacks timed (share = time inside their hooks / fit
time), and one run of the same fit without them (wall-time ratio), for stage 1 (``RoutingStatistics`` and the
retrieval ``ReconstructionGrid``) and stage 2 (``DiffusionRoutingStatistics`` and the reconstruction
``ReconstructionGrid``), on a small synthetic dataset with tiny models. Target: share under 5%.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import lightning as L

from datamodules.synthetic import SyntheticNSDConfig, generate

DATA = SyntheticNSDConfig(seed=3, voxels=(300,), num_sessions=3, trials_per_session=90, num_test_images=20,
                          image_size=32)
MEASURED = ("RoutingStatistics", "DiffusionRoutingStatistics", "ReconstructionGrid")


class HookTimer(L.Callback):
    """Wraps the hooks of the measured callbacks of a trainer with timers (installed on ``setup``)."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[str, float] = {}
        self.fit_seconds = 0.0

    def setup(self, trainer, pl_module, stage: str) -> None:
        for callback in trainer.callbacks:
            name = type(callback).__name__
            if name not in MEASURED:
                continue
            self.seconds.setdefault(name, 0.0)
            for hook in dir(L.Callback):
                if hook.startswith(("on_", "setup", "teardown")) and hook in type(callback).__dict__:
                    setattr(callback, hook, self._timed(name, getattr(callback, hook)))

    def _timed(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return wrapper

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_seconds = time.perf_counter() - self._start


def _fit(args: list[str], measured: bool) -> tuple[float, dict[str, float]]:
    from experiments.run import cli_main

    cli = cli_main(args, run=False)
    if not measured:
        cli.trainer.callbacks = [c for c in cli.trainer.callbacks if type(c).__name__ not in MEASURED]
    timer = HookTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    return timer.fit_seconds, timer.seconds


def tiny_inputs(work: Path) -> tuple[Path, Path, list[str]]:
    """The tiny benchmarks' inputs under ``work`` (made once, then reused): the synthetic dataset with its text
    target cache and the tiny models; returns (data, models, the CLI arguments every run there shares)."""
    from experiments.caching.targets import cache_targets
    from experiments.world.tiny_models import make_tiny_clip, make_tiny_sdxl

    data, models, runs = work / "data", work / "tiny_models", work / "runs"
    if not (data / "subj01" / "meta.json").exists():
        generate(DATA, data)
    if not (models / "unet" / "config.json").exists():
        make_tiny_sdxl(make_tiny_clip(models))
    if not (data / "targets" / "clip_text" / "meta.json").exists():
        cache_targets(data, [1], data / "targets", text_model=str(models))
    return data, models, [
        f"--data.init_args.data_dir={data}", "--data.init_args.subjects=[subj01]", "--data.init_args.val_images=20",
        f"--data.init_args.val_cache_dir={work / 'val_cache'}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={runs}",
        f"--trainer.default_root_dir={runs}"]


def run(work: str | Path = "data/bench/callbacks", epochs: dict[str, int] | None = None) -> dict[str, Any]:
    """Each tiny config keeps its own validation schedule (stage 1: every 5 epochs; stage 2: every epoch)."""
    epochs = {"stage1": 10, "stage2": 3, **(epochs or {})}
    work = Path(work)
    data, models, common = tiny_inputs(work)
    stage1 = ["--config", "configs/base/trainer.yaml", "--config", "configs/stage1/tiny_synthetic.yaml", *common,
              f"--trainer.max_epochs={epochs['stage1']}"]
    result: dict[str, Any] = {"epochs": epochs, "data": "synthetic, 1 subject, 270 trials, 20 validation images"}
    for stage, args in (("stage1", stage1),):
        result[stage] = _measure(args)
    ckpt = work / "runs" / "stage1_tiny" / "without" / "checkpoints" / "last.ckpt"
    stage2 = ["--config", "configs/base/stage2_trainer.yaml", "--config", "configs/stage2/tiny_synthetic.yaml",
              *common, f"--model.init_args.sdxl_dir={models}", f"--model.init_args.image_encoder={ckpt}",
              f"--model.init_args.text_encoder={ckpt}", "--data.init_args.samples_per_epoch=160",
              "--data.init_args.batch_size=8", f"--trainer.max_epochs={epochs['stage2']}"]
    result["stage2"] = _measure(stage2)
    return result


def _measure(args: list[str]) -> dict[str, Any]:
    # "without" first, so that one-time costs of the process (imports, caches) do not count against the callbacks
    without_seconds, _ = _fit([*args, "--trainer.logger.init_args.version=without"], measured=False)
    with_seconds, hooks = _fit([*args, "--trainer.logger.init_args.version=with"], measured=True)
    inside = sum(hooks.values())
    return {"fit_seconds_with": round(with_seconds, 2), "fit_seconds_without": round(without_seconds, 2),
            "hook_seconds": {k: round(v, 3) for k, v in hooks.items()},
            "share_of_fit_time": round(inside / with_seconds, 4),
            "wall_ratio_with_vs_without": round(with_seconds / without_seconds, 3), "target_share": 0.05}
