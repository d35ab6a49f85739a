"""Stage-2 building blocks against independent computations: KL target, routers, regional injection, prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_modules.components.brain_prompt import BrainPrompt
from lightning_modules.components.injection import (
    ImageTokenProjection,
    Injection,
    RegionalIPAttnProcessor,
    install_processors,
    ip_adapter_state_dict,
    load_ip_adapter_weights,
)
from lightning_modules.components.level_prior import gaussian_level_target, level_kl
from lightning_modules.components.moe_encoder import HierarchicalMoE
from lightning_modules.components.routed_branch import BranchSpec, RoutedBranch
from lightning_modules.components.spatial_router import SpatialRouter
from lightning_modules.components.temporal_router import TemporalRouter

EXPERTS = [2, 4, 8, 16]


def numpy_target(t: float, levels: int, sigma: float, t_lo: float, t_hi: float, direction: str) -> np.ndarray:
    if direction == "paper":
        c = levels * t / 1000.0 - 1.0
    else:
        c = (levels - 1) * (1.0 - min(max((t - t_lo) / (t_hi - t_lo), 0.0), 1.0))
    p = np.array([math.exp(-((lvl - c) ** 2) / (2 * sigma**2)) for lvl in range(levels)])
    return p / p.sum()


@pytest.mark.parametrize("direction", ["coarse_first", "paper"])
def test_kl_term_equals_numpy(direction):
    rng = np.random.default_rng(0)
    t = np.array([0, 120, 499, 750, 999])
    r = rng.dirichlet(np.ones(4), size=len(t))
    expected = np.mean([np.sum(r[i] * (np.log(r[i]) - np.log(numpy_target(t[i], 4, 0.8, 100, 900, direction))))
                        for i in range(len(t))])
    target = gaussian_level_target(torch.tensor(t), 4, sigma=0.8, t_lo=100, t_hi=900, direction=direction)
    got = level_kl(torch.tensor(r, dtype=torch.float32), target)
    assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_kl_target_sends_high_noise_to_coarse_levels_and_paper_direction_reverses_it():
    t = torch.tensor([999, 0])
    coarse_first = gaussian_level_target(t, 4)
    assert coarse_first[0].argmax() == 0 and coarse_first[1].argmax() == 3
    paper = gaussian_level_target(t, 4, direction="paper")
    assert paper[0].argmax() == 3 and paper[1].argmax() == 0


def test_temporal_router_modes():
    t_emb, t = torch.randn(5, 32), torch.tensor([999, 760, 500, 240, 0])
    fixed, probs = TemporalRouter(32, 4, mode="fixed")(t_emb, t)
    assert probs is None and fixed.argmax(1).tolist() == [0, 0, 2, 3, 3]  # floor((1 - t/T) * L)
    uniform, _ = TemporalRouter(32, 4, mode="uniform")(t_emb, t)
    assert torch.allclose(uniform, torch.full((5, 4), 0.25))
    assert not list(TemporalRouter(32, mode="fixed").parameters())
    hard_router = TemporalRouter(32, 4, query_dim=16, mode="hard")
    hard, probs = hard_router(t_emb, t)
    assert torch.allclose(hard.detach(), torch.nn.functional.one_hot(probs.argmax(1), 4).float(), atol=1e-6)
    (hard * torch.arange(4.0)).sum().backward()  # straight-through: the softmax's gradient reaches the router
    assert hard_router.query.weight.grad.abs().sum() > 0


def test_spatial_router_is_resolution_independent_and_normalised():
    router = SpatialRouter(4, 32, EXPERTS, grid=4, dim=16)
    experts = [torch.randn(3, e, 32) for e in EXPERTS]
    shapes = []
    for size in (16, 28):
        tokens, maps = router(torch.randn(3, 4, size, size), experts)
        shapes.append((tuple(tokens.shape), [tuple(m.shape) for m in maps]))
        for m in maps:
            assert torch.allclose(m.sum(-1), torch.ones(3, 16), atol=1e-6)
    assert shapes[0] == shapes[1] == ((3, 4, 16, 32), [(3, 16, e) for e in EXPERTS])


def test_uniform_time_routing_without_spatial_router_equals_stage1_level_average():
    torch.manual_seed(0)
    moe = HierarchicalMoE(hidden_dim=64, out_dim=32, num_blocks=1, clip_hidden=32).eval()
    out = moe(torch.randn(5, 64))
    branch = RoutedBranch(BranchSpec(temporal="uniform", spatial=False, pool="sum"), 32, EXPERTS, time_dim=16)
    routed = branch(out.clip, torch.randn(5, 4, 8, 8), torch.randn(5, 16), torch.randint(0, 1000, (5,)))
    assert routed.tokens.shape == (5, 1, 32)
    assert torch.allclose(routed.tokens[:, 0], out.clip_mean, atol=1e-6)


def test_spatial_router_with_uniform_weights_gives_the_level_sum():
    router = SpatialRouter(4, 32, EXPERTS, grid=2, dim=8, pool="sum")
    for p in router.parameters():
        torch.nn.init.zeros_(p)  # all scores 0 -> uniform weights
    experts = [torch.randn(2, e, 32) for e in EXPERTS]
    tokens, _ = router(torch.randn(2, 4, 8, 8), experts)
    for level, x in enumerate(experts):
        assert torch.allclose(tokens[:, level], x.sum(1, keepdim=True).expand(-1, 4, -1), atol=1e-5)


class _Attn(torch.nn.Module):
    """The parts of diffusers' ``Attention`` a processor touches."""

    def __init__(self, dim: int, cross: int, heads: int = 2):
        super().__init__()
        self.heads, self.spatial_norm, self.group_norm, self.norm_cross = heads, None, None, False
        self.norm_q = self.norm_k = None
        self.residual_connection, self.rescale_output_factor = False, 1.0
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim), torch.nn.Linear(cross, dim),
                                           torch.nn.Linear(cross, dim))
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim), torch.nn.Identity()])


def test_regional_tokens_act_only_inside_their_cell():
    torch.manual_seed(0)
    attn, proc = _Attn(16, 8), RegionalIPAttnProcessor(16, 8)
    hidden, text = torch.randn(1, 8 * 8, 16), torch.randn(1, 5, 8)
    tokens = torch.randn(1, 4 * 2, 8)  # 4 cells (grid 2) x 2 tokens
    cells = torch.arange(4).repeat_interleave(2)
    base = proc(attn, hidden, text, injection=Injection(tokens, 1.0, cells, grid=2, latent_hw=(8, 8)))
    changed = tokens.clone()
    changed[:, 2:4] += 1.0  # the tokens of cell 1 (top right)
    after = proc(attn, hidden, text, injection=Injection(changed, 1.0, cells, grid=2, latent_hw=(8, 8)))
    moved = (after - base).abs().sum(-1).reshape(8, 8) > 1e-6
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, 4:] = True
    assert torch.equal(moved, expected)
    # the cell map follows the attention resolution (a 4 x 4 layer of the same 8 x 8 latent)
    small = Injection(tokens, 1.0, cells, grid=2, latent_hw=(8, 8)).cell_map(16, torch.device("cpu"))
    assert small.reshape(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_regional_prompt_applies_only_to_flagged_rows():
    torch.manual_seed(1)
    attn, proc = _Attn(16, 8), RegionalIPAttnProcessor(16, 8)
    hidden, text = torch.randn(2, 16, 16), torch.randn(2, 5, 8)
    text_cells = torch.tensor([-1, 0, 1, 2, 3])
    injection = Injection(grid=2, latent_hw=(4, 4), text_cells=text_cells, text_rows=torch.tensor([False, True]))
    out = proc(attn, hidden, text, injection=injection)
    plain = proc(attn, hidden, text)
    assert torch.allclose(out[0], plain[0], atol=1e-6)  # unconditional row: the whole prompt
    assert not torch.allclose(out[1], plain[1], atol=1e-4)
    # a position of cell 0 sees SOS and token 1 only: changing token 3 (cell 2) leaves it alone
    changed = text.clone()
    changed[1, 3] += 1.0
    out2 = proc(attn, hidden, changed, injection=injection)
    cell0 = Injection(grid=2, latent_hw=(4, 4)).cell_map(16, torch.device("cpu")) == 0
    assert torch.allclose(out2[1, cell0], out[1, cell0], atol=1e-6)
    assert not torch.allclose(out2[1, ~cell0], out[1, ~cell0], atol=1e-6)



def test_injection_masks_are_built_once_per_size_and_follow_edits():
    """The cell masks are memoised per attention size; guidance's edits of ``text_rows`` still apply, and new
    cells or geometry drop the memo."""
    injection = Injection(grid=2, latent_hw=(4, 4), ip_cells=torch.arange(4), text_cells=torch.tensor([-1, 0, 3]),
                          text_rows=torch.tensor([True, True]))
    cpu = torch.device("cpu")
    first = injection.ip_mask(16, cpu)
    assert injection.ip_mask(16, cpu) is first and injection.ip_mask(4, cpu).shape == (4, 4)
    assert injection.text_mask(16, cpu)[0, 0, :, 2].sum() == 4  # token of cell 3: its 4 positions
    injection.text_rows = torch.tensor([False, True])  # the unconditional half sees the whole prompt
    assert bool(injection.text_mask(16, cpu)[0].all()) and not bool(injection.text_mask(16, cpu)[1].all())
    injection.ip_cells = torch.tensor([3, 3, 3, 3])
    assert injection.ip_mask(16, cpu)[:, 0].sum() == 4 and injection.ip_mask(16, cpu) is not first
    injection.grid = 1
    assert bool(injection.ip_mask(16, cpu).eq(False).all())  # one cell (0): no position may see cell 3

def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
        cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 48, norm_num_groups=32).eval()


def _unet_inputs(batch: int = 2, size: int = 16):
    torch.manual_seed(2)
    return dict(sample=torch.randn(batch, 4, size, size), timestep=torch.tensor([10, 700][:batch]),
                encoder_hidden_states=torch.randn(batch, 7, 64),
                added_cond_kwargs={"text_embeds": torch.randn(batch, 32), "time_ids": torch.randn(batch, 6)})


def test_zero_ip_scale_reproduces_the_stock_unet():
    unet = _tiny_unet()
    inputs = _unet_inputs()
    with torch.no_grad():
        stock = unet(**inputs).sample
        processors = install_processors(unet)
        for p in processors:
            torch.nn.init.normal_(p.to_k_ip.weight)
            torch.nn.init.normal_(p.to_v_ip.weight)
        tokens = torch.randn(2, 16 * 4, 64)
        cells = torch.arange(16).repeat_interleave(4)
        zero = unet(**inputs, cross_attention_kwargs={
            "injection": Injection(tokens, 0.0, cells, grid=4, latent_hw=(16, 16))}).sample
        on = unet(**inputs, cross_attention_kwargs={
            "injection": Injection(tokens, 1.0, cells, grid=4, latent_hw=(16, 16))}).sample
    assert torch.allclose(zero, stock, atol=1e-6, rtol=0)
    assert not torch.allclose(on, stock, atol=1e-3)


def test_ip_adapter_file_loads_into_ours_and_matches_diffusers_stock_processor(tmp_path):
    """Our projection + processors load the public IP-Adapter layout and, attending globally, compute what
    diffusers' own IP-Adapter loader and processor compute from the same file."""
    from diffusers.models.embeddings import ImageProjection

    torch.manual_seed(3)
    source_proj = ImageTokenProjection(32, 64, 4)
    source_procs = install_processors(_tiny_unet())
    for p in [*source_proj.parameters(), *source_procs.parameters()]:
        torch.nn.init.normal_(p, std=0.2)
    path = tmp_path / "ip-adapter_tiny.bin"
    torch.save(ip_adapter_state_dict(source_proj, source_procs), path)

    ours = _tiny_unet()
    proj = ImageTokenProjection(32, 64, 4)
    load_ip_adapter_weights(path, proj, install_processors(ours))
    stock = _tiny_unet()
    state = torch.load(path, weights_only=True)
    stock._load_ip_adapter_weights([state])  # diffusers' loader: processors + encoder_hid_proj
    assert isinstance(stock.encoder_hid_proj.image_projection_layers[0], ImageProjection)
    embeds = torch.randn(2, 32)
    inputs = _unet_inputs()
    with torch.no_grad():
        tokens = proj(embeds[:, None])
        got = ours(**inputs, cross_attention_kwargs={"injection": Injection(tokens, 1.0)}).sample
        cond = dict(inputs["added_cond_kwargs"], image_embeds=[embeds[:, None]])
        want = stock(**{**inputs, "added_cond_kwargs": cond}).sample
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="model.ip_adapter_weights"):
        load_ip_adapter_weights(tmp_path / "missing.bin", proj, install_processors(_tiny_unet()))


def test_brain_prompt_reference_layout():
    sos = torch.randn(64)
    prompt = BrainPrompt(32, 64, 32, sos, seq_len=9)
    tokens = torch.randn(2, 1, 32)
    embeds, pooled, cells = prompt(tokens)
    assert embeds.shape == (2, 9, 64) and cells is None
    assert torch.equal(embeds[:, 0, 32:], sos[32:].expand(2, -1)) and not embeds[:, :, :32].any()
    assert torch.equal(embeds[:, 1:, 32:], tokens.expand(-1, 8, -1)) and not pooled.any()
    spatial, _, cells = prompt(torch.randn(2, 4, 32))
    assert cells.tolist() == [-1, 0, 1, 2, 3, 0, 1, 2, 3]


def test_min_snr_weights_equal_the_formula():
    from diffusers import DDPMScheduler

    from lightning_modules.components.diffusion_loss import min_snr_weights

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.tensor([0, 10, 250, 999])
    alpha = scheduler.alphas_cumprod.double().numpy()[t.numpy()]
    snr = alpha / (1 - alpha)
    expected = np.minimum(snr, 1.5) / snr
    assert np.allclose(min_snr_weights(scheduler.alphas_cumprod, t, 1.5).numpy(), expected, rtol=1e-5)
    assert torch.equal(min_snr_weights(scheduler.alphas_cumprod, t, None), torch.ones(4))


def test_offset_noise_adds_one_constant_per_sample_and_channel_and_none_without_an_offset():
    from lightning_modules.components.diffusion_loss import training_noise

    latents = torch.zeros(4096, 4, 8, 8)
    plain = training_noise(latents, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)))
    noise = training_noise(latents, 0.3, torch.Generator().manual_seed(0))
    offset = noise - plain  # the same stream first, then the offsets
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset), atol=1e-6)  # constant over the pixels
    assert abs(float(offset[:, :, 0, 0].std()) - 0.3) < 0.01  # std 0.3 across samples and channels
