"""Stage 2's conditioning cache (``experiments.cache_conditions``): the same numbers as the live stage-1 path,
without building the stage-1 encoders; atomic, resumable, shardable, and refusing a cache of other settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.common import run_command
from experiments import cache_conditions
from experiments._config import build, load_config
from lightning_modules.condition_cache import CachedStage1
from lightning_modules.stage1_conditions import FrozenStage1

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [str(REPO / "configs/base/stage2_trainer.yaml"), str(REPO / "configs/stage2/tiny_synthetic.yaml")]


def run_overrides(data: Path, models: Path, ckpts: dict[str, Path], tmp: Path) -> list[str]:
    """The tiny stage-2 run, its image branch routing the experts through the stage-1 prior (text: clip heads)."""
    return [f"--data.init_args.data_dir={data}", "--data.init_args.val_images=4",
            f"--data.init_args.val_cache_dir={tmp / 'val_cache'}", "--data.init_args.eval_batch_size=8",
            "--data.init_args.batch_size=6", f"--model.init_args.sdxl_dir={models}",
            f"--model.init_args.image_encoder={ckpts['image']}", f"--model.init_args.text_encoder={ckpts['text']}",
            "--model.init_args.image_branch.source=prior", "--model.init_args.prior_steps=3",
            "--model.init_args.prior_guidance=1.5"]


def write_cache(out: Path, overrides: list[str], *extra: str) -> int:
    args = [a for c in CONFIGS for a in ("--config", c)] + ["--out", str(out), "--no-progress", *extra, *overrides]
    return run_command(cache_conditions.main, args)


@pytest.fixture(scope="module")
def setup(small_data, tiny_models, stage1_checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("condition_cache")
    overrides = run_overrides(small_data, tiny_models, stage1_checkpoints, tmp)
    assert write_cache(tmp / "cond", overrides) == 0
    return tmp, overrides


def modules(overrides: list[str], cache: Path, *extra: str):
    """(live, cached) stage-2 modules of the same config, built through the CLI (which seeds them alike), and the
    config's data module, prepared."""
    from experiments.run import cli_main

    args = [a for c in CONFIGS for a in ("--config", c)] + overrides + list(extra)
    cli = cli_main(args, run=False)
    cached = cli_main(args + [f"--model.init_args.condition_cache={{image: {cache / 'image'}, "
                              f"text: {cache / 'text'}}}"], run=False).model
    cli.model.configure_model()
    cached.configure_model()
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    return cli.model, cached, dm


def test_cached_and_live_conditioning_give_identical_tokens_and_losses(setup):
    """A training batch (single trials) and a validation batch (repeats averaged, image branch through the prior):
    identical expert embeddings, routed tokens, image-token projection and diffusion loss; the cached module holds
    no stage-1 encoder at all."""
    tmp, overrides = setup
    live, cached, dm = modules(overrides, tmp / "cond")
    assert not any(isinstance(m, FrozenStage1) for m in cached.modules())
    assert isinstance(cached.image_encoder, CachedStage1) and isinstance(live.image_encoder, FrozenStage1)
    encoder_params = sum(p.numel() for p in live.image_encoder.parameters())
    assert encoder_params > 0
    assert sum(p.numel() for p in cached.parameters()) < sum(p.numel() for p in live.parameters()) - encoder_params
    train = next(iter(dm.train_dataloader()))[0]["subj01"]
    val = next(iter(dm.val_dataloader()[0]))
    assert train["voxels"].dim() == 2 and val["voxels"].dim() == 3
    for sub in (train, val):
        a, b = live.expert_embeddings(sub, "subj01"), cached.expert_embeddings(sub, "subj01")
        assert set(a) == {"image", "text"}
        for branch in a:
            assert all(torch.equal(x, y) for x, y in zip(a[branch], b[branch], strict=True)), branch
        latents = live.encode_latents(sub, sample=False)
        generator = torch.Generator().manual_seed(1)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, live.num_train_timesteps, (len(latents),), generator=generator)
        with torch.no_grad():
            loss_a, route_a, per_a = live.diffusion_loss(latents, a, t, noise)
            loss_b, route_b, per_b = cached.diffusion_loss(latents, b, t, noise)
        assert torch.equal(loss_a, loss_b) and torch.equal(per_a, per_b)
        for branch in route_a:
            assert torch.equal(route_a[branch].tokens, route_b[branch].tokens)
        # a control: another trial's experts change the loss (the comparison above could not pass by accident)
        rolled = {k: [x.roll(1, 0) for x in v] for k, v in b.items()}
        with torch.no_grad():
            assert not torch.equal(cached.diffusion_loss(latents, rolled, t, noise)[2], per_b)


def _parts(root: Path) -> dict[str, np.ndarray]:
    cache = CachedStage1(root, "test", {})
    out = {}
    for name, table in cache.tables.items():
        for split in ("train", "eval"):
            rows = table.rows(split, table.keys[split], "test", name)
            out[f"{name}/{split}"] = (table.keys[split], rows)
    return out


def test_rerun_keeps_parts_interrupted_run_resumes_and_shards_join_to_the_same_cache(setup, monkeypatch):
    tmp, overrides = setup
    reference = _parts(tmp / "cond" / "image")
    part = tmp / "cond" / "image" / "subj01" / "part-0-of-1"
    stamp = (part / "train_values.npy").stat().st_mtime_ns
    assert write_cache(tmp / "cond", overrides, "--branches", "image") == 0
    assert (part / "train_values.npy").stat().st_mtime_ns == stamp  # up to date: not recomputed

    from experiments.caching import conditions

    original, calls = conditions.PartWriter.write, []

    def interrupted(self, split, keys, values):
        calls.append(split)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(self, split, keys, values)

    monkeypatch.setattr(conditions.PartWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_cache(tmp / "resumed", overrides, "--branches", "image")
    assert not (tmp / "resumed" / "image" / "subj01" / "part-0-of-1").exists()  # nothing half-written in place
    assert (tmp / "resumed" / "image" / "subj01" / ".part-0-of-1.tmp" / "progress.json").is_file()
    monkeypatch.setattr(conditions.PartWriter, "write", original)
    written = []
    monkeypatch.setattr(conditions.PartWriter, "write", lambda self, *a: (written.append(len(a[1])),
                                                                              original(self, *a)))
    assert write_cache(tmp / "resumed", overrides, "--branches", "image") == 0
    total = sum(len(k) for k, _ in reference.values())
    assert sum(written) == total - 2 * 6  # the two batches written before the interruption are not redone
    monkeypatch.setattr(conditions.PartWriter, "write", original)
    for root in (tmp / "resumed" / "image",):
        got = _parts(root)
        assert all(np.array_equal(got[k][0], reference[k][0]) and np.array_equal(got[k][1], reference[k][1])
                   for k in reference)
    for shard in (0, 1):
        assert write_cache(tmp / "sharded", overrides, "--branches", "image", "--shard", str(shard),
                           "--num-shards", "2") == 0
    sharded = _parts(tmp / "sharded" / "image")
    assert all(np.array_equal(sharded[k][0], reference[k][0]) and np.array_equal(sharded[k][1], reference[k][1])
               for k in reference)


def test_a_cache_of_other_settings_data_or_subjects_is_refused_naming_the_option(setup, tmp_path, capsys):
    tmp, overrides = setup
    cache = tmp / "cond"
    with pytest.raises(ValueError, match=r"model.condition_cache.image: .* prior_steps=3, but this run has "
                                         r"model.prior_steps=4"):
        modules(overrides, cache, "--model.init_args.prior_steps=4")
    dm = build(load_config(CONFIGS, overrides)["data"])
    dm.prepare_data()
    dm.setup("fit")
    encoder = CachedStage1(cache / "text", "model.condition_cache.text", {})
    sub = next(iter(dm.train_dataloader()))[0]["subj01"]
    assert len(encoder.embed(sub, "subj01")) == 4
    sub["voxels"] = sub["voxels"] + 1e-3  # other betas of the same trials
    with pytest.raises(ValueError, match="model.condition_cache.text: no train entry for subj01 nsd_id"):
        encoder.embed(sub, "subj01")
    with pytest.raises(ValueError, match="has no entries for"):
        encoder.embed(sub, "subj02")
    with pytest.raises(ValueError, match="model.condition_cache.image: no condition cache at"):
        CachedStage1(tmp_path / "missing", "model.condition_cache.image", {})
    args = [a for c in CONFIGS for a in ("--config", c)] + overrides + ["--trainer.fast_dev_run=true",
                                                                        "--model.init_args.condition_cache="
                                                                        f"{{image: {tmp_path / 'missing'}}}"]
    from experiments.run import main

    assert run_command(main, ["fit", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: model.condition_cache.image: no condition cache at {tmp_path / 'missing'}")
    assert run_command(cache_conditions.main, [*args[:-2], "--out", str(tmp_path / "c"), "--branches", "text",
                                               f"--model.init_args.text_encoder={tmp_path / 'none.ckpt'}"]) == 2
    assert "model.text_encoder" in capsys.readouterr().err
