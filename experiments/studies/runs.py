"""Fit-then-test runs through the real CLI (``experiments.run``), resumable: a finished run is read, not redone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TINY_STUDY = [REPO / "configs/base/trainer.yaml", REPO / "configs/stage1/tiny_synthetic.yaml",
              REPO / "configs/stage1/tiny_study.yaml"]
_WORLD1 = [REPO / "configs/base/trainer.yaml", REPO / "configs/stage1/tiny_synthetic.yaml",
           REPO / "configs/stage1/world.yaml"]
STAGE1_WORLD = {"clip_text": _WORLD1, "clip_image": [*_WORLD1, REPO / "configs/stage1/tiny_synthetic_image.yaml"]}
STAGE2_WORLD = [REPO / "configs/base/stage2_trainer.yaml", REPO / "configs/stage2/world_synthetic.yaml"]
# stage 2 of one target's branch alone, with both of its routers (the ablation rows "Image / Text only (TS)")
STAGE2_WORLD_BRANCH = {"clip_image": [*STAGE2_WORLD, REPO / "configs/stage2/ablations/image_only_ts.yaml"],
                       "clip_text": [*STAGE2_WORLD, REPO / "configs/stage2/ablations/text_only_ts.yaml"]}


# the stage-1 encoders the studies set side by side -> (model.moe.scoring, capacity factor; None keeps the
# configs', the paper's 1): the reference router, the router that keeps unit identity (and both terms), and the
# dense baseline, the reference scoring where every child takes all of its parent's units (no expert choice)
ROUTERS: dict[str, tuple[str, float | None]] = {"value": ("value", None), "unit": ("unit", None),
                                                "value_unit": ("value_unit", None), "dense": ("value", 2.0)}


def run_dir(root: Path, name: str) -> Path:
    """Where the run ``name`` logs under ``root`` (logger name ``name``, version ``run``)."""
    return Path(root) / name / "run"


def cli_args(configs: list[Path | str], root: Path, name: str | None = None) -> list[str]:
    """The config stack and the logging of a study run: ``root/<logger name>/run`` (``name`` sets the logger
    name; default: the config's)."""
    return [a for c in configs for a in ("--config", str(c))] + [
        f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
        *([f"--trainer.logger.init_args.name={name}"] if name else []), "--trainer.logger.init_args.version=run",
        "--trainer.enable_progress_bar=false"]


def fit_and_test(configs: list[Path], overrides: list[str], root: Path, name: str) -> dict[str, Any]:
    """Fit the config stack with ``overrides`` into ``root/name/run``, then test its last checkpoint. Returns
    ``{"metrics": test metrics, "parameters": parameters.json (stage 1), "dir": run dir}``; an already tested run
    of the same inputs (``step_inputs``) is read back, one of other inputs redone."""
    from experiments.run import cli_main
    from experiments.studies.step_inputs import start_step

    directory = run_dir(root, name)
    metrics_file = directory / "test_metrics.json"
    args = [*cli_args(configs, root, name), *overrides]
    start_step(directory, args)
    if not metrics_file.is_file():
        last = directory / "checkpoints" / "last.ckpt"
        if last.is_file():
            cli_main(["test", *args, f"--ckpt_path={last}"])
        else:  # test with the fit's own trainer, model and data (no second parse and build)
            cli = cli_main(["fit", *args])
            cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(last))
    parameters = directory / "parameters.json"
    return {"metrics": json.loads(metrics_file.read_text())["metrics"], "dir": str(directory),
            "parameters": json.loads(parameters.read_text()) if parameters.is_file() else None}


def world_data_overrides(data_dir: Path, subjects: list[str], targets: Path | None, target: str) -> list[str]:
    """The stage-1 data of a world fit of ``target``: the dataset, its subjects and the world CLIP's target cache
    (``targets``, default ``data_dir/targets``, where ``make demo`` leaves them)."""
    cache = Path(targets or Path(data_dir) / "targets").resolve()  # data.targets: absolute
    return [f"--data.init_args.data_dir={data_dir}", f"--data.init_args.subjects=[{', '.join(subjects)}]",
            f"--data.init_args.targets={{{target}: {cache / target}}}", f"--model.init_args.target={target}"]


def router_overrides(router: str) -> list[str]:
    """The stage-1 CLI overrides of a ``ROUTERS`` entry: the router's unit scoring and, if set, its capacity."""
    scoring, capacity = ROUTERS[router]
    return [f"--model.init_args.moe.init_args.scoring={scoring}",
            *([f"--model.init_args.moe.init_args.capacity_factor={capacity}"] if capacity else [])]


def fit_world_encoders(root: Path, data_dir: Path, subjects: list[str], targets: Path | None, world: Path,
                       router: str, targets_to_fit: tuple[str, ...] = ("clip_image", "clip_text"), seed: int = 0,
                       epochs: int | None = None, extra: list[str] | None = None) -> dict[str, Path]:
    """{target: last.ckpt}: the world's stage-1 encoders (``STAGE1_WORLD``, widths from ``world``) of each target
    with the ``ROUTERS`` entry ``router`` (``router_overrides``), fitted and tested (or read back) under
    ``root/<target>_<scoring>[_cap<c>]/run``. ``targets``: see ``world_data_overrides``; ``epochs`` None keeps
    the configs'; ``extra``: more CLI overrides."""
    from experiments.world.validate import stage1_width_overrides

    scoring, capacity = ROUTERS[router]
    out = {}
    for target in targets_to_fit:
        overrides = [*world_data_overrides(data_dir, subjects, targets, target), *router_overrides(router),
                     f"--seed_everything={seed}", *stage1_width_overrides(world),
                     *([f"--trainer.max_epochs={epochs}"] if epochs else []), *(extra or [])]
        name = f"{target}_{scoring}" + (f"_cap{capacity:g}" if capacity else "")
        result = fit_and_test(STAGE1_WORLD[target], overrides, Path(root), name)
        out[target] = Path(result["dir"]) / "checkpoints" / "last.ckpt"
    return out


def ridge_predictions(directory: Path, target: str, overrides: list[str], rank: int | None = None,
                      configs: list[Path] | None = None) -> dict[str, Any]:
    """Ridge regression of ``target`` (rank ``rank``, None: full) on the data of a stage-1 config stack
    (``configs``, default the world's, ``STAGE1_WORLD``) with ``overrides``, its test predictions written as
    target caches per subject under ``directory`` (the condition tables of a ridge row) -> {"dir", "results"}; a
    finished one of the same inputs (``step_inputs``) is read back."""
    from datamodules.common import provenance, write_json_atomic
    from experiments._config import build, load_config
    from experiments.baselines.ridge import ridge_baseline
    from experiments.studies.step_inputs import inputs_digest

    record = Path(directory).parent / f"{target}.json"
    stack = [str(c) for c in (configs or STAGE1_WORLD[target])]
    digest = inputs_digest([*stack, *overrides, f"--rank={rank}", f"--target={target}"])
    stored = json.loads(record.read_text()) if record.is_file() else {}
    if stored.get("inputs_sha256") != digest:
        config = load_config(stack, overrides)
        model = config["model"]["init_args"]
        results = ridge_baseline(build(config["data"]), target, model.get("retrieval_candidates", 300),
                                 model.get("retrieval_draws", 30), predictions_dir=Path(directory), rank=rank)
        stored = {"ridge": results, "rank": rank, "target": target, "inputs_sha256": digest,
                  "provenance": provenance()}
        write_json_atomic(record, stored)
    return {"dir": str(directory), "results": stored["ridge"]}


def test_of_saved_run(directory: Path) -> dict[str, float]:
    """Test metrics of a finished fit in ``directory`` (its ``config.yaml`` and ``checkpoints/last.ckpt``); tested
    now with the saved config when ``test_metrics.json`` is missing (e.g. a Slurm sweep that only fitted)."""
    from experiments.run import cli_main

    directory = Path(directory)
    metrics_file = directory / "test_metrics.json"
    if not metrics_file.is_file():
        config, last = directory / "config.yaml", directory / "checkpoints" / "last.ckpt"
        for path in (config, last):
            if not path.is_file():
                raise FileNotFoundError(f"{directory} is not a finished run: no {path.relative_to(directory)}")
        cli_main(["test", "--config", str(config), f"--ckpt_path={last}", "--trainer.enable_progress_bar=false"])
        if not metrics_file.is_file():
            raise FileNotFoundError(f"testing {directory} wrote no test_metrics.json there (its logger points "
                                    "elsewhere?)")
    return json.loads(metrics_file.read_text())["metrics"]
