"""Ground truth beside reconstruction on a fixed probe set of validation images, logged to TensorBoard.

Rank zero only, with no collective calls inside, every ``every_n_epochs`` validations. The probe is the first
``num_images`` valid images of the first validation batch of the first subject (a fixed, seeded choice: the
validation split and its order are fixed by the data seed), taken once.

- Stage 2 (a module with ``reconstruct``): [truth | reconstruction] with ``steps`` sampler steps.
- Stage 1 (a module with ``encode_repeats``): [truth | top ``top_k`` retrieved images], retrieved by cosine
  similarity of the predicted embedding among the targets of rank zero's validation images (the gallery).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F


class ReconstructionGrid(L.Callback):
    def __init__(self, num_images: int = 4, every_n_epochs: int = 1, steps: int = 10, top_k: int = 3):
        super().__init__()
        self.num_images, self.every_n_epochs, self.steps, self.top_k = num_images, every_n_epochs, steps, top_k
        self.probe: dict[str, Any] | None = None
        self.gallery: dict[str, list] = {"nsd_id": [], "target": []}
        self._gallery_done = False
        self._images: dict[int, object] | None = None  # gallery images, read once from the validation shard

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.is_global_zero or dataloader_idx != 0 or trainer.sanity_checking:
            return
        valid = batch["valid"]
        if self.probe is None:
            keep = valid.nonzero().flatten()[: self.num_images]
            self.probe = {k: (v[keep].detach().cpu() if isinstance(v, torch.Tensor) and len(v) == len(valid)
                              else v) for k, v in batch.items()}
        if not self._gallery_done and hasattr(pl_module, "encode_repeats"):
            self.gallery["nsd_id"].append(batch["nsd_id"][valid].cpu())
            self.gallery["target"].append(pl_module._target(batch)[valid].detach().cpu())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.gallery["nsd_id"]:
            self._gallery_done = True
        if (not trainer.is_global_zero or trainer.sanity_checking or self.probe is None
                or trainer.current_epoch % self.every_n_epochs):
            return
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if not hasattr(experiment, "add_image"):
            return
        with torch.no_grad():
            grid = self._stage2(pl_module) if hasattr(pl_module, "reconstruct") else self._stage1(trainer, pl_module)
        if grid is not None:
            from torchvision.utils import make_grid

            rows, columns = grid
            experiment.add_image("val/truth_vs_reconstruction" if hasattr(pl_module, "reconstruct")
                                 else "val/truth_vs_retrieved", make_grid(rows, nrow=columns), trainer.global_step)

    def _probe_on(self, pl_module) -> dict[str, Any]:
        return {k: (v.to(pl_module.device) if isinstance(v, torch.Tensor) else v) for k, v in self.probe.items()}

    def _stage2(self, pl_module):
        probe = self._probe_on(pl_module)
        experts = pl_module.expert_embeddings(probe, probe["subject"])
        images, _ = pl_module.reconstruct(experts, probe["subject"], probe["nsd_id"].cpu(), steps=self.steps,
                                          record_routing=False)
        truth = F.interpolate(self.probe["image"].float(), size=images.shape[-2:], mode="bilinear", antialias=True)
        return torch.stack([truth, images.cpu()], 1).flatten(0, 1), 2

    def _stage1(self, trainer, pl_module):
        if not self.gallery["nsd_id"]:
            return None
        probe = self._probe_on(pl_module)
        was_training = pl_module.training
        pl_module.eval()
        out, average = pl_module.encode_repeats(probe["voxels"], probe["repeat_mask"], probe["subject"])
        pl_module.train(was_training)
        ids, targets = torch.cat(self.gallery["nsd_id"]), torch.cat(self.gallery["target"])
        scores = F.normalize(average(out.clip_mean).cpu().float(), dim=-1) @ F.normalize(targets.float(), dim=-1).t()
        top = ids[scores.topk(min(self.top_k, len(ids)), dim=-1).indices]  # (n, k)
        if self._images is None:
            wanted = set(ids.tolist()) | set(self.probe["nsd_id"].tolist())
            self._images = trainer.datamodule.validation_images(probe["subject"], wanted)
        images = self._images
        tiles = []
        for row, nsd_id in enumerate(self.probe["nsd_id"].tolist()):
            for i in [nsd_id, *top[row].tolist()]:
                tiles.append(torch.from_numpy(images[i]).permute(2, 0, 1).float() / 255)
        return torch.stack(tiles), 1 + top.shape[1]
