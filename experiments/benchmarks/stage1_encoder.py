"""Stage-1 speed at paper scale on CPU: our encoder against the floor of the same GEMMs plus fused AdamW.

Encoder without the prior: V 15724 -> adapter H 4096 -> tree 2-4-8-16 with all heads, batch 24, fp32.
- train step: forward, SoftCLIP on the level-averaged clip output, backward, fused AdamW step.
- eval forward: the same forward in eval mode under ``no_grad``.
The floor runs exactly the model's matrix products (one batched matmul per layer with its shapes: forward; and
for training the two backward products, no input gradient for the first layer) and a fused AdamW step over a
flat parameter tensor of the same size: what any implementation must pay. Ratios are measured in one process.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightning_modules.components.batched_layers import BatchedLinear
from lightning_modules.components.losses import soft_clip_loss
from lightning_modules.components.moe_encoder import HierarchicalMoE
from lightning_modules.components.subject_adapters import SubjectAdapters

PAPER = dict(voxels=15724, hidden=4096, out_dim=1280, batch=24)


def build_encoder(voxels: int, hidden: int, out_dim: int, clip_hidden: int | None = None):
    adapters = SubjectAdapters({"subj01": voxels}, hidden)
    moe = HierarchicalMoE(hidden_dim=hidden, out_dim=out_dim, clip_hidden=clip_hidden)
    return adapters, moe


def gemm_shapes(adapters: SubjectAdapters, moe: HierarchicalMoE) -> list[tuple[int, int, int]]:
    """(experts, in, out) of every matrix product of the forward pass (the adapter first)."""
    shapes = [(1, m.in_features, m.out_features) for m in adapters.modules() if isinstance(m, torch.nn.Linear)]
    shapes += [(m.num_experts, m.in_features, m.out_features) for m in moe.modules() if isinstance(m, BatchedLinear)]
    return shapes


def best_time(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_ours(voxels: int, hidden: int, out_dim: int, batch: int, repeats: int, clip_hidden=None):
    torch.manual_seed(0)
    adapters, moe = build_encoder(voxels, hidden, out_dim, clip_hidden)
    params = list(adapters.parameters()) + list(moe.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    x, target = torch.randn(batch, voxels), F.normalize(torch.randn(batch, out_dim), dim=-1)

    def train_step():
        moe.train()
        out = moe(adapters(x, "subj01"))
        loss = soft_clip_loss(F.normalize(out.clip_mean, dim=-1), target, 0.02)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def eval_forward():
        moe.eval()
        with torch.no_grad():
            moe(adapters(x, "subj01"))

    train = best_time(train_step, repeats)
    evaluate = best_time(eval_forward, repeats)
    return train, evaluate, gemm_shapes(adapters, moe), sum(p.numel() for p in params)


def measure_floor(shapes: list[tuple[int, int, int]], count: int, batch: int, repeats: int):
    weights = [torch.randn(e, i, o) / i**0.5 for e, i, o in shapes]
    inputs = [torch.randn(e, batch, i) for e, i, _ in shapes]
    grads = [torch.randn(e, batch, o) for e, _, o in shapes]
    flat = torch.nn.Parameter(torch.zeros(count))
    flat.grad = torch.randn(count) * 1e-3
    optimizer = torch.optim.AdamW([flat], lr=1e-4, fused=True)

    def forward():
        for w, a in zip(weights, inputs):
            torch.bmm(a, w)

    def train_step():
        forward()
        for k, (w, a, g) in enumerate(zip(weights, inputs, grads)):
            torch.bmm(a.transpose(1, 2), g)  # weight gradient
            if k:
                torch.bmm(g, w.transpose(1, 2))  # input gradient (none for the adapter's voxel input)
        optimizer.step()

    with torch.no_grad():
        evaluate = best_time(forward, repeats)
        train = best_time(train_step, repeats)
    return train, evaluate


def run(voxels=PAPER["voxels"], hidden=PAPER["hidden"], out_dim=PAPER["out_dim"], batch=PAPER["batch"],
        repeats: int = 3, threads: int = 2, clip_hidden: int | None = None) -> dict:
    torch.set_num_threads(threads)
    ours_train, ours_eval, shapes, count = measure_ours(voxels, hidden, out_dim, batch, repeats, clip_hidden)
    gc.collect()  # the model and its optimizer state are gone before the floor allocates its own
    floor_train, floor_eval = measure_floor(shapes, count, batch, repeats)
    return {
        "benchmark": "stage1_encoder_vs_gemm_floor",
        "config": {"voxels": voxels, "hidden": hidden, "out_dim": out_dim, "tree": "2-4-8-16", "batch": batch,
                   "dtype": "float32", "threads": threads, "prior": False, "parameters": count,
                   "gemms_per_forward": len(shapes)},
        "train_step_s": round(ours_train, 3), "floor_train_step_s": round(floor_train, 3),
        "train_ratio": round(ours_train / floor_train, 3), "train_target_ratio": 1.3,
        "eval_forward_s": round(ours_eval, 3), "floor_eval_forward_s": round(floor_eval, 3),
        "eval_ratio": round(ours_eval / floor_eval, 3), "eval_target_ratio": 1.5,
        "reference_code_here_s": {"train_step": 6.3, "eval_forward": 4.3},
    }
