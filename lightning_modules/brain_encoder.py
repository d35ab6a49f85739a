"""Stage 1 LightningModule: per-subject adapters + hierarchical MoE (+ diffusion prior) -> CLIP space.

Receives its parts by injection (``moe``, ``prior``) so that tiny test models, LightningCLI configs and
``load_from_checkpoint`` all work; the subject adapters are built from ``num_voxels`` (linked from the data).
Batches follow ``datamodules/README.md``; the target is the joined cache named ``target``. Hooks and wiring only:
the loss recipe is ``components.stage1_objective``, parts / transfer ``stage1_parts``, metrics ``stage1_evaluation``.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable
from lightning.pytorch.core.mixins import hparams_mixin
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from datamodules.common import provenance
from datamodules.shard_format import FORMAT_VERSION
from lightning_modules.adamw import AdamWImpl, adamw
from lightning_modules.components.diffusion_prior import DiffusionPrior
from lightning_modules.components.losses import mixco_inputs
from lightning_modules.components.moe_encoder import HierarchicalMoE, MoEOutput
from lightning_modules.components.stage1_objective import Stage1Objective
from lightning_modules.components.subject_adapters import SubjectAdapters
from lightning_modules.components.token_head import TokenHead
from lightning_modules.run_records import attached_datamodule, datamodule_record, write_run_record
from lightning_modules.stage1_evaluation import (
    collect_metrics,
    encode_repeats,
    evaluation_metrics,
    predict_record,
    update_metrics,
)
from lightning_modules.stage1_parts import (  # noqa: F401 - ALL_PARTS, TRANSFER_PARTS: importable from here
    ALL_PARTS,
    TRANSFER_PARTS,
    Part,
    apply_trainable,
    check_subjects,
    check_target_widths,
    decay_groups,
    load_stage1_transfer,
    parameter_counts,
    parameter_summary,
    stage1_parts,
    target_widths,
)

PriorInput = Literal["mean", "level_sums", "experts"]


class BrainEncoderModule(L.LightningModule):
    """MoRE-Brain stage 1.

    Args:
        moe: the subject-independent hierarchical MoE (its ``hidden_dim`` is the adapters' output width).
        prior: optional brain -> CLIP diffusion prior trained jointly on ``prior_inputs``.
        num_voxels: voxel count per subject (linked from ``data.num_voxels()`` by the CLI).
        b_size: optional information bottleneck width inside every adapter (V -> b -> H, two Linears, no
            activation; the reference's --b_size); the MoE keeps its width H.
        target: name of the joined target in the batch (``clip_image`` or ``clip_text``).
        clip_scale / prior_scale / cos_scale / mse_scale / prior_clip_scale / balance_scale: loss weights
            (contrastive on the clip heads, prior MSE, 1 - cosine of the prior output, MSE of the clip heads,
            contrastive on the prior output, differentiable balance term).
        mixup_pct: BiMixCo during this fraction of training (then SoftCLIP); 0 disables.
        mixco_temperature: BiMixCo temperature; softclip_temperature: (start, end) cosine-annealed after mixup.
        supervise_levels: also supervise every level's clip sum, not only the level average.
        prior_inputs: what the prior is trained on: the level average (reference), each level sum, each expert.
            Expert rows are detached: the prior learns to map expert embeddings (what stage 2 feeds it), the
            experts are not pulled toward the whole CLIP target. Each kind is its own MSE term, so the level
            average keeps the reference's full weight however many experts there are.
        prior_expert_weight: weight of the expert rows' prior MSE term (the mean and level-sum terms weigh 1):
            prior loss = MSE(mean) [+ MSE(level sums)] + prior_expert_weight * MSE(experts).
        lr, weight_decay, adamw_impl, lr_scheduler, onecycle_pct_start, onecycle_final_div: AdamW (no decay on
            biases and norms) with OneCycle as in the reference unless ``lr_scheduler`` is given.
        repeat_average: evaluation averages test repeats at the model ``output`` (MindEye2) or ``input``.
        retrieval_candidates / retrieval_draws: MindEye2 retrieval over min(300, N) candidates, 30 draws.
        eval_prior_steps / eval_seed: deterministic prior sampling in validation, test and predict.
        init_from / new_subjects: start from a stage-1 checkpoint; ``new_subjects`` get fresh adapters.
        trainable: the parts trained, frozen by module reference (``parts()``): ``new_adapters`` (adapters of
            ``new_subjects``), ``adapters`` (the other subjects'), ``routers`` (the gates), ``experts``, ``heads``
            (backbone and clip heads), ``prior`` and ``token_head``. Default: everything, or with
            ``new_subjects`` the router-only transfer ``[new_adapters, routers]`` (the prior's trainability is
            the explicit ``prior`` entry; MindEye2's fine-tuning lists every part).
        token_head / token_target / token_scale: optional MindEye2 token target (e.g. 256 x 1664 bigG patch
            tokens, the joined cache ``token_target``) predicted by one shared head on the level-averaged backbone,
            trained with SoftCLIP on the flattened tokens.
    """

    def __init__(self, moe: HierarchicalMoE, prior: DiffusionPrior | None = None,
                 num_voxels: dict[str, int] | None = None, b_size: int | None = None,
                 target: str = "clip_image", clip_scale: float = 1.0, prior_scale: float = 30.0,
                 cos_scale: float = 0.5, mse_scale: float = 0.0, prior_clip_scale: float = 1.0,
                 balance_scale: float = 0.0, mixup_pct: float = 0.33, mixco_temperature: float = 0.03,
                 softclip_temperature: tuple[float, float] = (0.02, 0.0375), supervise_levels: bool = False,
                 prior_inputs: list[PriorInput] | None = None, prior_expert_weight: float = 1.0, lr: float = 3e-4, weight_decay: float = 1e-2,
                 adamw_impl: AdamWImpl = "fused",
                 lr_scheduler: LRSchedulerCallable | None = None, onecycle_pct_start: float | None = None,
                 onecycle_final_div: float = 1000.0, repeat_average: Literal["output", "input"] = "output",
                 retrieval_candidates: int = 300, retrieval_draws: int = 30, eval_prior_steps: int | None = None,
                 eval_seed: int = 0, init_from: str | None = None, new_subjects: list[str] | None = None,
                 token_head: TokenHead | None = None, token_target: str | None = None, token_scale: float = 1.0,
                 trainable: list[Part] | None = None):
        super().__init__()
        # Under LightningCLI the hyperparameters are its config (moe, prior, token_head as class_path + init_args:
        # what `run test --ckpt_path` and load_from_checkpoint rebuild from); built directly (load_from_checkpoint
        # itself, tests) those arguments are module objects that the state dict holds already: not recorded.
        injected = {"moe": moe, "prior": prior, "token_head": token_head}
        cli = hparams_mixin._given_hyperparameters.get() is not None
        self.save_hyperparameters(ignore=[] if cli else
                                  [k for k, v in injected.items() if isinstance(v, nn.Module)])
        self.num_voxels, self.new_subjects = check_subjects(num_voxels, new_subjects, init_from)
        self.moe, self.prior, self.token_head = moe, prior, token_head
        self.lr_scheduler_factory = lr_scheduler  # hparams keep its config; this is the callable itself
        if (token_head is None) != (token_target is None):
            raise ValueError("model.token_head and model.token_target go together (give both or neither)")
        self.adapters = SubjectAdapters(self.num_voxels, moe.hidden_dim, b_size)
        self.prior_inputs = list(prior_inputs or ["mean"])
        self.trainable = apply_trainable(self, self.parts(), trainable, self.new_subjects)
        if prior is not None and prior.embed_dim != moe.out_dim:
            raise ValueError(f"prior.embed_dim {prior.embed_dim} != moe.out_dim {moe.out_dim}")
        self.val_retrieval, self.val_prior_retrieval, self.val_means = evaluation_metrics(
            list(self.num_voxels), retrieval_candidates, retrieval_draws, eval_seed)
        self.run_config: str | None = None  # the resolved config, set by experiments.run

    # ------------------------------------------------------------------ forward
    def encode(self, voxels: torch.Tensor, subject: str) -> MoEOutput:
        """(B, V_s) voxels of ``subject`` -> MoEOutput."""
        return self.moe(self.adapters(voxels, subject))

    def forward(self, voxels: torch.Tensor, subject: str) -> torch.Tensor:
        """(B, V_s) -> (B, D) level-averaged clip embedding."""
        return self.encode(voxels, subject).clip_mean

    def _progress(self) -> float:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return self.global_step / max(1, total)

    # ------------------------------------------------------------------ training (Stage1Objective)
    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> torch.Tensor:
        objective, progress = self.objective, self._progress()
        mixing = objective.mixing(progress)
        hidden, targets, tokens, betas, perms, offset = [], [], [], [], [], 0
        for subject, sub in batch.items():
            voxels = sub["voxels"]
            if mixing:
                voxels, beta, perm = mixco_inputs(voxels)
                betas.append(beta)
                perms.append(perm + offset)
            hidden.append(self.adapters(voxels, subject))
            targets.append(self._target(sub))
            if self.token_head is not None:
                tokens.append(self._target(sub, self.hparams.token_target))
            offset += len(voxels)
        out = self.moe(torch.cat(hidden))
        target = torch.cat(targets)
        mix = (torch.cat(betas), torch.cat(perms)) if mixing else None
        losses = objective.losses(out, target, mix, progress, self.prior)
        if self.token_head is not None:
            objective.add_token_term(losses, self.token_head(out.backbone_mean).flatten(1), torch.cat(tokens),
                                     mix, progress)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(target))
        self.log("train/mixing", float(mixing), batch_size=len(target))
        return losses["loss"]

    def _target(self, sub: dict[str, Any], name: str | None = None) -> torch.Tensor:
        """The joined target ``name`` (default ``model.target``) of a sub-batch, flattened to (b, -1)."""
        name = name or self.hparams.target
        if name not in sub:
            raise KeyError(f"batch has no target {name!r}: add it to data.targets "
                           f"(found keys {sorted(k for k in sub if isinstance(sub[k], torch.Tensor))})")
        return sub[name].reshape(len(sub["nsd_id"]), -1)

    @property
    def objective(self) -> Stage1Objective:
        """The loss recipe with its schedule (``components.stage1_objective``), as the hyperparameters say now."""
        return Stage1Objective.from_hparams(self.hparams, self.prior_inputs)

    def _contrastive(self, preds: torch.Tensor, target: torch.Tensor, mix: tuple | None, progress: float):
        """BiMixCo (while mixing) or SoftCLIP: ``Stage1Objective.contrastive``."""
        return self.objective.contrastive(preds, target, mix, progress)

    def _losses(self, out: MoEOutput, target: torch.Tensor, mix: tuple | None, progress: float):
        """Every loss term and their weighted sum ``loss``: ``Stage1Objective.losses``."""
        return self.objective.losses(out, target, mix, progress, self.prior)

    # ------------------------------------------------------------------ evaluation (stage1_evaluation)
    def encode_repeats(self, voxels: torch.Tensor, mask: torch.Tensor, subject: str) -> tuple[MoEOutput, Any]:
        """(b, R, V) voxels and (b, R) repeat mask -> MoEOutput over b*R (output averaging) or b (input averaging)
        rows, and a function that averages a (rows, ...) tensor to (b, ...) (``stage1_evaluation``)."""
        return encode_repeats(self.encode, voxels, mask, subject, self.hparams.repeat_average)

    def _sample_prior(self, condition: torch.Tensor, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.hparams.eval_seed * 100003 + batch_idx)
        return self.prior.sample(condition, generator=generator, steps=self.hparams.eval_prior_steps)

    def _evaluate_batch(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Run the whole (possibly padded) batch, then keep the valid rows: every rank computes the same shapes
        even when its share is only padding. Returns clip/backbone/target/prior (n_valid, D), nsd_id, and the
        MoE output with a function averaging (rows, ...) -> (b, ...)."""
        valid = batch["valid"]
        out, average = self.encode_repeats(batch["voxels"], batch["repeat_mask"], batch["subject"])
        backbone = average(out.backbone_mean)
        result = {"clip": average(out.clip_mean)[valid], "backbone": backbone[valid],
                  "target": self._target(batch)[valid], "nsd_id": batch["nsd_id"][valid], "out": out,
                  "average": average, "valid": valid}
        if self.prior is not None:
            result["prior"] = self._sample_prior(backbone, batch_idx)[valid]
        return result

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Updates every metric on every rank, even with no valid rows (a rank holding only DDP padding), so that
        all ranks take part in the same reductions. Returns the routing of every encoded row with ``row_mask``
        (False on padding and missing repeats) for the routing callbacks."""
        s = batch["subject"]
        r = self._evaluate_batch(batch, batch_idx)
        tokens = token_target = None
        if self.token_head is not None:
            tokens = self.token_head(r["backbone"]).flatten(1)
            token_target = self._target(batch, self.hparams.token_target)[batch["valid"]]
        update_metrics(s, r, self.val_retrieval[s], self.val_prior_retrieval[s], self.val_means, tokens, token_target)
        rows = batch["valid"][:, None] & batch["repeat_mask"] if self.hparams.repeat_average == "output" \
            else batch["valid"][:, None]
        return {"routing": r["out"].routing, "row_mask": rows.reshape(-1)}

    def _collect_metrics(self, stage: str) -> dict[str, float]:
        return collect_metrics(stage, self.num_voxels, self.val_retrieval, self.val_prior_retrieval, self.val_means,
                               self.hparams.retrieval_candidates)

    def on_validation_epoch_end(self) -> None:
        for name, value in self._collect_metrics("val").items():
            self.log(name, value, sync_dist=False, rank_zero_only=False)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        metrics = self._collect_metrics("test")
        for name, value in metrics.items():
            self.log(name, value, sync_dist=False)
        write_run_record(self.trainer, "test_metrics.json", {
            "metrics": metrics, "repeat_average": self.hparams.repeat_average, "provenance": self.provenance()})

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return predict_record(batch["subject"], self._evaluate_batch(batch, batch_idx), self.moe.num_levels)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        h = self.hparams
        groups = decay_groups(self, h.weight_decay)
        optimizer = adamw(groups, h.lr, h.weight_decay, h.adamw_impl)
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            epochs = max(1, self.trainer.max_epochs or 1)
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=h.lr, total_steps=max(2, int(self.trainer.estimated_stepping_batches)),
                pct_start=h.onecycle_pct_start or min(0.3, 2 / epochs), final_div_factor=h.onecycle_final_div)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ parts, transfer, provenance (stage1_parts)
    def setup(self, stage: str) -> None:
        self.check_target_widths(attached_datamodule(self))
        if stage == "fit" and self.hparams.init_from and not getattr(self, "_initialised_from", False):
            self.load_from_stage1(self.hparams.init_from, self.new_subjects)
            self._initialised_from = True

    def check_target_widths(self, datamodule: Any) -> None:
        """Every target the model reads exists in the data module's caches with its width (``check_target_widths``)."""
        check_target_widths(getattr(datamodule, "targets", None), target_widths(self))

    def parts(self) -> dict[str, list[nn.Module]]:
        """The module groups ``trainable`` names, by reference (``stage1_parts``; a part may be empty)."""
        return stage1_parts(self, self.new_subjects)

    def parameter_counts(self) -> dict[str, Any]:
        """Parameters of the adapters, the routers and the rest, with shares and trainable counts
        (``stage1_parts.parameter_counts``)."""
        return parameter_counts(self, self.parts(), self.trainable)

    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
        write_run_record(self.trainer, "parameters.json", {**counts, "provenance": self.provenance()})
        rank_zero_info(parameter_summary(counts))

    def load_from_stage1(self, path: str, new_subjects: list[str]) -> None:
        """Load every weight from a stage-1 checkpoint except the adapters of ``new_subjects`` (kept fresh)."""
        load_stage1_transfer(self, path, new_subjects, list(self.num_voxels))

    def provenance(self) -> dict[str, Any]:
        data = datamodule_record(attached_datamodule(self), "data_dir", "sessions", "normalisation", "val_images")
        return provenance(resolved_config=self.run_config, subjects=list(self.num_voxels),
                          data_format_version=FORMAT_VERSION, **data)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["provenance"] = self.provenance()
