"""The bottleneck study's outputs: one summary row per (decoder, width), the drop from the unbottlenecked
reference to the narrowest width, the verdict on the paper's claim, and the CSV / PNG / report.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.common import atomic_path
from experiments.interpretability.outputs import write_csv, write_figure

DECODERS = ("brain", "ridge")
LABELS = {"pixcorr": "PixCorr", "ssim": "SSIM", "clip": "CLIP 2-way", "clip_top1": "CLIP top-1",
          "clip_cosine": "CLIP cos"}
JUDGED = ("clip_cosine", "clip", "ssim")  # the paper's bottleneck plots: CLIP cosine; then two-way and SSIM
DECODER_LABELS = {"brain": "brain (MoE, value router)", "brain_unit": "brain (MoE, unit router)",
                  "brain_dense": "brain (dense, capacity 2)", "ridge": "ridge, rank b (MindEye2-style)"}
BASELINES = ("brain_dense", "ridge")  # not MoRE-Brain: the paper's claim is judged for the other decoders


def _mean_values(record: dict[str, Any], row: str) -> dict[str, float]:
    return record["rows"][row]["mean"]["values"]


def decoders(record: dict[str, Any]) -> list[str]:
    """The record's decoders: the brain rows per router scoring, then the ridge."""
    return list(record.get("decoders", DECODERS))


def _stage1_key(decoder: str, target: str, width: str) -> str:
    scoring = decoder.removeprefix("brain").removeprefix("_")
    return f"{target}_{width}" + (f"_{scoring}" if scoring else "")


def summarise(record: dict[str, Any]) -> dict[str, Any]:
    """{"table": [{decoder, width, metrics..., stage1 / ridge retrieval}], "bounds": ceiling and shuffled values,
    "drops": per decoder and judged metric, reference minus narrowest width (and as a share of the reference's
    margin over shuffled), "verdict": does each brain decoder lose more than the ridge?}"""
    widths, metrics = record["widths"], record["metrics"]
    targets = record.get("targets") or sorted({k.rsplit("_", 1)[0] for k in record["stage1"]})
    table = []
    for decoder in decoders(record):
        for w in widths:
            values = _mean_values(record, f"{decoder}_{w}")
            row = {"decoder": decoder, "width": w, **{m: values[m] for m in metrics}}
            for t in targets:
                if decoder != "ridge":
                    row[f"{t}_stage1_top1"] = record["stage1"][_stage1_key(decoder, t, w)]["metrics"]["fwd_top1"]
                else:
                    per = record["ridge"][f"{t}_{w}"]["results"]
                    row[f"{t}_stage1_top1"] = sum(r["fwd_top1"] for r in per.values()) / len(per)
            table.append(row)
    bounds = {b: _mean_values(record, b) for b in ("ceiling", "shuffled")}
    narrow, reference = widths[0], widths[-1]
    drops: dict[str, dict[str, dict[str, float]]] = {}
    for decoder in decoders(record):
        ref, low = _mean_values(record, f"{decoder}_{reference}"), _mean_values(record, f"{decoder}_{narrow}")
        drops[decoder] = {}
        for m in JUDGED:
            margin = ref[m] - bounds["shuffled"][m]
            drops[decoder][m] = {"reference": ref[m], "narrowest": low[m], "drop": ref[m] - low[m],
                                 "share_of_margin": (ref[m] - low[m]) / margin if abs(margin) > 1e-9 else None}
    brains = [d for d in decoders(record) if d not in BASELINES]
    more = {d: {m: drops[d][m]["drop"] > drops["ridge"][m]["drop"] for m in JUDGED} for d in brains}

    def lost(decoder: str) -> str:
        return ", ".join(f"{LABELS[m]} {drops[decoder][m]['drop']:+.3g}" for m in JUDGED)

    def holds(flags: dict[str, bool]) -> str:
        return ("holds" if all(flags.values()) else "does not hold" if not any(flags.values())
                else "holds on " + ", ".join(LABELS[m] for m, v in flags.items() if v) + " only")
    verdict = (f"From {reference} to width {narrow[1:]}: "
               + "; ".join(f"{DECODER_LABELS.get(d, d)} loses {lost(d)}" for d in decoders(record))
               + ". The paper's claim (MoRE-Brain degrades most) "
               + "; ".join(f"{holds(more[d])} for {DECODER_LABELS.get(d, d)}" for d in brains)
               + ". CLIP cosine at the narrowest width: "
               + ", ".join(f"{DECODER_LABELS.get(d, d)} {drops[d]['clip_cosine']['narrowest']:.3f}"
                           for d in decoders(record))
               + f", shuffled {bounds['shuffled']['clip_cosine']:.3f}, ceiling "
               f"{bounds['ceiling']['clip_cosine']:.3f}.")
    return {"table": table, "bounds": bounds, "drops": drops, "brain_drops_more": more, "verdict": verdict}


def format_table(summary: dict[str, Any], metrics: list[str]) -> str:
    """The summary as a Markdown table (two-way and top-1 in %), ceiling and shuffled last."""
    extra = [k for k in summary["table"][0] if k.endswith("_stage1_top1")]
    head = ["decoder", "width", *(LABELS[m] for m in metrics), *(f"{k[:-len('_stage1_top1')]} top-1 (embedding)"
                                                                  for k in extra)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(m: str, v: float) -> str:
        return f"{v:.1f}%" if m in ("clip", "clip_top1") else f"{v:.3f}"
    for r in summary["table"]:
        lines.append("| " + " | ".join([DECODER_LABELS.get(r["decoder"], r["decoder"]), r["width"], *(cell(m, r[m]) for m in metrics),
                                        *(f"{r[k]:.3f}" for k in extra)]) + " |")
    for bound, values in summary["bounds"].items():
        lines.append("| " + " | ".join([bound, "", *(cell(m, values[m]) for m in metrics), *("" for _ in extra)])
                     + " |")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    """SSIM, CLIP two-way and CLIP cosine against width, brain and ridge, ceiling and shuffled as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, widths = record["summary"], record["widths"]
    x = list(range(len(widths)))
    fig, axes = plt.subplots(1, len(JUDGED), figsize=(4 * len(JUDGED), 3.4))
    for ax, m in zip(axes, ("ssim", "clip", "clip_cosine")):
        for decoder, style in zip(decoders(record), ("o-", "^-", "d:", "s--", "v-.")):
            rows = {r["width"]: r for r in summary["table"] if r["decoder"] == decoder}
            ax.plot(x, [rows[w][m] for w in widths], style, label=DECODER_LABELS.get(decoder, decoder))
        for bound, ls in (("ceiling", ":"), ("shuffled", "-.")):
            ax.axhline(summary["bounds"][bound][m], color="grey", lw=0.9, ls=ls, label=bound)
        ax.set_xticks(x, [w.removeprefix("b") for w in widths])
        ax.set_xlabel("bottleneck width b")
        ax.set_ylabel(LABELS[m])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("reconstructions through one fixed stage 2 against the information that reaches it", fontsize=9)
    fig.tight_layout()
    write_figure(path, fig)


def write_outputs(record: dict[str, Any], results: dict[str, list], out: Path) -> None:
    """``bottleneck_study.csv`` (one line per row and subject, mean last), ``bottleneck_study.png`` and
    ``report.md``."""
    metrics = record["metrics"]
    lines = [[row, r.subject, *(r.values[m] for m in metrics)] for row, per in results.items() for r in per]
    write_csv(out / "bottleneck_study.csv", ["row", "subject", *metrics], lines)
    plot(record, out / "bottleneck_study.png")
    s = record["summary"]
    text = ["# Bottleneck through stage 2", "",
            f"Widths {', '.join(record['widths'])}; branches {', '.join(record['branches'])}; subjects "
            f"{', '.join(record['study']['subjects'])}. One stage 2, fitted on the unbottlenecked encoders, turns "
            "every row's embeddings into images; the ridge rows are reduced-rank ridge of rank b.", "",
            format_table(s, metrics), "", s["verdict"], "", "![bottleneck](bottleneck_study.png)", ""]
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text("\n".join(text))
