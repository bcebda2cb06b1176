"""The detection experts: torchvision's SSD family, always built with weights=None and
weights_backbone=None (build_detector never downloads anything); a fit may start from ImageNet
backbone weights loaded afterwards (read_backbone, load_backbone: torchvision's, or a state dict).

  vgg16     torchvision's ssd300_vgg16: the paper's expert (Table I, Fig. 4)
  resnet50  torchvision's SSD class on a ResNet50 feature extractor (Table I's second row)
  ssdlite   torchvision's ssdlite320_mobilenet_v3_large
  tiny      torchvision's SSD class on a 5-stage conv backbone (0.56 M parameters) at the
            expert's own resolution: the demo/smoke expert, since SSDlite trains at ~4 img/s
            on 2 CPU cores (STACK.md), too slow for an 8-minute demo

The fixed-size models (vgg16 at 300, resnet50 at 300, ssdlite at 320) upsample a smaller
P_n(x) in their own transform: that happens on the server, after transmission, so the data
cost stays 3 R^2 K. Labels are 1..C (0 is background); the task maps them to COCO ids.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import ssd300_vgg16, ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD

__all__ = ["BACKBONES", "BackboneError", "DETECTIONS", "MODELS", "build_detector", "input_size", "load_backbone",
           "losses_and_detections", "read_backbone"]

MODELS = ("tiny", "ssdlite", "vgg16", "resnet50")
# Detections kept per image after NMS, as each model is evaluated: the paper's SSD300 300, its
# ResNet50 SSD 50; ssdlite torchvision's ssdlite320 default; tiny 100 (the demo's scenes hold few objects)
DETECTIONS = {"vgg16": 300, "resnet50": 50, "ssdlite": 300, "tiny": 100}
_CANDIDATES = {"vgg16": 400, "resnet50": 400, "ssdlite": 300, "tiny": 100}  # torchvision's topk_candidates
# What a backbone state dict holds (the keys of torchvision's own files, IMAGENET1K_FEATURES / IMAGENET1K_V1)
BACKBONES = {"vgg16": "torchvision.models.vgg16().features.state_dict() (or a whole vgg16() state dict)",
             "resnet50": "torchvision.models.resnet50().state_dict() (layer4 and fc unused)"}


def input_size(model: str, resolution: int, min_side: int = 0) -> int:
    """Side of the square the network runs at: its own fixed size, or max(R, min_side) for
    the tiny SSD."""
    return {"vgg16": 300, "resnet50": 300, "ssdlite": 320}.get(model, max(resolution, min_side))


def build_detector(model: str, num_classes: int, resolution: int, width: float = 1.0, min_side: int = 0,
                   detections_per_img: int = 0) -> SSD:
    """An untrained SSD with num_classes labels (background included) for R x R inputs.

    min_side (tiny only): a smaller input is upsampled to this side first, on the server, so a
    50 px expert's last feature map is not a 2x2 grid (measured: its mAP@0.5 on scenes of large
    objects was 0.24 at 50 px native vs 0.95 for the 150 px expert).
    detections_per_img: kept after NMS; 0 is the model's own (DETECTIONS)."""
    if model not in MODELS:
        raise ValueError(f"unknown detection model {model!r}; expected one of {', '.join(MODELS)}")
    keep = detections_per_img or DETECTIONS[model]
    # topk_candidates (per class, before NMS) at least as many as are kept, so none is cut short
    kept = {"detections_per_img": keep, "topk_candidates": max(_CANDIDATES[model], keep)}
    if model == "vgg16":
        return ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes, **kept)
    if model == "ssdlite":
        return ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes, **kept)
    if model == "resnet50":
        anchors = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                      scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
                                      steps=[8, 16, 32, 64, 100, 300])
        return SSD(_ResNet50Features(), anchors, (300, 300), num_classes, **kept)
    # tiny: one scale per feature map (strides 8, 16, 32) plus the last one's upper end
    anchors = DefaultBoxGenerator([[2], [2], [2]], scales=[0.05, 0.14, 0.32, 0.7])
    side = input_size(model, resolution, min_side)
    return SSD(_TinyFeatures(width), anchors, (side, side), num_classes, **kept)


class BackboneError(ValueError):
    """Backbone weights that cannot be had or do not fit; the message says what failed, in one line."""


def read_backbone(model: str, source: str) -> dict[str, torch.Tensor]:
    """ImageNet backbone weights, keyed as BACKBONES says: source "torchvision" downloads
    torchvision's (what ssd300_vgg16 loads for weights_backbone), anything else is a path or URI
    of a torch.save'd state dict with the same keys. Read before the detector is built, so a
    missing file fails at once."""
    if model not in BACKBONES:
        raise BackboneError(f"the {model} expert has no ImageNet backbone to load (only {', '.join(BACKBONES)})")
    state = _torchvision_state(model) if source == "torchvision" else _file_state(source)
    if not isinstance(state, dict):
        raise BackboneError(f"{source} holds a {type(state).__name__}, not a state dict")
    if model == "vgg16" and any(str(k).startswith("features.") for k in state):  # a whole vgg16(): its features
        state = {k[len("features."):]: v for k, v in state.items() if str(k).startswith("features.")}
    return state


def load_backbone(detector: SSD, model: str, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy read_backbone's weights into a fresh detector (the same way for both sources); keys the
    backbone does not use (vgg16's classifier, resnet50's layer4 and fc) are ignored.

    As ssd300_vgg16 does with pretrained weights (trainable_backbone_layers=4 of 5), VGG's first
    stage (conv1_1, conv1_2) is then frozen; the ResNet50 backbone trains whole."""
    wanted = _backbone_keys(detector, model)  # key in the source -> the detector's tensor it fills
    shape = lambda value: tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__  # noqa: E731
    missing = [k for k in wanted if k not in state]
    misfit = [k for k in wanted if k in state and shape(state[k]) != shape(wanted[k])]
    if missing or misfit:
        what = (f"{len(missing)} of its {len(wanted)} tensors missing (e.g. {missing[0]!r})" if missing else
                f"{misfit[0]!r} is {shape(state[misfit[0]])}, expected {shape(wanted[misfit[0]])}")
        raise BackboneError(f"{source} does not fit the {model} backbone: {what}")
    with torch.no_grad():
        for key, tensor in wanted.items():
            tensor.copy_(state[key])
    if model == "vgg16":  # torchvision's _vgg_extractor: freeze the layers before the first max-pool
        layers = _vgg_layers(detector)
        first_pool = next(i for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d))
        for layer in layers[:first_pool]:
            layer.requires_grad_(False)


def _torchvision_state(model: str) -> dict:
    """torchvision's ImageNet weights for the backbone (its download cache, else the network)."""
    from torchvision.models import ResNet50_Weights, VGG16_Weights

    weights = {"vgg16": VGG16_Weights.IMAGENET1K_FEATURES, "resnet50": ResNet50_Weights.IMAGENET1K_V1}[model]
    try:
        return weights.get_state_dict(progress=False, weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
        raise BackboneError(f"torchvision's {weights} could not be downloaded ({_first_line(err)})") from None


def _file_state(source: str):
    """A torch.save'd state dict at a path or URI, read as tensors only (never code)."""
    import pickle

    from storage import as_path, load_torch

    try:
        return load_torch(as_path(source))
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise BackboneError(f"{source} cannot be read as a state dict ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def _vgg_layers(detector: SSD) -> list[nn.Module]:
    """vgg16().features[0:30] as ssd300_vgg16 holds them: conv1_1..conv4_3 in backbone.features,
    pool4..conv5_3 at the front of backbone.extra[0] (its last module is SSD's fc6/fc7)."""
    return [*detector.backbone.features, *list(detector.backbone.extra[0])[:-1]]


def _backbone_keys(detector: SSD, model: str) -> dict[str, torch.Tensor]:
    """{key in torchvision's state dict: the detector's tensor it fills} for the backbone's layers."""
    if model == "vgg16":
        modules = {str(i): layer for i, layer in enumerate(_vgg_layers(detector))}
    else:
        body = detector.backbone.body  # conv1, bn1, relu, maxpool, layer1, layer2
        modules = {"conv1": body[0], "bn1": body[1], "layer1": body[4], "layer2": body[5],
                   "layer3": detector.backbone.layer3}
    return {f"{prefix}.{name}": tensor for prefix, module in modules.items()
            for name, tensor in module.state_dict(keep_vars=True).items()}


class _TinyFeatures(nn.Module):
    """Conv stages down to strides 8, 16 and 32. BatchNorm: from scratch it left its plateau
    within 2 epochs where GroupNorm needed 8 (measured at 50 px); a batch of one still trains
    while the last map is at least 2x2 (R >= 33)."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        c = [max(4, round(x * width)) for x in (16, 32, 64, 96, 128)]

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.stem = nn.Sequential(block(3, c[0]), block(c[0], c[1]))  # stride 4
        self.stages = nn.ModuleList([block(c[1], c[2]), block(c[2], c[3]), block(c[3], c[4])])
        self.out_channels = c[2:]

    def forward(self, x: torch.Tensor) -> OrderedDict:
        x = self.stem(x)
        maps = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            maps[str(i)] = x  # (B, C_i, R / 2^(i+3), R / 2^(i+3))
        return maps


class _ResNet50Features(nn.Module):
    """ResNet50 up to layer3 (strides 8 and 16) plus SSD300's extra layers: six maps
    38, 19, 10, 5, 3, 1 at 300 px, as ssd300_vgg16 has."""

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)  # 512 @ 38
        self.layer3 = net.layer3  # 1024 @ 19

        def extra(cin: int, mid: int, cout: int, stride: int, padding: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, mid, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(mid, cout, 3, stride=stride, padding=padding), nn.ReLU(inplace=True))

        self.extras = nn.ModuleList([extra(1024, 256, 512, 2, 1), extra(512, 128, 256, 2, 1),
                                     extra(256, 128, 256, 1, 0), extra(256, 128, 256, 1, 0)])
        self.out_channels = [512, 1024, 512, 256, 256, 256]

    def forward(self, x: torch.Tensor) -> OrderedDict:
        x = self.body(x)
        maps = OrderedDict([("0", x)])
        x = self.layer3(x)
        maps["1"] = x
        for i, layer in enumerate(self.extras):
            x = layer(x)
            maps[str(i + 2)] = x
        return maps


def losses_and_detections(model: SSD, images: list[torch.Tensor], targets: list[dict]
                          ) -> tuple[torch.Tensor, list[dict]]:
    """One eval-mode pass: each image's own SSD loss (as if it were a batch of one) and its
    detections in the input's pixel coordinates. torchvision's forward gives either the
    batch-mean loss (train mode) or detections (eval mode); the cache needs both per image.

    Args:
        images: B tensors (3, R, R) in [0, 1].
        targets: B dicts with boxes (G, 4) xyxy in input pixels and labels (G,) in 1..C.
    Returns:
        (B,) losses and B dicts with boxes (D, 4), scores (D,), labels (D,).
    """
    sizes = [tuple(img.shape[-2:]) for img in images]
    batch, targets_t = model.transform(images, targets)
    features = model.backbone(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    features = list(features.values())
    head = model.head(features)
    anchors = model.anchor_generator(batch, features)
    losses = []
    for i, (target, anchor) in enumerate(zip(targets_t, anchors)):
        if target["boxes"].numel() == 0:
            matched = torch.full((anchor.size(0),), -1, dtype=torch.int64, device=anchor.device)
        else:
            from torchvision.ops import box_iou

            matched = model.proposal_matcher(box_iou(target["boxes"], anchor))
        one = model.compute_loss([target], {k: v[i:i + 1] for k, v in head.items()}, [anchor], [matched])
        losses.append(one["bbox_regression"] + one["classification"])
    detections = model.postprocess_detections(head, anchors, batch.image_sizes)
    detections = model.transform.postprocess(detections, batch.image_sizes, sizes)
    return torch.stack(losses), detections
