"""The transfer study's outputs: ``transfer_study.csv`` (one line per run), ``transfer_study.png`` (stage-1
retrieval and, through stage 2, the new subject's reconstruction scores per run with 95% intervals, ceiling and
shuffled as lines) and ``report.md`` (the table and what it says)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.common import atomic_path
from experiments.interpretability.outputs import write_csv, write_figure

LABELS = {"pixcorr": "PixCorr", "ssim": "SSIM", "clip": "CLIP 2-way", "clip_top1": "CLIP top-1",
          "clip_cosine": "CLIP cos"}
PLOTTED = ("clip", "clip_top1", "ssim")  # reconstruction panels beside the stage-1 retrieval panel
BOUNDS = ("ceiling", "shuffled")
ONLY_RECONSTRUCTED = ("ridge", *BOUNDS)  # rows with no stage-1 run of their own


def _share(row: dict[str, Any]) -> float | None:
    return row["trainable"] / row["total"] if row.get("trainable") and row.get("total") else None


def csv_rows(record: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(header, lines): every stage-1 run, then the reconstruction-only rows (ridge, ceiling, shuffled)."""
    metrics = list(record.get("reconstructions", {}).get("metrics", []))
    header = ["run", "subjects", "sessions", "trainable", "share", "fwd_top1", "bwd_top1",
              *(f"recon_{m}" for m in metrics)]
    rec = record.get("reconstructions", {}).get("rows", {})
    lines = [[r["run"], " ".join(r["subjects"]), r["sessions"], r["trainable"], _share(r), r["fwd_top1"],
              r["bwd_top1"], *(rec.get(r["run"], {}).get(m) for m in metrics)] for r in record["rows"]]
    lines += [[b, "", "", "", "", "", "", *(rec[b].get(m) for m in metrics)] for b in ONLY_RECONSTRUCTED
              if b in rec]
    return header, lines


def findings(record: dict[str, Any]) -> list[str]:
    """Plain sentences: transfer against full data, the same parameters from scratch and the shuffled control."""
    out = []
    if "ratio_to_full" in record:
        out.append(f"Stage-1 test top-1 of transfer is {record['ratio_to_full']:.2f} of the full-data run's.")
    if "gain_over_same" in record:
        out.append(f"Transfer minus the same parameters trained from scratch: {record['gain_over_same']:+.3f} "
                   "stage-1 top-1.")
    rec = record.get("reconstructions", {}).get("rows", {})
    if "transfer" in rec and "shuffled" in rec:
        t, s = rec["transfer"], rec["shuffled"]
        out.append(f"Through stage 2, transfer reconstructions reach CLIP two-way {t['clip']:.1f}% against "
                   f"{s['clip']:.1f}% for the same run fed shuffled brains"
                   + (f" and {rec['ceiling']['clip']:.1f}% for the true embeddings (ceiling)" if "ceiling" in rec
                      else "") + ".")
    for other in ("full", "same_from_scratch", "all_from_scratch", "fine_tuned", "ridge"):
        if "transfer" in rec and other in rec:
            out.append(f"transfer - {other}: CLIP two-way {rec['transfer']['clip'] - rec[other]['clip']:+.1f} "
                       f"points, SSIM {rec['transfer']['ssim'] - rec[other]['ssim']:+.3f}.")
    return out


def format_markdown(record: dict[str, Any]) -> str:
    """Runs as a Markdown table: parameters, stage-1 retrieval, reconstruction scores (two-way, top-1 in %)."""
    rec = record.get("reconstructions", {})
    metrics = list(rec.get("metrics", []))
    head = ["run", "subjects", "sessions", "trained params", "share", "stage-1 top-1",
            *(LABELS.get(m, m) for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(m: str, v: float | None) -> str:
        return "" if v is None else f"{v:.1f}%" if m in ("clip", "clip_top1") else f"{v:.3f}"
    rows = rec.get("rows", {})
    for r in record["rows"]:
        share = _share(r)
        lines.append("| " + " | ".join([r["run"], ", ".join(r["subjects"]), str(r["sessions"]),
                                        f"{r['trainable'] or 0:,d}", "" if share is None else f"{share:.2%}",
                                        f"{r['fwd_top1']:.3f}",
                                        *(cell(m, rows.get(r["run"], {}).get(m)) for m in metrics)]) + " |")
    for b in ONLY_RECONSTRUCTED:
        if b in rows:
            lines.append("| " + " | ".join([b, "", "", "", "", "", *(cell(m, rows[b].get(m)) for m in metrics)])
                         + " |")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    """Bars per run: stage-1 test top-1, then each reconstruction metric with its interval; bounds as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = record.get("reconstructions", {})
    panels = ["stage1", *([m for m in PLOTTED if m in rec.get("metrics", [])] if rec else [])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    runs = [r["run"] for r in record["rows"]]
    for ax, panel in zip(axes[0], panels):
        if panel == "stage1":
            names, values = runs, [r["fwd_top1"] for r in record["rows"]]
            ax.bar(range(len(names)), values, color="tab:blue")
            ax.set_ylabel("stage-1 test top-1")
        else:
            names = [r for r in [*runs, "ridge"] if r in rec["rows"]]
            values = [rec["rows"][r][panel] for r in names]
            intervals = rec.get("intervals", {})
            err = [[v - intervals.get(r, {}).get(panel, (v, v))[0] for r, v in zip(names, values)],
                   [intervals.get(r, {}).get(panel, (v, v))[1] - v for r, v in zip(names, values)]]
            ax.bar(range(len(names)), values, yerr=err, capsize=3, color="tab:orange")
            for b, ls in zip(BOUNDS, (":", "-.")):
                if b in rec["rows"]:
                    ax.axhline(rec["rows"][b][panel], color="grey", lw=0.9, ls=ls, label=b)
            ax.set_ylabel(f"{LABELS[panel]} (reconstructions)")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    study = record["study"]
    fig.suptitle(f"transfer to {study['new_subject']} ({study['sessions']} session(s)) from "
                 f"{', '.join(study['source_subjects'])}", fontsize=9)
    fig.tight_layout()
    write_figure(path, fig)


def write_outputs(record: dict[str, Any], out: Path) -> None:
    """``transfer_study.csv``, ``transfer_study.png`` and ``report.md`` under ``out``."""
    header, lines = csv_rows(record)
    write_csv(out / "transfer_study.csv", header, lines)
    plot(record, out / "transfer_study.png")
    study = record["study"]
    rec = record.get("reconstructions")
    text = ["# Cross-subject transfer", "",
            f"New subject {study['new_subject']} with {study['sessions']} session(s) for the one-session runs; "
            f"source {', '.join(study['source_subjects'])}; target {study['target']}; stage-1 stack "
            f"{', '.join(Path(c).name for c in study['configs'])}"
            + (f"; extra {' '.join(study['extra'])}" if study.get("extra") else "") + "."]
    if rec:
        text += ["", f"Reconstructions: one stage 2 ({', '.join(Path(c).name for c in study['stage2'])}) fitted on "
                 "the source subjects and kept fixed; each run's encoder replaces the source encoder at predict; "
                 f"{rec['num_images']} test images (chance: two-way 50%, top-1 {100 / rec['num_images']:.1f}%)."]
    text += ["", format_markdown(record), "", *findings(record), "", "![transfer](transfer_study.png)", ""]
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text("\n".join(text))
