"""The three experts of section IV-D, as small two-stream CNNs (in the spirit of MV-3DCNN [8]
and EMV-CNN [53], sized for a CPU demo; `width` scales them up for a cluster).

temporal: the F_t x 24 x 24 x 2 motion-vector grid as 2 F_t channels of a 2-D CNN, as the
    temporal stream of two-stream networks stacks flow fields; the grid may be upsampled on
    the server side (after transmission, so d_n is unchanged), as [53] does to 224 x 224.
spatial: F_s RGB frames stacked as 3 F_s channels.
fusion: both trunks, their features concatenated before the classifier.
Each returns (B, classes) logits; the temporal expert also exposes its last hidden layer
(`embed`), the embedding Fig. 9 projects.
"""

from __future__ import annotations

import torch
from torch import nn

EXPERT_KINDS = ("temporal", "spatial", "fusion")
MV_UNIT = 4.0  # pixels per frame: motion vectors are divided by this before the network


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


def _widths(base: tuple[int, ...], width: float) -> tuple[int, ...]:
    return tuple(max(4, round(w * width)) for w in base)


class TemporalNet(nn.Module):
    """Motion-vector CNN: (B, F_t, 24, 24, 2) velocities -> (B, classes)."""

    def __init__(self, frames: int, classes: int, width: float = 1.0, upsample: int = 24, embed_dim: int = 32):
        super().__init__()
        self.upsample = upsample
        widths = _widths((48, 64, 96), width)
        self.trunk = _trunk(2 * frames, widths)
        self.embedding = nn.Sequential(nn.Linear(widths[-1], embed_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(embed_dim, classes)
        self.features = widths[-1]

    def channels(self, mv: torch.Tensor) -> torch.Tensor:
        """(B, F_t, 24, 24, 2) -> (B, 2 F_t, S, S) with S the server-side upsampled size."""
        b, f, h, w, _ = mv.shape
        x = mv.float().permute(0, 1, 4, 2, 3).reshape(b, 2 * f, h, w) / MV_UNIT
        if self.upsample != h:
            x = nn.functional.interpolate(x, size=(self.upsample, self.upsample), mode="bilinear",
                                          align_corners=False)
        return x

    def embed(self, mv: torch.Tensor) -> torch.Tensor:  # (B, embed_dim)
        return self.embedding(self.trunk(self.channels(mv)))

    def forward(self, mv: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(mv))


class SpatialNet(nn.Module):
    """RGB CNN: (B, F_s, H_s, W_s, 3) uint8 frames -> (B, classes)."""

    def __init__(self, frames: int, classes: int, width: float = 1.0):
        super().__init__()
        widths = _widths((32, 48, 64, 96), width)
        self.trunk = _trunk(3 * frames, widths, first_stride=2)  # frames are larger than the 24x24 grid
        self.classifier = nn.Linear(widths[-1], classes)
        self.features = widths[-1]

    @staticmethod
    def channels(rgb: torch.Tensor) -> torch.Tensor:
        b, f, h, w, _ = rgb.shape
        return (rgb.float().permute(0, 1, 4, 2, 3).reshape(b, 3 * f, h, w) / 255.0 - 0.45) / 0.25

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.trunk(self.channels(rgb)))


class FusionNet(nn.Module):
    """Both streams, features concatenated: (mv, rgb) -> (B, classes)."""

    def __init__(self, mv_frames: int, rgb_frames: int, classes: int, width: float = 1.0, upsample: int = 24):
        super().__init__()
        self.temporal = TemporalNet(mv_frames, classes, width, upsample)
        self.spatial = SpatialNet(rgb_frames, classes, width)
        self.classifier = nn.Sequential(
            nn.Linear(self.temporal.features + self.spatial.features, 64), nn.ReLU(inplace=True),
            nn.Linear(64, classes))

    def forward(self, mv: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        t = self.temporal.trunk(self.temporal.channels(mv))
        s = self.spatial.trunk(self.spatial.channels(rgb))
        return self.classifier(torch.cat([t, s], dim=1))


def build_expert(kind: str, mv_frames: int, rgb_frames: int, classes: int, width: float = 1.0,
                 upsample: int = 24) -> nn.Module:
    if kind == "temporal":
        return TemporalNet(mv_frames, classes, width, upsample)
    if kind == "spatial":
        return SpatialNet(rgb_frames, classes, width)
    if kind == "fusion":
        return FusionNet(mv_frames, rgb_frames, classes, width, upsample)
    raise ValueError(f"unknown action expert {kind!r}; expected one of {', '.join(EXPERT_KINDS)}")
