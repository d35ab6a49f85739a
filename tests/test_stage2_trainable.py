"""What stage 2 trains: one definition for the module, the parameter report and the checkpoint, checked on a module
that loads IP-Adapter weights (projection and IP key / value frozen as loaded), and training that lowers the loss."""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from lightning_modules.components.injection import ip_adapter_state_dict
from tests.test_stage2_module import IMAGE, TEXT, build


def _ip_adapter_file(tiny_models, stage1_checkpoints, path):
    """A small IP-Adapter file in the public layout, from a module's own (random) projection and key / value."""
    donor = build(tiny_models, stage1_checkpoints, text_branch=None)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in [*donor.image_projection.parameters(), *(q for m in donor.ip_processors for q in m.parameters())]:
            p.normal_()
    torch.save(ip_adapter_state_dict(donor.image_projection, donor.ip_processors), path)
    return path


def _step(model, steps: int = 1, seed: int = 0) -> list[float]:
    """``steps`` AdamW steps of the module's own optimiser on one fixed batch (fixed timesteps and noise); the loss
    before each step."""
    g = torch.Generator().manual_seed(seed)
    voxels = torch.randn(4, 300, generator=g)
    latents = torch.randn(4, 4, 4, 4, generator=g)
    noise = torch.randn(4, 4, 4, 4, generator=g)
    t = torch.tensor([100, 300, 600, 900])
    experts = model.expert_embeddings({"voxels": voxels}, "subj01")
    optimizer = model.configure_optimizers()["optimizer"]
    model.train()
    losses = []
    for _ in range(steps):
        loss, _, _ = model.diffusion_loss(latents, experts, t, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_loaded_ip_adapter_projection_and_key_value_stay_frozen_and_the_report_counts_what_trains(
        tiny_models, stage1_checkpoints, tmp_path):
    from experiments.params import stage2_rows

    weights = _ip_adapter_file(tiny_models, stage1_checkpoints, tmp_path / "ip-adapter.bin")
    model = build(tiny_models, stage1_checkpoints, ip_adapter_weights=str(weights))
    loaded = torch.load(weights, weights_only=True)
    projection = dict(model.image_projection.named_parameters())
    assert not any(p.requires_grad for p in projection.values())
    assert not any(p.requires_grad for proc in model.ip_processors for p in proc.parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _step(model)
    after = model.state_dict()
    for name, value in loaded["image_proj"].items():  # as loaded, and unchanged by the step
        assert torch.equal(after[f"image_projection.{name}"], value), name
    assert all(torch.equal(after[k], before[k]) for k in after if "to_k_ip" in k or "to_v_ip" in k)
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed and all("lora_" in k or "_router." in k for k in changed), changed  # the step did train
    # the checkpoint's stored parts: what is trained (the loaded IP-Adapter comes from its file again)
    assert not any(k.startswith("image_projection.") or "_ip." in k for k in model.trained_state_dict())

    own = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.parameter_counts()["trainable"] == own
    init_args = dict(sdxl_dir=str(tiny_models), image_branch=asdict(IMAGE), text_branch=asdict(TEXT),
                     ip_adapter_weights=str(weights), lora_rank=4, lora_alpha=4)
    rows, _ = stage2_rows(init_args, embed_dim=model.image_encoder.embed_dim,
                          num_experts=tuple(model.image_encoder.num_experts))
    report = {r["key"]: r for r in rows}
    assert report["total"]["trainable"] == own
    assert report["image_projection"]["trainable"] == report["ip_kv"]["trainable"] == 0
    # fine-tuning the IP-Adapter trains both halves, in the module and in the report alike
    tuned = build(tiny_models, stage1_checkpoints, ip_adapter_weights=str(weights), ip_adapter_trainable=True)
    rows, _ = stage2_rows({**init_args, "ip_adapter_trainable": True}, embed_dim=model.image_encoder.embed_dim,
                          num_experts=tuple(model.image_encoder.num_experts))
    assert {r["key"]: r for r in rows}["total"]["trainable"] == sum(
        p.numel() for p in tuned.parameters() if p.requires_grad) > own


def test_training_lowers_the_diffusion_loss_on_a_fixed_batch_against_a_frozen_control(tiny_models,
                                                                                       stage1_checkpoints):
    """What the step test in test_stage2_module cannot show (every trained tensor changed, which any non-zero
    gradient does): the trained parts move the loss down. Eight steps on one fixed batch (fixed timesteps and noise)
    must lower it by a tenth, while the same steps with nothing trainable (lr 0, the control) leave it as it was."""
    torch.manual_seed(0)
    model = build(tiny_models, stage1_checkpoints, lr=1e-2)
    losses = _step(model, steps=9)
    assert losses[-1] < 0.9 * losses[0], losses
    torch.manual_seed(0)
    control = build(tiny_models, stage1_checkpoints, lr=0.0)
    control_losses = _step(control, steps=9)
    assert abs(control_losses[-1] - control_losses[0]) < 1e-6 * control_losses[0], control_losses
    assert control_losses[0] == losses[0]  # the same module and batch: only the training differs


def test_a_bfloat16_rank_holds_loaded_ip_adapter_weights_in_bfloat16_and_trains(tiny_models, stage1_checkpoints,
                                                                                  tmp_path):
    """``frozen_dtype: bfloat16`` (the paper config): the frozen UNet and the loaded, frozen IP-Adapter weights are
    held in bfloat16 (half the host memory), the trained parts in float32, and a step changes exactly the LoRA and
    the routers."""
    weights = _ip_adapter_file(tiny_models, stage1_checkpoints, tmp_path / "ip-adapter.bin")
    model = build(tiny_models, stage1_checkpoints, ip_adapter_weights=str(weights), frozen_dtype="bfloat16")
    loaded = torch.load(weights, weights_only=True)
    assert model.unet.dtype == torch.bfloat16
    held = [*model.image_projection.parameters(), *(p for m in model.ip_processors for p in m.parameters())]
    assert held and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in held)
    assert torch.equal(model.image_projection.proj.weight, loaded["image_proj"]["proj.weight"].bfloat16())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses = _step(model)
    assert all(map(math.isfinite, losses))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("lora_" in k or "_router." in k for k in changed), changed
