"""Every tensor a component makes during a forward and backward is made on the module's device, and no float64
reaches a module: each component of ``lightning_modules/components/`` runs with its parameters and inputs on the
``meta`` device under a dispatch mode that records every op output not on ``meta`` (a factory call without
``device=``, ``torch.tensor`` of Python values, a numpy round trip) or in float64, with forward pre-hooks on every
submodule checking the dtypes of what it is given."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_modules.components import guidance, losses
from lightning_modules.components.brain_prompt import BrainPrompt
from lightning_modules.components.diffusion_loss import min_snr_weights, per_sample_mse, weighted_mse
from lightning_modules.components.diffusion_prior import DiffusionPrior
from lightning_modules.components.injection import ImageTokenProjection, Injection, install_processors
from lightning_modules.components.level_prior import kl_terms
from lightning_modules.components.moe_encoder import HierarchicalMoE
from lightning_modules.components.routed_branch import BranchSpec, RoutedBranch
from lightning_modules.components.routers import balance_loss, routing_entropy
from lightning_modules.components.stage1_objective import Stage1Objective
from lightning_modules.components.subject_adapters import SubjectAdapters
from lightning_modules.components.token_head import TokenHead

META = torch.device("meta")


@pytest.fixture(autouse=True)
def autocast_accepts_meta(monkeypatch):
    """``torch.autocast`` has no ``meta`` device type; the components only ever disable it (the float32 losses),
    which for meta tensors is what disabling the CPU autocast does."""

    class Autocast(torch.autocast):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", Autocast)


# torch has no meta kernel for the Dirichlet sampler behind ``torch.distributions.Beta`` (BiMixCo's betas): the
# shape rule is all this check needs
_LIBRARY = torch.library.Library("aten", "IMPL")
_LIBRARY.impl("_sample_dirichlet", lambda alpha, generator=None: torch.empty_like(alpha), "Meta")


class OffDevice(TorchDispatchMode):
    """Records every op whose output tensor is not on ``meta`` or is float64."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and (t.device != META or t.dtype == torch.float64):
                self.found.append(f"{func} -> {t.device} {t.dtype}")
        return out


def float64_inputs(modules: list[nn.Module]) -> tuple[list[str], list]:
    """Forward pre-hooks on every submodule of ``modules``: the names of those given a float64 tensor."""
    found, handles = [], []
    def hook_for(name: str):
        def hook(module, args, kwargs):
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in pytree.tree_leaves((args, kwargs))):
                found.append(name)
        return hook

    for root in modules:
        for name, module in root.named_modules():
            handles.append(module.register_forward_pre_hook(hook_for(f"{type(root).__name__}.{name}"),
                                                            with_kwargs=True))
    return found, handles


def check(modules: list[nn.Module], run) -> None:
    """``run()`` (forward + backward) with ``modules`` on meta: no tensor off meta, no float64 anywhere."""
    for m in modules:
        m.to(META)
    found, handles = float64_inputs(modules)
    mode = OffDevice()
    try:
        with mode:
            run()
    finally:
        for h in handles:
            h.remove()
    assert mode.found == [], mode.found
    assert found == [], f"float64 reached {found}"


def meta(*shape, dtype=torch.float32, grad=False) -> torch.Tensor:
    return torch.randn(*shape, device=META, dtype=dtype, requires_grad=grad)


def test_stage1_encoder_objective_and_prior_stay_on_device():
    adapters = SubjectAdapters({"subj01": 24, "subj02": 20}, 16, bottleneck=8)
    moe = HierarchicalMoE(hidden_dim=16, out_dim=8, num_levels=3, num_blocks=1, clip_hidden=8,
                          scoring="value_unit")
    prior = DiffusionPrior(embed_dim=8, num_layers=1, num_heads=2, head_dim=4, timesteps=10)
    head = TokenHead(in_dim=8, num_tokens=2, token_dim=4)
    objective = Stage1Objective(prior_inputs=("mean", "level_sums", "experts"), balance_scale=0.1,
                                mse_scale=0.1, supervise_levels=True)

    def run():
        voxels, target = meta(6, 24), F.normalize(meta(6, 8), dim=-1)
        for progress in (0.1, 0.9):  # BiMixCo, then SoftCLIP
            mixed, betas, perm = losses.mixco_inputs(voxels)
            out = moe(adapters(mixed, "subj01"))
            terms = objective.losses(out, target, (betas, perm) if objective.mixing(progress) else None, progress,
                                     prior)
            objective.add_token_term(terms, head(out.backbone_mean).flatten(1), meta(6, 8), None, progress)
            (terms["loss"] + routing_entropy(out.routing[0].probs).mean()
             + balance_loss(out.routing[0].probs)).backward()

    check([adapters, moe, prior, head], run)


@pytest.mark.parametrize("temporal", ["soft", "hard", "fixed", "uniform"])
def test_stage2_routing_injection_and_losses_stay_on_device(temporal):
    from diffusers import UNet2DConditionModel

    num_experts, embed_dim, batch = [2, 4], 16, 2
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=32).requires_grad_(False)
    processors = install_processors(unet)
    image = RoutedBranch(BranchSpec(temporal=temporal, grid=2, query_dim=8, spatial_dim=8), embed_dim, num_experts,
                         32)
    text = RoutedBranch(BranchSpec(temporal=temporal, spatial=temporal != "uniform", grid=2, query_dim=8,
                                   spatial_dim=8, pool="sum"), embed_dim, num_experts, 32)
    projection = ImageTokenProjection(embed_dim, 32, 2)
    prompt = BrainPrompt(embed_dim, 32, 12, torch.randn(32), 7)
    projected = BrainPrompt(embed_dim, 32, 12, torch.randn(32), 7, mode="projected", pooled="projected")
    alphas = torch.linspace(0.99, 0.01, 1000)

    def run():
        latents, t = meta(batch, 4, 8, 8), torch.randint(0, 1000, (batch,), device=META)
        t_emb = meta(batch, 32)
        experts = [meta(batch, e, embed_dim, grad=True) for e in num_experts]
        routed, words = image(experts, latents, t_emb, t), text(experts, latents, t_emb, t)
        injection = Injection(grid=2, latent_hw=(8, 8), ip_tokens=projection(routed.tokens))
        injection.ip_cells = torch.arange(routed.tokens.shape[1], device=META).repeat_interleave(2)
        embeds, pooled, cells = prompt(words.tokens)
        projected(words.tokens)
        if cells is not None:
            injection.text_cells, injection.text_rows = cells, torch.ones(batch, dtype=torch.bool, device=META)
        negative = guidance.unconditional(meta(7, 32), meta(12), projection, embed_dim, injection, batch, META)
        drop = torch.tensor([True, False], device=META)
        embeds, pooled = guidance.drop_conditions(drop, embeds, pooled, injection, negative)
        eps = unet(latents, t, encoder_hidden_states=embeds, cross_attention_kwargs={"injection": injection}).sample
        loss = weighted_mse(eps, latents, min_snr_weights(alphas.to(META), t, 1.5)) + per_sample_mse(eps, latents).sum()
        probs = {"image": routed.router_probs, "text": words.router_probs}
        loss = loss + sum(kl_terms(probs, t, 1.0, 0.0, None, "coarse_first", 1000).values(), eps.new_zeros(()))
        loss.backward()
        with torch.no_grad():  # classifier-free guidance's doubled batch
            guided = Injection(grid=2, latent_hw=(8, 8), ip_tokens=projection(routed.tokens),
                               text_cells=injection.text_cells, text_rows=injection.text_rows)
            embeds, pooled = guidance.guided_batch(embeds, pooled, guided, negative)
            both = unet(torch.cat([latents, latents]), torch.cat([t, t]), encoder_hidden_states=embeds,
                        cross_attention_kwargs={"injection": guided}).sample
            guidance.guide(*both.chunk(2), 5.0)

    check([unet, image, text, projection, prompt, projected], run)
    assert len(processors) == sum(name.endswith("attn2.processor") for name in unet.attn_processors)


def test_the_check_catches_a_host_tensor_and_float64():
    """The checker itself: a ``torch.arange`` without ``device=`` and a float64 input are both reported."""

    class Careless(nn.Module):
        def forward(self, x):
            return x + torch.arange(x.shape[-1]).to(x.device)

    with pytest.raises(AssertionError, match="cpu"):
        check([Careless()], lambda: Careless()(meta(2, 3)))
    lin = nn.Linear(3, 3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="float64"):
        check([lin], lambda: lin(meta(2, 3, dtype=torch.float64)))
