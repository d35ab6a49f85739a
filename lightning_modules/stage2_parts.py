"""What stage 2 trains and what its checkpoints store: ONE definition, used by ``RoutedDiffusionModule`` (freezing,
stored parts), the meta-device parameter report (``stage2_parameters``, ``experiments.params``, ``parameters.json``).

Parts, by module reference: ``lora`` (LoRA A/B of every peft LoRA layer of the UNet), ``routers`` (temporal and
spatial routers of every branch), ``projections`` (the brain prompt, and the image token projection when it is
trained from scratch) and ``ip_attention`` (the IP-Adapter: the IP key / value of every cross-attention layer, and,
when IP-Adapter weights are loaded, their image projection ``image_proj`` too). So with IP-Adapter weights loaded
and ``ip_adapter_trainable`` unset or false, the IP key / value AND the image projection stay frozen as loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

Stage2Part = Literal["lora", "routers", "projections", "ip_attention"]
PARTS: tuple[Stage2Part, ...] = ("lora", "routers", "projections", "ip_attention")


def stage2_parts(unet: nn.Module, routers: Sequence[nn.Module], image_projection: nn.Module | None,
                 brain_prompt: nn.Module | None, ip_processors: Sequence[nn.Module], ip_adapter_loaded: bool
                 ) -> dict[str, list[nn.Module]]:
    """Part name -> its modules (see the module docstring; a part may be empty)."""
    from peft.tuners.lora import LoraLayer

    lora = [m for layer in unet.modules() if isinstance(layer, LoraLayer) for m in (layer.lora_A, layer.lora_B)]
    ip_projection = [image_projection] if image_projection is not None and ip_adapter_loaded else []
    own_projection = [image_projection] if image_projection is not None and not ip_adapter_loaded else []
    return {"lora": lora, "routers": [r for r in routers if r is not None],
            "projections": own_projection + ([brain_prompt] if brain_prompt is not None else []),
            "ip_attention": [*ip_processors, *ip_projection]}


def trained_and_stored(has_image_branch: bool, ip_adapter_loaded: bool, ip_adapter_trainable: bool | None,
                       trainable: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(parts trained, parts a checkpoint stores). Default training: lora, routers, projections, and the IP-Adapter
    (``ip_attention``) when it is not loaded from a file or ``ip_adapter_trainable`` says so; ``trainable``
    replaces the default. Stored: the default's parts and the trained ones (a transfer checkpoint is complete)."""
    unknown = sorted(set(trainable or []) - set(PARTS))
    if unknown:
        raise ValueError(f"model.trainable: unknown parts {unknown}; choose from {list(PARTS)}")
    ip_trainable = has_image_branch and (
        (not ip_adapter_loaded) if ip_adapter_trainable is None else bool(ip_adapter_trainable))
    default = ["lora", "routers", "projections"] + (["ip_attention"] if ip_trainable else [])
    trained = [p for p in PARTS if p in (default if trainable is None else trainable)]
    stored = [p for p in PARTS if p in default or p in trained]
    return trained, stored


def apply_trainable(parts: dict[str, list[nn.Module]], trained: Sequence[str], stored: Sequence[str]) -> None:
    """Stored parts in float32; every part's parameters trainable exactly when the part is trained."""
    for name in stored:
        for module in parts[name]:
            for p in module.parameters():
                p.data = p.data.float()
    for name, modules in parts.items():
        for module in modules:
            module.requires_grad_(name in trained)
