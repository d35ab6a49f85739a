"""Compare two worlds tensor by tensor: the max abs difference per part (0.0 = bit-identical)."""

from __future__ import annotations

from pathlib import Path

from experiments.world.build import ENTRIES


def compare_worlds(a: str | Path, b: str | Path) -> dict[str, float]:
    """{part: max abs difference over every tensor of its safetensors files} (inf when the tensors differ in
    names or shapes)."""
    from safetensors.torch import load_file

    a, b = Path(a), Path(b)
    result = {}
    for part, entries in ENTRIES.items():
        worst = 0.0
        for entry in entries:
            files = [entry] if entry.endswith(".safetensors") else \
                sorted(str(p.relative_to(a)) for p in (a / entry).rglob("*.safetensors")) if (a / entry).is_dir() else []
            for name in files:
                ta, tb = load_file(str(a / name)), load_file(str(b / name)) if (b / name).is_file() else {}
                if ta.keys() != tb.keys():
                    worst = float("inf")
                    continue
                for k in ta:
                    if ta[k].shape != tb[k].shape:
                        worst = float("inf")
                    else:
                        worst = max(worst, float((ta[k].float() - tb[k].float()).abs().max()))
        result[part] = worst
    return result
