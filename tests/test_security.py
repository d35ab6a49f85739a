"""A checkpoint is data, never code: no project file unpickles without ``weights_only=True``, and a crafted pickle
whose ``__reduce__`` payload writes a file is refused at every door (naming the option) without running."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest
import torch

from experiments.run import cli_main

REPO = Path(__file__).resolve().parent.parent
STAGE1 = [str(REPO / "configs" / "base" / "trainer.yaml"), str(REPO / "configs" / "stage1" / "tiny_synthetic.yaml")]
STAGE2 = [str(REPO / "configs" / "base" / "stage2_trainer.yaml"),
          str(REPO / "configs" / "stage2" / "tiny_synthetic.yaml")]


def _project_files() -> list[Path]:
    skip = {"tests", ".venv", "shared"}
    return [p for p in REPO.rglob("*.py")
            if not any(part in skip or part.startswith(".") for part in p.relative_to(REPO).parts)]


def _unsafe_loads(source: str) -> list[int]:
    """Lines of ``torch.load`` / ``load_from_checkpoint`` / ``pl_load`` calls without ``weights_only=True``, and of
    any ``pickle.load`` or ``allow_pickle`` load."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        if name in ("load", "loads") and owner in ("pickle", "dill", "joblib"):
            lines.append(node.lineno)  # never a pickle
        elif any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                 for k in node.keywords):
            lines.append(node.lineno)
        elif (name == "load" and owner == "torch") or name in ("load_from_checkpoint", "pl_load"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                lines.append(node.lineno)
    return lines


def test_every_project_torch_load_is_weights_only():
    files = _project_files()
    assert len(files) > 50
    offenders = {str(p.relative_to(REPO)): lines for p in files if (lines := _unsafe_loads(p.read_text()))}
    assert not offenders, f"torch.load / load_from_checkpoint without weights_only=True: {offenders}"
    # the check itself works
    assert _unsafe_loads("import torch\ntorch.load(p, weights_only=False)\nM.load_from_checkpoint(p)\n") == [2, 3]
    assert _unsafe_loads("pickle.load(f)\nnp.load(p, allow_pickle=True)\nnp.load(p)\n") == [1, 2]


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: the file appears only if the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """(a checkpoint-shaped file carrying the payload, the marker file the payload would create)."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "epoch": 0, "global_step": 0,
                "pytorch-lightning_version": "2.6.0", "x": _Payload(marker)}, path)
    return path, marker


def test_stage1_init_from_through_the_cli(crafted, small_data, targets, tmp_path):
    path, marker = crafted
    with pytest.raises(ValueError, match="model.init_from") as err:
        cli_main(["fit", *(a for c in STAGE1 for a in ("--config", c)), f"--data.init_args.data_dir={small_data}",
                  "--data.init_args.num_workers=0", "--data.init_args.val_images=8",
                  f"--data.init_args.val_cache_dir={tmp_path / 'val_cache'}",
                  f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                  "--trainer.enable_progress_bar=false", "--trainer.max_epochs=0",
                  f"--model.init_args.init_from={path}"])
    assert not marker.exists()
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_stage2_init_from(crafted, tiny_models, stage1_checkpoints):
    from tests.test_stage2_module import build

    path, marker = crafted
    with pytest.raises(ValueError, match="model.init_from"):  # configure_model loads it for a fit (build calls it)
        build(tiny_models, stage1_checkpoints, init_from=str(path))
    assert not marker.exists()


def test_stage1_encoders_of_stage2(crafted):
    from lightning_modules.stage1_conditions import FrozenStage1

    path, marker = crafted
    with pytest.raises(ValueError, match="model.image_encoder"):
        FrozenStage1(str(path), "model.image_encoder", "clip")
    assert not marker.exists()


@pytest.mark.parametrize("analysis", ["temporal", "spatial"])
def test_interpret_ckpt(analysis, crafted, tmp_path, capsys):
    from experiments._cli import run_main
    from experiments.interpret import main

    path, marker = crafted
    args = [analysis, *(a for c in STAGE2 for a in ("--config", c)), "--ckpt", str(path), "--out", str(tmp_path / "o")]
    assert run_main(main, args) == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert "--ckpt" in err and "weights_only" in err and len(err.splitlines()) == 1, err


def test_cli_ckpt_path(crafted, small_data, targets, tmp_path):
    """LightningCLI reads ``--ckpt_path`` for its hyperparameters before any Trainer exists."""
    path, marker = crafted
    with pytest.raises(ValueError, match="--ckpt_path"):
        cli_main(["test", *(a for c in STAGE1 for a in ("--config", c)), f"--data.init_args.data_dir={small_data}",
                  f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={path}"])
    assert not marker.exists()


@pytest.mark.parametrize("asked", [None, False])
def test_trainer_ckpt_path_through_the_checkpoint_io(asked, crafted):
    """``Trainer.fit(ckpt_path=...)`` loads through the CheckpointIO; even an explicit weights_only=False (Trainer's
    own argument) does not unpickle code."""
    from callbacks.atomic_checkpoint_io import AtomicCheckpointIO

    path, marker = crafted
    with pytest.raises(ValueError, match="--ckpt_path"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=asked)
    assert not marker.exists()
