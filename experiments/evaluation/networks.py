"""Feature networks of the MindEye2 recipe, built from local weight files only (nothing downloads).

| network | option | weights file | architecture | features (node) | input |
|---|---|---|---|---|---|
| AlexNet | ``--alexnet`` | torchvision ``alexnet-owt-7be5be79.pth`` (IMAGENET1K_V1) | ``alexnet()`` | ``features.4`` (Alex(2)), ``features.11`` (Alex(5)) | 256, ImageNet mean/std |
| InceptionV3 | ``--inception`` | torchvision ``inception_v3_google-0cc3c7bd.pth`` | ``inception_v3(aux_logits=True, transform_input=True, init_weights=False)`` as the builder sets it up for pretrained weights | ``avgpool`` | 342, ImageNet |
| CLIP ViT-L/14 | ``--clip`` | a local ``CLIPVisionModelWithProjection`` directory (``openai/clip-vit-large-patch14``) | transformers | ``image_embeds`` (768) | 224, CLIP mean/std |
| EfficientNet-B1 | ``--effnet`` | torchvision ``efficientnet_b1-c27df63c.pth`` (IMAGENET1K_V2 = DEFAULT) | ``efficientnet_b1()`` | ``avgpool`` | 255, ImageNet |
| SwAV ResNet-50 | ``--swav`` | ``swav_800ep_pretrain.pth.tar`` (``module.`` prefixes are stripped) | torchvision ``resnet50()`` (fc stays random, unused) | ``avgpool`` | 224, ImageNet |

Feature extractors are torchvision ``create_feature_extractor`` graphs in eval mode; every call runs under
``torch.inference_mode``. A state-dict file may hold the dict itself or wrap it in ``state_dict``/``model``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from experiments.evaluation import preprocessing as P
from lightning_modules.components.target_embedders import MissingWeightsError


def load_state_dict_file(path: str | Path, option: str) -> dict[str, torch.Tensor]:
    """A torch state-dict file (tensors only, loaded with ``weights_only``), unwrapped and without ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"{option}: no weight file at {str(path)!r} (a local torchvision state-dict file; "
                                  "nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise MissingWeightsError(f"{option}: cannot read {path} as a torch state dict: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MissingWeightsError(f"{option}: {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], option: str, path: str | Path,
              may_miss: tuple[str, ...] = (), may_add: tuple[str, ...] = ()) -> nn.Module:
    """Load ``state`` into ``model``; only keys starting with ``may_miss`` may be absent and only keys starting with
    ``may_add`` may be extra, anything else is an error naming ``option``."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise MissingWeightsError(f"{option}: {path} does not fit {type(model).__name__}: "
                                  f"{str(exc).splitlines()[-1].strip()}") from exc
    missing = [k for k in result.missing_keys if not (may_miss and k.startswith(may_miss))]
    extra = [k for k in result.unexpected_keys if not (may_add and k.startswith(may_add))]
    if missing or extra:
        raise MissingWeightsError(f"{option}: {path} does not fit {type(model).__name__}: missing {missing[:4]}"
                                  f"{'...' if len(missing) > 4 else ''}, unexpected {extra[:4]}"
                                  f"{'...' if len(extra) > 4 else ''}")
    return model


def build_alexnet(path: str | Path, option: str = "--alexnet") -> nn.Module:
    from torchvision.models import alexnet

    return load_into(alexnet(weights=None), load_state_dict_file(path, option), option, path)


def build_inception(path: str | Path, option: str = "--inception") -> nn.Module:
    from torchvision.models import inception_v3

    # what inception_v3(weights=Inception_V3_Weights.DEFAULT) builds before loading: transform_input=True,
    # aux_logits=True (the file holds the aux head; eval mode never runs it), init_weights=False
    model = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    return load_into(model, load_state_dict_file(path, option), option, path, may_miss=("AuxLogits.",))


def build_effnet(path: str | Path, option: str = "--effnet") -> nn.Module:
    from torchvision.models import efficientnet_b1

    return load_into(efficientnet_b1(weights=None), load_state_dict_file(path, option), option, path)


def build_swav(path: str | Path, option: str = "--swav") -> nn.Module:
    from torchvision.models import resnet50

    # facebookresearch/swav's hub entry: torchvision resnet50 + the checkpoint without "module.", strict=False
    return load_into(resnet50(weights=None), load_state_dict_file(path, option), option, path,
                     may_miss=("fc.",), may_add=("projection_head.", "prototypes."))


class ClipImageEmbeds(nn.Module):
    """transformers CLIP vision tower with projection -> ``{"image_embeds": (B, D)}`` (OpenAI ``encode_image``)."""

    def __init__(self, directory: str | Path, option: str = "--clip"):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise MissingWeightsError(f"{option}: no saved CLIPVisionModelWithProjection at {str(directory)!r} "
                                      "(a local directory written by save_pretrained; nothing is downloaded)")
        self.model = CLIPVisionModelWithProjection.from_pretrained(directory, local_files_only=True)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        size = self.model.config.image_size  # a smaller tower (the learned world's CLIP) sees its own input size
        if pixel_values.shape[-1] != size:
            pixel_values = torch.nn.functional.interpolate(pixel_values, size=(size, size), mode="bicubic",
                                                           antialias=True, align_corners=False)
        return {"image_embeds": self.model(pixel_values=pixel_values).image_embeds}


def _extractor(model: nn.Module, nodes: list[str]) -> nn.Module:
    from torchvision.models.feature_extraction import create_feature_extractor

    with warnings.catch_warnings():  # "nodes obtained in eval mode are a subsequence of train mode": expected
        warnings.simplefilter("ignore", UserWarning)
        return create_feature_extractor(model.eval(), return_nodes=nodes)


@dataclass(frozen=True)
class NetworkSpec:
    """How to build one feature network and which metric reads which of its nodes."""

    name: str
    option: str
    build: Callable[[str | Path, str], nn.Module]
    nodes: dict[str, str]  # metric key -> feature node
    preprocess: P.Preprocess
    extractor: bool = True  # wrap in create_feature_extractor (False: the module already returns a dict)
    description: str = field(default="", compare=False)


NETWORKS: dict[str, NetworkSpec] = {
    "alexnet": NetworkSpec("alexnet", "--alexnet", build_alexnet, {"alexnet2": "features.4", "alexnet5": "features.11"},
                           P.ALEXNET, description="torchvision AlexNet IMAGENET1K_V1 state dict"),
    "inception": NetworkSpec("inception", "--inception", build_inception, {"inception": "avgpool"}, P.INCEPTION,
                             description="torchvision InceptionV3 IMAGENET1K_V1 state dict"),
    "clip": NetworkSpec("clip", "--clip", ClipImageEmbeds, {"clip": "image_embeds"}, P.CLIP, extractor=False,
                        description="local CLIP ViT-L/14 CLIPVisionModelWithProjection directory"),
    "effnet": NetworkSpec("effnet", "--effnet", build_effnet, {"effnet": "avgpool"}, P.EFFNET,
                          description="torchvision EfficientNet-B1 IMAGENET1K_V2 state dict"),
    "swav": NetworkSpec("swav", "--swav", build_swav, {"swav": "avgpool"}, P.SWAV,
                        description="SwAV ResNet-50 swav_800ep_pretrain.pth.tar"),
}


class FeatureNetwork(nn.Module):
    """A built network with its preprocessing: 256 px images in [0, 1] -> ``{metric key: (B, d) float32}``
    (features flattened as MindEye2 does)."""

    def __init__(self, spec: NetworkSpec, path: str | Path, device: str | torch.device = "cpu"):
        super().__init__()
        self.spec = spec
        model = spec.build(path, spec.option)
        model = _extractor(model, sorted(set(spec.nodes.values()))) if spec.extractor else model
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)

    @torch.inference_mode()
    def nodes(self, images256: torch.Tensor, antialias: bool = False) -> dict[str, torch.Tensor]:
        """The raw outputs of the feature nodes, ``{node: (B, ...)}``."""
        return self.model(self.spec.preprocess(images256.to(self.device), antialias))

    def flatten(self, nodes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {metric: nodes[node].float().flatten(1) for metric, node in self.spec.nodes.items()}

    def forward(self, images256: torch.Tensor, antialias: bool = False) -> dict[str, torch.Tensor]:
        return self.flatten(self.nodes(images256, antialias))
