"""Parameter counts per module of a model, with trainable shares (works on the ``meta`` device)."""

from __future__ import annotations

from torch import nn

from lightning_modules.run_records import count_parameters


def count(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts of ``module``."""
    return count_parameters(module.parameters())


def parameter_table(model: nn.Module, depth: int = 2) -> list[dict]:
    """Rows ``{name, params, trainable}`` for the children of ``model`` down to ``depth`` levels, then a total."""
    rows = []

    def visit(module: nn.Module, prefix: str, level: int) -> None:
        for name, child in module.named_children():
            total, trainable = count(child)
            if total == 0:
                continue
            full = f"{prefix}{name}"
            rows.append({"name": full, "params": total, "trainable": trainable, "depth": level})
            if level < depth:
                visit(child, f"{full}.", level + 1)

    visit(model, "", 1)
    total, trainable = count(model)
    rows.append({"name": "total", "params": total, "trainable": trainable, "depth": 0})
    return rows


def format_table(rows: list[dict]) -> str:
    total = rows[-1]["params"] or 1
    lines = [f"{'module':52} {'params':>14} {'share':>7} {'trainable':>14}"]
    for r in rows:
        name = ("  " * max(r["depth"] - 1, 0)) + r["name"]
        lines.append(f"{name:52} {r['params']:14,d} {r['params'] / total:7.2%} {r['trainable']:14,d}")
    return "\n".join(lines)
