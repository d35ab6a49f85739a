"""A minimal LightningModule that records what every rank's loaders deliver, for exact DDP batch-count tests.

Run as a script (Lightning's DDP re-launches it for rank 1):
    python -m tests.helpers.counting --data DIR --out OUT [--devices 2] [--num-workers 2] [--sessions 1] ...
Each rank writes OUT/rank{r}.json with per-epoch training batches (subject, worker, nsd_ids) and the validation
nsd_ids with their ``valid`` flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch

from datamodules import NSDDataModule


class CountingModule(L.LightningModule):
    def __init__(self, out: str):
        super().__init__()
        self.out = Path(out)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.record: dict = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        entry = {"epoch": self.current_epoch, "batch_idx": batch_idx,
                 "subjects": {s: {"worker": b["worker"], "stream_epoch": b["epoch"], "n": len(b["nsd_id"]),
                                  "voxels": list(b["voxels"].shape), "nsd_id": b["nsd_id"].tolist(),
                                  "trials": list(zip(b["session"].tolist(), b["trial"].tolist()))}
                              for s, b in batch.items()}}
        self.record["train"].append(entry)
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.record["val"].append({"epoch": self.current_epoch, "subject": batch["subject"],
                                   "nsd_id": batch["nsd_id"].tolist(), "valid": batch["valid"].tolist(),
                                   "voxels": list(batch["voxels"].shape)})
        metric = batch["voxels"][batch["valid"]].mean() if batch["valid"].any() else batch["voxels"].sum() * 0
        self.log("val/mean_voxel", metric, sync_dist=True, add_dataloader_idx=True)

    def on_fit_end(self):
        self.out.mkdir(parents=True, exist_ok=True)
        info = {"rank": self.global_rank, "world_size": self.trainer.world_size, **self.record}
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(info))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=None)
    parser.add_argument("--subjects", nargs="+", default=["subj01"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--val-images", type=int, default=13)
    parser.add_argument("--samples-per-epoch", type=int, default=None)
    parser.add_argument("--train-sampling", default="resampled")
    args = parser.parse_args(argv)
    L.seed_everything(0)
    dm = NSDDataModule(args.data, subjects=args.subjects, num_sessions=args.sessions, batch_size=args.batch_size,
                       eval_batch_size=4, num_workers=args.num_workers, val_images=args.val_images,
                       samples_per_epoch=args.samples_per_epoch, val_cache_dir=str(Path(args.out) / "val_cache"),
                       train_sampling=args.train_sampling)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", max_epochs=args.epochs,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(CountingModule(args.out), datamodule=dm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
