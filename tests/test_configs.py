"""Every config in configs/ parses through the real CLI, composed the way the README says to use it."""

from __future__ import annotations

from pathlib import Path

from experiments.run import cli_main

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def stacks() -> list[list[Path]]:
    """Config stacks: stage 1 on its base (overlays on the config they modify: the tiny image and study configs on
    the tiny text one, the world overlay on the tiny text one, bottleneck and transfer on the paper-scale image
    config), stage 2 on its base, every
    ablation and transfer config on top of the paper-scale stage-2 config."""
    out = []
    tiny, paper = CONFIGS / "stage1/tiny_synthetic.yaml", CONFIGS / "stage1/image_nsd.yaml"
    below = {"tiny_synthetic_image.yaml": [tiny], "tiny_study.yaml": [tiny], "bottleneck.yaml": [paper],
             "interpret_positive_control.yaml": [tiny], "world.yaml": [tiny],
             "world_unit.yaml": [tiny, CONFIGS / "stage1/world.yaml"]}
    for config in sorted((CONFIGS / "stage1").glob("*.yaml")):
        out.append([CONFIGS / "base/trainer.yaml", *below.get(config.name, []), config])
    for config in sorted((CONFIGS / "stage1/transfer").glob("*.yaml")):
        out.append([CONFIGS / "base/trainer.yaml", paper, config])
    for config in sorted((CONFIGS / "stage2").glob("*.yaml")):
        out.append([CONFIGS / "base/stage2_trainer.yaml", config])
    for config in sorted((CONFIGS / "stage2/transfer").glob("*.yaml")):
        out.append([CONFIGS / "base/stage2_trainer.yaml", CONFIGS / "stage2/sdxl_nsd.yaml", config])
    for config in sorted((CONFIGS / "stage2/ablations").glob("*.yaml")):
        out.append([CONFIGS / "base/stage2_trainer.yaml", CONFIGS / "stage2/sdxl_nsd.yaml", config])
    return out


def parse(stack: list[Path]):
    args = [a for c in stack for a in ("--config", str(c))]
    return cli_main(args, run=False, instantiate=False).config


def test_every_config_parses_through_the_real_cli():
    covered = {stack[-1] for stack in stacks()} | set((CONFIGS / "base").glob("*.yaml"))
    assert covered == set(CONFIGS.rglob("*.yaml"))
    for stack in stacks():
        config = parse(stack)
        stage = "BrainEncoderModule" if "stage1" in str(stack[-1]) else "RoutedDiffusionModule"
        assert config["model"]["class_path"].endswith(stage), stack


def _pick(branch):
    return None if branch is None else (branch.temporal, branch.spatial, branch.source, branch.query_dim)


def test_ablation_rows_set_the_routers_they_name():
    def branches(name: str):
        args = parse([CONFIGS / "base/stage2_trainer.yaml", CONFIGS / "stage2/sdxl_nsd.yaml",
                      CONFIGS / f"stage2/ablations/{name}.yaml"])["model"]["init_args"]
        return _pick(args.image_branch), _pick(args.text_branch)

    assert branches("text_image_ts") == (("soft", True, "prior", 768), ("soft", True, "prior", 768))
    assert branches("text_only") == (None, ("uniform", False, "prior", 768))
    assert branches("text_only_ts") == (None, ("soft", True, "prior", 768))
    assert branches("image_only") == (("uniform", False, "prior", 768), None)
    assert branches("image_only_ts") == (("soft", True, "prior", 768), None)
    assert branches("text_image_s_only") == (("uniform", True, "prior", 768),) * 2
    for variant in ("fixed", "hard", "soft"):
        assert branches(f"text_image_t_{variant}") == ((variant, False, "prior", 768),) * 2


def test_transfer_configs_set_what_they_name():
    def model(stack):
        return parse(stack)["model"]["init_args"]

    router_only = model([CONFIGS / "base/trainer.yaml", CONFIGS / "stage1/image_nsd.yaml",
                         CONFIGS / "stage1/transfer/router_only.yaml"])
    assert router_only.trainable == ["new_adapters", "routers"] and router_only.new_subjects == ["subj02"]
    finetune = parse([CONFIGS / "base/trainer.yaml", CONFIGS / "stage1/image_nsd.yaml",
                      CONFIGS / "stage1/transfer/mindeye2_finetune.yaml"])
    assert finetune["data"]["init_args"]["num_sessions"] == 1 and "subj01" not in parse(
        [CONFIGS / "base/trainer.yaml", CONFIGS / "stage1/image_nsd.yaml",
         CONFIGS / "stage1/transfer/mindeye2_pretrain.yaml"])["data"]["init_args"]["subjects"]
    assert set(finetune["model"]["init_args"]["trainable"]) >= {"new_adapters", "experts", "heads", "prior"}
    stage2 = model([CONFIGS / "base/stage2_trainer.yaml", CONFIGS / "stage2/sdxl_nsd.yaml",
                    CONFIGS / "stage2/transfer/routers_only.yaml"])
    assert stage2.trainable == ["routers"] and stage2.init_from


def test_the_world_configs_keep_the_papers_capacity_and_route_every_expert_through_the_prior():
    """The world's stage 1 keeps the paper's capacity_factor 1 with the reference router (the studies' ``value``
    encoders), the demo's overlay the unit-identity router; both supervise every level (stage 2 routes them)."""
    stack = [CONFIGS / "base/trainer.yaml", CONFIGS / "stage1/tiny_synthetic.yaml", CONFIGS / "stage1/world.yaml"]
    stage1 = parse([*stack, CONFIGS / "stage1/tiny_synthetic_image.yaml"])["model"]["init_args"]
    assert stage1.moe.init_args.capacity_factor == 1.0 and stage1.prior_inputs == ["mean", "experts"]
    assert stage1.moe.init_args.scoring == "value" and stage1.supervise_levels
    unit = parse([*stack, CONFIGS / "stage1/world_unit.yaml", CONFIGS / "stage1/tiny_synthetic_image.yaml"])
    assert unit["model"]["init_args"].moe.init_args.scoring == "unit"
    assert unit["model"]["init_args"].moe.init_args.capacity_factor == 1.0
    assert stage1.target == "clip_image" and stage1.moe.init_args.out_dim == stage1.prior.init_args.embed_dim
    stage2 = parse([CONFIGS / "base/stage2_trainer.yaml", CONFIGS / "stage2/world_synthetic.yaml"])["model"]
    args = stage2["init_args"]
    assert args.image_branch.source == "prior" and args.text_branch.source == "prior"
    assert args.ip_adapter_weights.endswith("ip_adapter.safetensors") and args.condition_dropout > 0
