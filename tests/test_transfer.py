"""Cross-subject transfer: exactly the intended parameters train (stage 1 and stage 2), and on synthetic data a
transferred model with one session reaches the full-data model (experiments.studies.transfer)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import NSDDataModule
from experiments.run import cli_main
from lightning_modules import BrainEncoderModule

REPO = Path(__file__).resolve().parent.parent


class Snapshot(L.Callback):
    """The module's state when training starts (after ``init_from`` was loaded in setup)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _transfer_fit(data: Path, source: Path, tmp: Path, *extra: str):
    snapshot = Snapshot()
    cli = cli_main(["--config", str(REPO / "configs/base/trainer.yaml"),
                    "--config", str(REPO / "configs/stage1/tiny_synthetic.yaml"),
                    f"--data.init_args.data_dir={data}", "--data.init_args.subjects=[subj03]",
                    "--data.init_args.num_sessions=1", "--data.init_args.val_images=4",
                    f"--data.init_args.val_cache_dir={tmp / 'val_cache'}", "--model.init_args.target=clip_text",
                    "--model.init_args.prior_inputs=[mean, experts]", f"--model.init_args.init_from={source}",
                    "--model.init_args.new_subjects=[subj03]", f"--trainer.default_root_dir={tmp}",
                    f"--trainer.logger.init_args.save_dir={tmp}", "--trainer.max_steps=1",
                    "--trainer.enable_progress_bar=false", "--trainer.check_val_every_n_epoch=1000", *extra],
                   run=False)
    cli.trainer.callbacks.append(snapshot)
    cli.trainer.fit(cli.model, cli.datamodule)
    after = cli.model.state_dict()
    changed = {k for k, v in snapshot.state.items() if v.is_floating_point() and not torch.equal(v, after[k])}
    return cli, snapshot.state, changed


def _names(model: BrainEncoderModule, part: str) -> set[str]:
    ids = {id(p) for m in model.parts()[part] for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("trainable", [None, "[new_adapters, routers, prior]"])
def test_stage1_transfer_changes_exactly_the_intended_parameters(small_data, targets, stage1_checkpoints, tmp_path,
                                                                 trainable):
    source_path = stage1_checkpoints["text"]
    extra = [f"--model.init_args.trainable={trainable}"] if trainable else []
    cli, before, changed = _transfer_fit(small_data, source_path, tmp_path, *extra)
    model = cli.model
    intended = _names(model, "new_adapters") | _names(model, "routers")
    if trainable:
        # the prior's clip_mean / clip_std are frozen by the prior itself (unused by its loss)
        intended |= {n for n in _names(model, "prior") if not n.endswith(("clip_mean", "clip_std"))}
    assert changed == intended
    source = torch.load(source_path, map_location="cpu", weights_only=False)["state_dict"]
    frozen = set(model.state_dict()) - intended - {k for k in model.state_dict() if k.startswith("adapters.")}
    assert frozen and all(torch.equal(before[k], source[k]) for k in frozen if k in source)
    assert all(torch.equal(model.state_dict()[k], source[k]) for k in _names(model, "experts"))
    counts = model.parameter_counts()
    groups = counts["groups"]
    assert groups["new_adapters"]["params"] == 360 * 128 + 128 and groups["routers"]["params"] == 30
    assert groups["new_adapters"]["trainable"] == groups["new_adapters"]["params"]
    prior = sum(p.numel() for n, p in model.prior.named_parameters() if not n.endswith(("clip_mean", "clip_std")))
    assert groups["rest"]["trainable"] == (prior if trainable else 0)
    assert sum(g["params"] for g in groups.values()) == counts["total"]
    written = (Path(cli.trainer.log_dir) / "parameters.json").read_text()
    assert '"new_adapters"' in written and '"provenance"' in written


def test_trainable_parts_are_checked():
    from lightning_modules.components import HierarchicalMoE

    moe = HierarchicalMoE(hidden_dim=16, out_dim=8, num_blocks=1, clip_hidden=8)
    with pytest.raises(ValueError, match="model.trainable: unknown parts"):
        BrainEncoderModule(moe, num_voxels={"subj01": 10}, trainable=["routerz"])
    with pytest.raises(ValueError, match="new_subjects is empty"):
        BrainEncoderModule(moe, num_voxels={"subj01": 10}, trainable=["new_adapters"])
    model = BrainEncoderModule(moe, num_voxels={"subj01": 10}, trainable=["adapters", "routers"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == (
        {"adapters.adapters.subj01.weight", "adapters.adapters.subj01.bias"}
        | {f"moe.routers.{i}.weight" for i in range(4)})


def test_stage2_transfer_trains_only_the_routers_and_keeps_complete_checkpoints(
        small_data, tiny_models, stage1_checkpoints, tmp_path):
    from tests.test_stage2_module import build

    source = build(tiny_models, stage1_checkpoints)
    for p in source.parameters():  # a "trained" source: every stored part differs from a fresh module's
        if p.requires_grad:
            p.data.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "source.ckpt"
    torch.save({"state_dict": source.trained_state_dict()}, path)
    model = build(tiny_models, stage1_checkpoints, init_from=str(path), trainable=["routers"],
                  num_voxels={"subj03": 360})
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in model.stored_names() if "_router." in n}
    snapshot = Snapshot()
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                        default_root_dir=str(tmp_path), logger=L.pytorch.loggers.TensorBoardLogger(str(tmp_path)),
                        enable_model_summary=False, callbacks=[snapshot])
    trainer.fit(model, NSDDataModule(str(small_data), subjects=["subj03"], num_sessions=1, batch_size=4,
                                     num_workers=0, val_images=4, val_cache_dir=str(tmp_path / "val_cache"),
                                     samples_per_epoch=8))
    stored = source.trained_state_dict()
    assert all(torch.equal(snapshot.state[k], v) for k, v in stored.items())  # init_from loaded everything
    after = model.trained_state_dict()
    changed = {k for k in after if not torch.equal(after[k], stored[k])}
    assert changed == {k for k in after if "_router." in k}  # LoRA, projections, IP weights: as loaded
    ckpt = torch.load(trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path,
                      map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == set(stored)  # complete: LoRA and projections travel with the routers
    assert ckpt["provenance"]["sources"]["init_from"] == str(path)
    counts = model.parameter_counts()
    assert counts["trainable"] == sum(g["trainable"] for g in counts["groups"].values()) == \
        counts["groups"]["routers"]["params"]
    with_projections = build(tiny_models, stage1_checkpoints, trainable=["routers", "projections"])
    assert all(p.requires_grad for p in with_projections.image_projection.parameters())
    assert not any(p.requires_grad for m in with_projections.parts()["lora"] for p in m.parameters())
    with pytest.raises(FileNotFoundError, match="model.init_from"):
        build(tiny_models, stage1_checkpoints, init_from=str(tmp_path / "missing.ckpt")).setup("fit")


def test_paper_scale_stage2_transfer_counts_only_the_routers_as_trained():
    from experiments.params import stage2_rows

    spec = {"temporal": "soft", "spatial": True, "grid": 4}
    rows, _ = stage2_rows({"image_branch": spec, "text_branch": spec, "trainable": ["routers"]})
    by = {r["key"]: r for r in rows}
    assert by["total"]["trainable"] == by["image_router"]["params"] + by["text_router"]["params"] == 1_181_184
    assert by["lora"]["trainable"] == 0 and by["lora"]["params"] == 41_861_120
