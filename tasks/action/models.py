"""The three experts of section IV-D as two-stream CNNs, in two architectures (`arch`):

emv: the paper's, after EMV-CNN [53] (the temporal stream of MV-3DCNN [8] is alike): a
    ClarifaiNet/ZFNet-like 2-D CNN, conv 7x7/2 96 -> pool -> conv 5x5/2 256 -> pool -> 3 x conv
    3x3 512 -> pool -> fc 4096 -> fc 2048 -> dropout -> classes, on the motion grid upsampled
    24 -> 224 on the server side (after transmission, so d_n is unchanged; section IV-D).
    BatchNorm stands in for ZFNet's contrast normalisation: the experts train from scratch.
small: three or four conv stages and global max pooling, sized for the CPU demo.

temporal: the F_t x 24 x 24 x 2 motion-vector grid as 2 F_t channels, as the temporal stream of
    two-stream networks [40] stacks flow fields.
spatial: F_s RGB frames stacked as 3 F_s channels, through the same kind of trunk.
fusion: both trunks, their features concatenated before the classifier.
Each returns (B, classes) logits; the temporal expert also exposes its last hidden layer
(`embed`), the embedding Fig. 9 projects. Every parameter of every expert takes part in its
forward: DDP (more than one Ray Train worker) refuses parameters that get no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

EXPERT_KINDS = ("temporal", "spatial", "fusion")
ARCHS = ("small", "emv")
MV_UNIT = 4.0  # pixels per frame: motion vectors are divided by this before the network
EMV_MIN_SIDE = 47  # the smallest input side the emv trunk's strides and ceil-mode poolings accept
DROPOUT = 0.5  # after fc6 and fc7 of the emv streams, as ZFNet


def _trunk(in_channels: int, widths: tuple[int, ...], first_stride: int = 1) -> nn.Sequential:
    """Conv-BN-ReLU stages, each after the first halving the resolution, then global max
    pooling: it finds a small actor anywhere in a scene that is mostly background (average
    pooling dilutes it; measured on the demo clips: spatial 38% vs the 62.5% attainable)."""
    layers, c = [], in_channels
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, stride=first_stride if i == 0 else 2, padding=1, bias=False),
                   nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())


def _conv(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


def _emv_trunk(in_channels: int, width: float = 1.0) -> nn.Sequential:
    """EMV-CNN's stream [53] up to fc7, (B, C, 224, 224) -> (B, 2048): ClarifaiNet's layers with
    Caffe's ceil-mode pooling, so 224 gives ZFNet's 110 -> 55 -> 26 -> 13 -> 6 maps. Other sizes
    (the 240 x 320 frames) are pooled to 6 x 6 before fc6, as torchvision's AlexNet does."""
    c1, c2, c3, fc6, fc7 = _widths((96, 256, 512, 4096, 2048), width)
    pool = dict(kernel_size=3, stride=2, ceil_mode=True)
    return nn.Sequential(
        *_conv(in_channels, c1, 7, 2, 1), nn.MaxPool2d(**pool),  # (B, 96, 110, 110) -> (B, 96, 55, 55)
        *_conv(c1, c2, 5, 2, 0), nn.MaxPool2d(**pool),  # (B, 256, 26, 26) -> (B, 256, 13, 13)
        *_conv(c2, c3, 3, 1, 1), *_conv(c3, c3, 3, 1, 1), *_conv(c3, c3, 3, 1, 1),  # (B, 512, 13, 13)
        nn.MaxPool2d(**pool), nn.AdaptiveAvgPool2d(6), nn.Flatten(),  # (B, 512 * 6 * 6)
        nn.Linear(c3 * 36, fc6), nn.ReLU(inplace=True), nn.Dropout(DROPOUT),  # (B, 4096) fc6
        nn.Linear(fc6, fc7), nn.ReLU(inplace=True))  # (B, 2048) fc7: the last hidden layer


def _widths(base: tuple[int, ...], width: float) -> tuple[int, ...]:
    return tuple(max(4, round(w * width)) for w in base)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown action expert architecture {arch!r}; expected one of {', '.join(ARCHS)}")


def motion_channels(mv: torch.Tensor, upsample: int) -> torch.Tensor:
    """(B, F_t, 24, 24, 2) -> (B, 2 F_t, S, S) with S the server-side upsampled size."""
    b, f, h, w, _ = mv.shape
    x = mv.float().permute(0, 1, 4, 2, 3).reshape(b, 2 * f, h, w) / MV_UNIT
    if upsample != h:
        x = nn.functional.interpolate(x, size=(upsample, upsample), mode="bilinear", align_corners=False)
    return x


def rgb_channels(rgb: torch.Tensor) -> torch.Tensor:
    """(B, F_s, H_s, W_s, 3) uint8 -> (B, 3 F_s, H_s, W_s) roughly standardised."""
    b, f, h, w, _ = rgb.shape
    return (rgb.float().permute(0, 1, 4, 2, 3).reshape(b, 3 * f, h, w) / 255.0 - 0.45) / 0.25


class TemporalNet(nn.Module):
    """Motion-vector CNN: (B, F_t, 24, 24, 2) velocities -> (B, classes)."""

    def __init__(self, frames: int, classes: int, width: float = 1.0, upsample: int = 24, embed_dim: int = 32,
                 arch: str = "small"):
        super().__init__()
        _check_arch(arch)
        self.upsample = upsample
        if arch == "small":
            widths = _widths((48, 64, 96), width)
            self.trunk = _trunk(2 * frames, widths)
            self.embedding = nn.Sequential(nn.Linear(widths[-1], embed_dim), nn.ReLU(inplace=True))
            self.classifier = nn.Linear(embed_dim, classes)
            self.features = widths[-1]
        else:  # the trunk ends at fc7, the last hidden layer: that is the embedding
            self.trunk = _emv_trunk(2 * frames, width)
            self.features = self.trunk[-2].out_features
            self.embedding = nn.Identity()
            self.classifier = nn.Sequential(nn.Dropout(DROPOUT), nn.Linear(self.features, classes))

    def channels(self, mv: torch.Tensor) -> torch.Tensor:
        return motion_channels(mv, self.upsample)

    def embed(self, mv: torch.Tensor) -> torch.Tensor:  # (B, embed_dim) small, (B, 2048) emv
        return self.embedding(self.trunk(self.channels(mv)))

    def forward(self, mv: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(mv))


class SpatialNet(nn.Module):
    """RGB CNN: (B, F_s, H_s, W_s, 3) uint8 frames -> (B, classes)."""

    def __init__(self, frames: int, classes: int, width: float = 1.0, arch: str = "small"):
        super().__init__()
        _check_arch(arch)
        if arch == "small":
            widths = _widths((32, 48, 64, 96), width)
            self.trunk = _trunk(3 * frames, widths, first_stride=2)  # frames are larger than the 24x24 grid
            self.classifier = nn.Linear(widths[-1], classes)
            self.features = widths[-1]
        else:
            self.trunk = _emv_trunk(3 * frames, width)  # (B, 2048) fc7
            self.features = self.trunk[-2].out_features
            self.classifier = nn.Sequential(nn.Dropout(DROPOUT), nn.Linear(self.features, classes))

    @staticmethod
    def channels(rgb: torch.Tensor) -> torch.Tensor:
        return rgb_channels(rgb)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.trunk(self.channels(rgb)))


class FusionNet(nn.Module):
    """Both streams' trunks, features concatenated: (mv, rgb) -> (B, classes).

    The streams are built whole, then only their trunks kept: a seed draws the same trunks (and
    the demo the same fusion expert) as when the unused heads stayed, which DDP refuses.
    """

    def __init__(self, mv_frames: int, rgb_frames: int, classes: int, width: float = 1.0, upsample: int = 24,
                 arch: str = "small"):
        super().__init__()
        temporal = TemporalNet(mv_frames, classes, width, upsample, arch=arch)
        spatial = SpatialNet(rgb_frames, classes, width, arch=arch)
        self.upsample = upsample
        self.temporal_trunk, self.spatial_trunk = temporal.trunk, spatial.trunk
        features = temporal.features + spatial.features
        if arch == "small":
            self.classifier = nn.Sequential(nn.Linear(features, 64), nn.ReLU(inplace=True), nn.Linear(64, classes))
        else:  # linear in both fc7s: the sum of two learnt score heads, late fusion as in [40], [53]
            self.classifier = nn.Sequential(nn.Dropout(DROPOUT), nn.Linear(features, classes))

    def forward(self, mv: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        t = self.temporal_trunk(motion_channels(mv, self.upsample))  # (B, features_t)
        s = self.spatial_trunk(rgb_channels(rgb))  # (B, features_s)
        return self.classifier(torch.cat([t, s], dim=1))


def build_expert(kind: str, mv_frames: int, rgb_frames: int, classes: int, width: float = 1.0,
                 upsample: int = 24, arch: str = "small") -> nn.Module:
    if kind == "temporal":
        return TemporalNet(mv_frames, classes, width, upsample, arch=arch)
    if kind == "spatial":
        return SpatialNet(rgb_frames, classes, width, arch=arch)
    if kind == "fusion":
        return FusionNet(mv_frames, rgb_frames, classes, width, upsample, arch=arch)
    raise ValueError(f"unknown action expert {kind!r}; expected one of {', '.join(EXPERT_KINDS)}")
