"""IP-Adapter-style injection of routed brain tokens into every cross-attention layer of a diffusers UNet.

``ImageTokenProjection`` maps each routed token (B, T, D) to n tokens of the cross-attention width (B, T * n, C)
(Linear + LayerNorm; the same layout as IP-Adapter SDXL's image projection, so its public weights load).
``RegionalIPAttnProcessor`` adds a decoupled attention over those tokens (its own ``to_k_ip``/``to_v_ip``) to the
text cross-attention; with regional masks each latent position attends only to the tokens of its grid cell (the
mask is built per attention resolution by nearest-neighbour resizing of the cell map). Per-call inputs arrive as
one ``Injection`` object through ``cross_attention_kwargs={"injection": ...}``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class ImageTokenProjection(nn.Module):
    """(B, T, D) -> (B, T * num_tokens, C): Linear(D -> num_tokens * C) then LayerNorm(C) per token."""

    def __init__(self, embed_dim: int, cross_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens, self.cross_dim = num_tokens, cross_dim
        self.proj = nn.Linear(embed_dim, num_tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t, _ = tokens.shape
        out = self.proj(tokens.to(self.proj.weight.dtype)).reshape(b, t * self.num_tokens, self.cross_dim)
        return self.norm(out)


@functools.lru_cache(maxsize=256)
def cell_map(grid: int, latent_hw: tuple[int, int], positions: int, device: torch.device) -> torch.Tensor:
    """Grid cell (N,) of each of the N positions of an attention layer over a ``latent_hw`` UNet input (row-major,
    nearest-neighbour; the layer's map is the input halved some times, rounding up). A pure function of the
    geometry, memoised: every step of a run asks for the same few maps."""
    h0, w0 = latent_hw
    for level in range(8):
        h, w = math.ceil(h0 / 2**level), math.ceil(w0 / 2**level)
        if h * w == positions:
            break
    else:
        raise ValueError(f"cannot place {positions} attention positions on a {h0} x {w0} latent")
    rows = torch.arange(h, device=device) * grid // h
    cols = torch.arange(w, device=device) * grid // w
    return (rows[:, None] * grid + cols[None]).flatten()


@dataclass
class Injection:
    """What the processors need for one UNet call.

    ip_tokens: (B, T, C) projected brain tokens, or None (no IP attention). ip_scale: their weight (0 skips them).
    ip_cells: (T,) grid cell of every IP token, or None (attended globally). text_cells: (S,) grid cell of every
    prompt position (-1: every cell), or None. text_rows: (B,) rows whose prompt is regional (False on the
    unconditional half of classifier-free guidance). grid: g of the g x g cell map; latent_hw: UNet input size.
    The cell masks depend on the cells and the layer's size only, so each is built once per attention size (not
    once per layer); setting ``ip_cells``, ``text_cells``, ``grid`` or ``latent_hw`` drops them.
    """

    ip_tokens: torch.Tensor | None = None
    ip_scale: float = 1.0
    ip_cells: torch.Tensor | None = None
    text_cells: torch.Tensor | None = None
    text_rows: torch.Tensor | None = None
    grid: int = 1
    latent_hw: tuple[int, int] = (1, 1)
    _masks: dict = field(default_factory=dict, repr=False)

    def __setattr__(self, name: str, value) -> None:
        if name in ("ip_cells", "text_cells", "grid", "latent_hw") and "_masks" in self.__dict__:
            self._masks.clear()
        super().__setattr__(name, value)

    def cell_map(self, positions: int, device: torch.device) -> torch.Tensor:
        """Grid cell (N,) of each of the N positions of an attention layer (row-major, nearest-neighbour)."""
        return cell_map(self.grid, tuple(self.latent_hw), positions, torch.device(device))

    def _mask(self, kind: str, positions: int, device: torch.device, build) -> torch.Tensor:
        key = (kind, positions, str(device))
        if key not in self._masks:
            self._masks[key] = build(self.cell_map(positions, device))
        return self._masks[key]

    def ip_mask(self, positions: int, device: torch.device) -> torch.Tensor | None:
        """(N, T) bool: position may attend token, or None."""
        if self.ip_cells is None:
            return None
        return self._mask("ip", positions, device, lambda cells: cells[:, None] == self.ip_cells.to(device)[None])

    def text_mask(self, positions: int, device: torch.device) -> torch.Tensor | None:
        """(B, 1, N, S) bool, or None."""
        if self.text_cells is None:
            return None

        def regional(cells: torch.Tensor) -> torch.Tensor:
            text = self.text_cells.to(device)
            return (cells[:, None] == text[None]) | (text[None] < 0)

        rows = self.text_rows.to(device)[:, None, None, None]  # read per call: guidance edits the rows
        return self._mask("text", positions, device, regional)[None, None] | ~rows


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


class RegionalIPAttnProcessor(nn.Module):
    """Cross-attention processor: text attention (optionally regional) plus decoupled, optionally regional,
    attention over the injected tokens. Without an ``Injection`` it computes exactly what diffusers'
    ``AttnProcessor2_0`` computes."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, with_ip: bool = True):
        super().__init__()
        self.with_ip = with_ip
        if with_ip:  # without: text attention only (a text-only model keeps its regional prompt masks)
            self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
            self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 injection: Injection | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, positions = hidden_states.shape[0], hidden_states.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (_heads(x, attn.heads) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if injection is not None:
            text_mask = injection.text_mask(positions, query.device)
            if text_mask is not None:
                if attention_mask is not None:
                    raise ValueError("a regional prompt cannot be combined with an encoder attention mask")
                attention_mask = text_mask
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[-1]).to(query.dtype)
        if self.with_ip and injection is not None and injection.ip_tokens is not None and injection.ip_scale != 0:
            ip = injection.ip_tokens.to(self.to_k_ip.weight.dtype)
            ip_key = _heads(self.to_k_ip(ip).to(query.dtype), attn.heads)
            ip_value = _heads(self.to_v_ip(ip).to(query.dtype), attn.heads)
            ip_out = F.scaled_dot_product_attention(query, ip_key, ip_value,
                                                    attn_mask=injection.ip_mask(positions, query.device))
            out = out + injection.ip_scale * ip_out.transpose(1, 2).reshape(out.shape).to(out.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SelfAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` that accepts (and ignores) the ``injection`` argument, so self-attention
    layers neither warn nor drop it on every call."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 injection: Injection | None = None):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_processors(unet: nn.Module, with_ip: bool = True) -> nn.ModuleList:
    """Give every cross-attention layer of ``unet`` a ``RegionalIPAttnProcessor`` (with IP key/value weights
    unless ``with_ip`` is False) and every self-attention layer a ``SelfAttnProcessor``; returns the
    cross-attention processors in ``unet.attn_processors`` order (the order of IP-Adapter weight files)."""
    cross_dim = unet.config.cross_attention_dim
    processors, cross = {}, []
    modules = dict(unet.named_modules())
    for name in unet.attn_processors:
        attn = modules[name[: -len(".processor")]]
        if name.endswith("attn1.processor"):
            processors[name] = SelfAttnProcessor()
        else:
            hidden = attn.to_out[0].out_features if not hasattr(attn.to_out[0], "base_layer") \
                else attn.to_out[0].base_layer.out_features
            proc = RegionalIPAttnProcessor(hidden, cross_dim, with_ip)
            processors[name] = proc
            cross.append(proc)
    unet.set_attn_processor(processors)
    return nn.ModuleList(cross)


def load_ip_adapter_weights(path: str | Path, projection: ImageTokenProjection,
                            processors: nn.ModuleList) -> None:
    """Load an IP-Adapter file (``ip-adapter_sdxl.bin`` or ``.safetensors``: ``image_proj`` + ``ip_adapter`` with
    keys ``{1 + 2 i}.to_k_ip.weight`` for the i-th cross-attention layer) into ``projection`` and ``processors``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.ip_adapter_weights: no IP-Adapter file at {path} "
                                "(e.g. h94/IP-Adapter sdxl_models/ip-adapter_sdxl.bin, downloaded beforehand)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        state = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            state.setdefault(head, {})[rest] = value
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        projection.load_state_dict(state["image_proj"])
        for i, proc in enumerate(processors):
            key_id = 1 + 2 * i
            proc.load_state_dict({"to_k_ip.weight": state["ip_adapter"][f"{key_id}.to_k_ip.weight"],
                                  "to_v_ip.weight": state["ip_adapter"][f"{key_id}.to_v_ip.weight"]})
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"model.ip_adapter_weights {path} does not fit this UNet / projection "
                         f"({len(processors)} cross-attention layers, {projection.num_tokens} tokens): {err}") from err


def ip_adapter_state_dict(projection: ImageTokenProjection, processors: nn.ModuleList) -> dict:
    """The inverse of ``load_ip_adapter_weights``: an IP-Adapter-format state dict."""
    ip = {}
    for i, proc in enumerate(processors):
        ip[f"{1 + 2 * i}.to_k_ip.weight"] = proc.to_k_ip.weight.detach().cpu()
        ip[f"{1 + 2 * i}.to_v_ip.weight"] = proc.to_v_ip.weight.detach().cpu()
    return {"image_proj": {k: v.detach().cpu() for k, v in projection.state_dict().items()}, "ip_adapter": ip}
