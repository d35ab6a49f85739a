"""Stage 1 LightningModule: per-subject adapters + hierarchical MoE (+ diffusion prior) -> CLIP space.

Receives its parts by injection (``moe``, ``prior``) so that tiny test models, LightningCLI configs and
``load_from_checkpoint`` all work; the subject adapters are built from ``num_voxels`` (linked from the data).
Batches follow ``datamodules/README.md``; the target is the joined cache named ``target``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable
from lightning.pytorch.core.mixins import hparams_mixin
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from datamodules.provenance import provenance
from datamodules.shard_format import FORMAT_VERSION, subject_name
from lightning_modules.checkpoint_files import load_checkpoint_data
from lightning_modules.components.batched_layers import BatchedLayerNorm
from lightning_modules.components.diffusion_prior import DiffusionPrior
from lightning_modules.components.losses import (
    cosine_anneal,
    cosine_loss,
    mixco_inputs,
    mixco_nce,
    soft_clip_loss,
)
from lightning_modules.components.moe_encoder import HierarchicalMoE, MoEOutput
from lightning_modules.components.subject_adapters import SubjectAdapters
from lightning_modules.components.token_head import TokenHead
from lightning_modules.metrics import RetrievalMetric, retrieval_top1
from lightning_modules.run_records import write_run_record

PriorInput = Literal["mean", "level_sums", "experts"]
Part = Literal["new_adapters", "adapters", "routers", "experts", "heads", "prior", "token_head"]
ALL_PARTS: tuple[Part, ...] = ("new_adapters", "adapters", "routers", "experts", "heads", "prior", "token_head")
TRANSFER_PARTS: list[Part] = ["new_adapters", "routers"]


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
                 adamw_impl: Literal["fused", "foreach", "plain"] = "fused",
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
        if not num_voxels:
            raise ValueError("model.num_voxels is empty: give {subject: voxel count} (the CLI links it from data)")
        self.num_voxels = {subject_name(k): int(v) for k, v in num_voxels.items()}
        self.new_subjects = [subject_name(s) for s in new_subjects or []]
        unknown = sorted(set(self.new_subjects) - set(self.num_voxels))
        if unknown:
            raise ValueError(f"model.new_subjects {unknown} are not among the data subjects {list(self.num_voxels)}")
        if self.new_subjects and not init_from:
            raise ValueError("model.new_subjects needs model.init_from (the checkpoint to add them to)")
        self.moe, self.prior, self.token_head = moe, prior, token_head
        self.lr_scheduler_factory = lr_scheduler  # hparams keep its config; this is the callable itself
        if (token_head is None) != (token_target is None):
            raise ValueError("model.token_head and model.token_target go together (give both or neither)")
        self.adapters = SubjectAdapters(self.num_voxels, moe.hidden_dim, b_size)
        self.prior_inputs = list(prior_inputs or ["mean"])
        self.trainable = self._apply_trainable(trainable)
        if prior is not None and prior.embed_dim != moe.out_dim:
            raise ValueError(f"prior.embed_dim {prior.embed_dim} != moe.out_dim {moe.out_dim}")
        self.val_retrieval = nn.ModuleDict({s: RetrievalMetric(retrieval_candidates, retrieval_draws, eval_seed)
                                            for s in self.num_voxels})
        self.val_prior_retrieval = nn.ModuleDict({s: RetrievalMetric(retrieval_candidates, retrieval_draws,
                                                                     eval_seed) for s in self.num_voxels})
        self.val_means = nn.ModuleDict({f"{s}__{m}": MeanMetric() for s in self.num_voxels
                                        for m in ("cosine", "mse", "in_batch_fwd", "prior_cosine", "prior_mse",
                                                  "token_in_batch_fwd")})
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

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> torch.Tensor:
        progress = self._progress()
        mixing = progress < self.hparams.mixup_pct
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
        losses = self._losses(out, target, mix, progress)
        if self.token_head is not None:
            losses["token"] = self._contrastive(self.token_head(out.backbone_mean).flatten(1), torch.cat(tokens),
                                                mix, progress)
            losses["loss"] = losses["loss"] + self.hparams.token_scale * losses["token"]
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

    def _contrastive(self, preds: torch.Tensor, target: torch.Tensor, mix: tuple | None, progress: float):
        """(N, D) preds and targets -> scalar BiMixCo (while mixing) or SoftCLIP loss, in float32 (autocast off)."""
        with torch.autocast(device_type=preds.device.type, enabled=False):
            p, t = F.normalize(preds.float(), dim=-1), F.normalize(target.float(), dim=-1)
        if mix is not None:
            return mixco_nce(p, t, self.hparams.mixco_temperature, *mix)
        start = self.hparams.mixup_pct
        after = (progress - start) / max(1e-8, 1 - start)
        return soft_clip_loss(p, t, cosine_anneal(*self.hparams.softclip_temperature, after))

    def _prior_conditions(self, out: MoEOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """-> conditions (B, n_inputs, D) in ``prior_inputs`` order (expert rows detached) and the weight of each
        input row (n_inputs,) in the prior loss: every kind's rows share its weight (1, or ``prior_expert_weight``
        for the experts), so each kind is one mean-MSE term."""
        parts, weights = [], []
        for kind in self.prior_inputs:
            if kind == "mean":
                rows = out.backbone_mean[:, None]
            elif kind == "level_sums":
                rows = out.backbone_level_sums
            else:
                rows = torch.cat(out.backbone, 1).detach()
            parts.append(rows)
            weight = self.hparams.prior_expert_weight if kind == "experts" else 1.0
            weights.append(torch.full((rows.shape[1],), weight / rows.shape[1]))
        return torch.cat(parts, 1), torch.cat(weights)

    def _losses(self, out: MoEOutput, target: torch.Tensor, mix: tuple | None, progress: float):
        h = self.hparams
        losses: dict[str, torch.Tensor] = {}
        preds = [out.clip_mean] + ([out.clip_level_sums[:, lvl] for lvl in range(self.moe.num_levels)]
                                   if h.supervise_levels else [])
        losses["clip"] = torch.stack([self._contrastive(p, target, mix, progress) for p in preds]).mean()
        total = h.clip_scale * losses["clip"]
        if h.mse_scale:
            losses["mse"] = F.mse_loss(out.clip_mean, target)
            total = total + h.mse_scale * losses["mse"]
        if self.prior is not None:
            cond, row_weights = self._prior_conditions(out)
            n_inputs = cond.shape[1]
            _, pred = self.prior.loss(cond.reshape(-1, cond.shape[-1]), target.repeat_interleave(n_inputs, 0))
            pred = pred.reshape(len(target), n_inputs, -1)
            with torch.autocast(device_type=pred.device.type, enabled=False):
                per_row = (pred.float() - target[:, None].float()).pow(2).mean((0, 2))  # (n_inputs,)
                losses["prior"] = (per_row * row_weights.to(per_row.device)).sum()
            prior_out = pred[:, 0]
            losses["prior_cos"] = cosine_loss(prior_out, target)
            total = total + h.prior_scale * losses["prior"] + h.cos_scale * losses["prior_cos"]
            if h.prior_clip_scale:
                losses["prior_clip"] = self._contrastive(prior_out, target, mix, progress)
                total = total + h.prior_clip_scale * losses["prior_clip"]
        losses["balance"] = out.balance
        if h.balance_scale:
            total = total + h.balance_scale * out.balance
        losses["loss"] = total
        return losses

    # ------------------------------------------------------------------ evaluation
    def encode_repeats(self, voxels: torch.Tensor, mask: torch.Tensor, subject: str) -> tuple[MoEOutput, Any]:
        """(b, R, V) voxels and (b, R) repeat mask -> MoEOutput over b*R (output averaging) or b (input averaging)
        rows, and a function that averages a (rows, ...) tensor to (b, ...)."""
        b, r, v = voxels.shape
        weights = mask.float() / mask.float().sum(1, keepdim=True).clamp_min(1)
        if self.hparams.repeat_average == "input":
            out = self.encode((voxels * weights[..., None]).sum(1), subject)
            return out, lambda x: x
        out = self.encode(voxels.reshape(b * r, v), subject)

        def average(x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(b, r, *x.shape[1:])
            return (x * weights.reshape(b, r, *([1] * (x.dim() - 2)))).sum(1)
        return out, average

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
        n = len(r["target"])
        self.val_retrieval[s].update(r["clip"], r["target"], r["nsd_id"])
        self._update_mean(f"{s}__cosine", lambda: F.cosine_similarity(r["clip"], r["target"]).mean(), n)
        self._update_mean(f"{s}__mse", lambda: F.mse_loss(r["clip"], r["target"]), n)
        self._update_mean(f"{s}__in_batch_fwd",
                          lambda: torch.tensor(retrieval_top1(r["clip"], r["target"], candidates=n, draws=1)[0]), n)
        if self.token_head is not None:
            tokens = self.token_head(r["backbone"]).flatten(1)
            token_target = self._target(batch, self.hparams.token_target)[batch["valid"]]
            self._update_mean(f"{s}__token_in_batch_fwd", lambda: torch.tensor(
                retrieval_top1(tokens, token_target, candidates=n, draws=1)[0]), n)
        if "prior" in r:
            self.val_prior_retrieval[s].update(r["prior"], r["target"], r["nsd_id"])
            self._update_mean(f"{s}__prior_cosine", lambda: F.cosine_similarity(r["prior"], r["target"]).mean(), n)
            self._update_mean(f"{s}__prior_mse", lambda: F.mse_loss(r["prior"], r["target"]), n)
        rows = batch["valid"][:, None] & batch["repeat_mask"] if self.hparams.repeat_average == "output" \
            else batch["valid"][:, None]
        return {"routing": r["out"].routing, "row_mask": rows.reshape(-1)}

    def _update_mean(self, name: str, value, weight: int) -> None:
        metric = self.val_means[name]
        metric.update(value().to(metric.device) if weight else torch.zeros((), device=metric.device), weight)

    def _collect_metrics(self, stage: str) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for s in self.num_voxels:
            for name, metric in (("", self.val_retrieval[s]), ("prior_", self.val_prior_retrieval[s])):
                if metric.update_count:
                    values = metric.compute()
                    metrics[f"{stage}/{s}/{name}fwd_top1"] = float(values["fwd_top1"])
                    metrics[f"{stage}/{s}/{name}bwd_top1"] = float(values["bwd_top1"])
                    metrics[f"{stage}/{s}/{name}candidates"] = float(min(self.hparams.retrieval_candidates,
                                                                         int(values["count"])))
                metric.reset()
            for m in ("cosine", "mse", "in_batch_fwd", "prior_cosine", "prior_mse", "token_in_batch_fwd"):
                metric = self.val_means[f"{s}__{m}"]
                if metric.update_count:
                    metrics[f"{stage}/{s}/{m}"] = float(metric.compute())
                metric.reset()
        fwd = [v for k, v in metrics.items() if k.endswith("/fwd_top1") and "prior_" not in k]
        if fwd:
            metrics[f"{stage}/fwd_top1"] = sum(fwd) / len(fwd)
        return metrics

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
        r = self._evaluate_batch(batch, batch_idx)
        out, average, valid = r["out"], r["average"], r["valid"]
        rows = len(valid)
        record = {"subject": batch["subject"], "nsd_id": r["nsd_id"].cpu(), "clip_mean": r["clip"].cpu(),
                  "backbone_mean": r["backbone"].cpu(), "target": r["target"].cpu()}
        if "prior" in r:
            record["prior"] = r["prior"].cpu()
        for level in range(self.moe.num_levels):
            record[f"backbone_level{level}"] = average(out.backbone[level])[valid].cpu()
            record[f"clip_level{level}"] = average(out.clip[level])[valid].cpu()
            routing = out.routing[level]
            for name, value in (("indices", routing.indices), ("gates", routing.gates)):
                record[f"routing_{name}_level{level}"] = value.reshape(rows, -1, *value.shape[1:])[valid].cpu()
            record[f"routing_parent_level{level}"] = routing.parent.cpu()
        return record

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        h = self.hparams
        no_decay = set()
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, BatchedLayerNorm)):
                no_decay.update(id(p) for p in module.parameters(recurse=False))
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                no_decay.add(id(p))
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": h.weight_decay},
                  {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
        impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {"foreach": False}}[h.adamw_impl]
        optimizer = torch.optim.AdamW(groups, lr=h.lr, **impl)
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            epochs = max(1, self.trainer.max_epochs or 1)
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=h.lr, total_steps=max(2, int(self.trainer.estimated_stepping_batches)),
                pct_start=h.onecycle_pct_start or min(0.3, 2 / epochs), final_div_factor=h.onecycle_final_div)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ transfer and provenance
    def setup(self, stage: str) -> None:
        self.check_target_widths(getattr(self.trainer, "datamodule", None) if self._trainer is not None else None)
        if stage == "fit" and self.hparams.init_from and not getattr(self, "_initialised_from", False):
            self.load_from_stage1(self.hparams.init_from, self.new_subjects)
            self._initialised_from = True

    def check_target_widths(self, datamodule: Any) -> None:
        """Every target the model reads (``target``: (N, moe.out_dim); ``token_target``: (N, T * C) of the token
        head) exists in the data module's caches with that flattened width, else one error naming the target key,
        the cache and both widths (whatever ``data.target_shapes`` says, or without it)."""
        caches = getattr(datamodule, "targets", None)
        if not isinstance(caches, dict):
            return
        expected = {("model.target", self.hparams.target): self.moe.out_dim}
        if self.token_head is not None:
            expected[("model.token_target", self.hparams.token_target)] = (self.token_head.num_tokens
                                                                           * self.token_head.token_dim)
        for (option, name), width in expected.items():
            if name not in caches:
                raise ValueError(f"{option} {name!r} is not among data.targets {sorted(caches)}: add it there")
            shape = tuple(getattr(caches[name], "shape", ()))
            got = int(math.prod(shape)) if shape else None
            if got is not None and got != width:
                raise ValueError(f"{option} {name!r}: the target cache {getattr(caches[name], 'directory', '?')} "
                                 f"holds {got}-wide items (shape {list(shape)}), the model predicts {width}: "
                                 "recompute the cache with the model the config names, or fix the model's width")

    def parts(self) -> dict[str, list[nn.Module]]:
        """The module groups ``trainable`` names, by reference (a part may be empty, e.g. no prior)."""
        new = set(self.new_subjects)
        adapters = self.adapters.adapters
        return {"new_adapters": [adapters[s] for s in adapters if s in new],
                "adapters": [adapters[s] for s in adapters if s not in new],
                "routers": list(self.moe.routers), "experts": list(self.moe.experts),
                "heads": [*self.moe.backbone_heads, *self.moe.clip_heads],
                "prior": [self.prior] if self.prior is not None else [],
                "token_head": [self.token_head] if self.token_head is not None else []}

    def _apply_trainable(self, trainable: list[Part] | None) -> list[str]:
        if trainable is None:
            trainable = list(TRANSFER_PARTS) if self.new_subjects else list(ALL_PARTS)
        unknown = sorted(set(trainable) - set(ALL_PARTS))
        if unknown:
            raise ValueError(f"model.trainable: unknown parts {unknown}; choose from {list(ALL_PARTS)}")
        if "new_adapters" in trainable and not self.new_subjects and "adapters" not in trainable:
            raise ValueError("model.trainable lists new_adapters but model.new_subjects is empty: "
                             "list adapters (the data subjects' adapters) instead")
        parts = self.parts()
        covered = {id(p) for modules in parts.values() for m in modules for p in m.parameters()}
        stray = [n for n, p in self.named_parameters() if id(p) not in covered]
        if stray:
            raise RuntimeError(f"parameters outside every trainable part: {stray[:4]}")
        fixed = {id(p) for p in self.parameters() if not p.requires_grad}  # frozen by their own module
        for name, modules in parts.items():
            for p in (p for m in modules for p in m.parameters()):
                p.requires_grad_(name in trainable and id(p) not in fixed)
        if not any(p.requires_grad for p in self.parameters()):
            raise ValueError(f"model.trainable {trainable} selects no parameters")
        return [p for p in ALL_PARTS if p in trainable]

    def parameter_counts(self) -> dict[str, Any]:
        """Parameters of the subject adapters, the routers and the rest, with shares of the total and trainable
        counts: ``{"groups": {name: {"params", "share", "trainable"}}, "total", "trainable", "trainable_share",
        "trainable_parts"}``."""
        def count(params) -> tuple[int, int]:
            params = list(params)
            return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

        parts = self.parts()
        total, trainable = count(self.parameters())
        groups: dict[str, dict[str, float]] = {}
        seen: set[int] = set()
        for name in ("new_adapters", "adapters", "routers"):
            params = [p for m in parts[name] for p in m.parameters()]
            seen.update(id(p) for p in params)
            n, t = count(params)
            groups[name] = {"params": n, "share": n / max(1, total), "trainable": t}
        n, t = count(p for p in self.parameters() if id(p) not in seen)
        groups["rest"] = {"params": n, "share": n / max(1, total), "trainable": t}
        return {"groups": groups, "total": total, "trainable": trainable,
                "trainable_share": trainable / max(1, total),
                "trainable_parts": [p for p in self.trainable if parts[p]]}

    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
        write_run_record(self.trainer, "parameters.json", {**counts, "provenance": self.provenance()})
        g = counts["groups"]
        rank_zero_info("stage 1 parameters: " + ", ".join(
            f"{k} {v['params']:,} ({v['share']:.2%}, {v['trainable']:,} trained)" for k, v in g.items() if v["params"])
            + f"; trained {counts['trainable']:,} of {counts['total']:,} ({counts['trainable_share']:.2%})")

    def load_from_stage1(self, path: str, new_subjects: list[str]) -> None:
        """Load every weight from a stage-1 checkpoint except the adapters of ``new_subjects`` (kept fresh)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.init_from: no checkpoint at {path}")
        state = load_checkpoint_data(path, "model.init_from")["state_dict"]
        fresh = tuple(f"adapters.adapters.{s}." for s in new_subjects)
        own = self.state_dict()
        load = {k: v for k, v in state.items() if k in own and not k.startswith(fresh)}
        for subject in self.num_voxels:  # the adapters' input widths: voxel counts, named as such
            for key in (f"adapters.adapters.{subject}.weight", f"adapters.adapters.{subject}.0.weight"):
                if key in load and load[key].shape[-1] != own[key].shape[-1]:
                    raise ValueError(f"model.init_from {path}: {subject} has {load[key].shape[-1]} voxels there "
                                     f"but {own[key].shape[-1]} in the data; list {subject} in model.new_subjects "
                                     "for a fresh adapter, or use the data the checkpoint was trained on")
        wrong = [f"{k} {list(v.shape)} (here {list(own[k].shape)})" for k, v in load.items()
                 if v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"model.init_from {path} has other shapes: {', '.join(wrong[:3])}: a different "
                             "architecture (model.moe, model.prior, model.b_size)?")
        missing = [k for k in own if k not in load and not k.startswith(fresh)]
        if missing:
            raise ValueError(f"model.init_from {path} lacks {missing[:4]}{'...' if len(missing) > 4 else ''}: "
                             "is a subject missing from model.new_subjects, or is the architecture different?")
        self.load_state_dict(load, strict=False)

    def provenance(self) -> dict[str, Any]:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data: dict[str, Any] = {"subjects": list(self.num_voxels), "data_format_version": FORMAT_VERSION}
        if dm is not None and getattr(dm, "metas", None):
            data["data_dir"] = str(dm.data_dir)
            data["sessions"] = {s: dm.sessions(s) for s in dm.subjects}
            data["normalisation"] = {s: dm.metas[s]["normalisation"].get("kind") for s in dm.subjects}
            data["val_images"] = dm.val_images
        return provenance(resolved_config=self.run_config, **data)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["provenance"] = self.provenance()
