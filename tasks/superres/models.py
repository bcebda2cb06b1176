"""The super-resolution experts, trained from scratch: ESPCN (Shi et al. 2016) and FSRCNN
(Dong et al. 2016), one per scale S in {4, 3, 2}, on RGB.

Input: the LR patch as float (B, 3, h, w) in [0, 1]; output (B, 3, out_size, out_size), not
clamped (clamp before scoring). Two choices of ours, both documented in the report:

* residual (default, both models): the network predicts the correction to bicubic upsampling,
  output = bicubic(x) + net(x), with the last layer initialised near zero. A from-scratch expert
  then starts at bicubic quality and trains in minutes on a CPU instead of hours.
* exact patch size: at x3 a 64x64 patch is sent as 21x21 and the sub-pixel layer yields 63x63, so
  when h*S != out_size the network's output is resized with bicubic F.interpolate to out_size
  (64). At x2 and x4 h*S == 64 and nothing is resized. out_size=None keeps (h*S, w*S), for
  whole images.

Both papers work on Y only; we keep 3 channels so an expert's output is the RGB patch itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.superres.patches import PATCH

__all__ = ["ESPCN", "FSRCNN", "EXPERT_KINDS", "build_expert"]


def _ch(channels: int, width: float) -> int:
    """Channels scaled by the width knob, at least 1 (tiny variants for tests)."""
    return max(1, round(channels * width))


class _SuperRes(nn.Module):
    """Shared tail: optional resize to the exact patch size and the bicubic residual.

    Subclasses define body(x): (B, 3, h, w) -> (B, 3, h*S, w*S).
    """

    def __init__(self, scale: int, residual: bool, out_size: int | None) -> None:
        super().__init__()
        self.scale = scale
        self.residual = residual
        self.out_size = out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LR (B, 3, h, w) in [0, 1] -> SR (B, 3, out, out), or (B, 3, h*S, w*S) if out_size is None."""
        y = self.body(x)  # (B, 3, h*S, w*S)
        size = (self.out_size, self.out_size) if self.out_size else tuple(y.shape[-2:])
        if tuple(y.shape[-2:]) != size:
            y = F.interpolate(y, size=size, mode="bicubic", align_corners=False)  # x3: 63 -> 64
        if self.residual:
            y = y + F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return y


class ESPCN(_SuperRes):
    """Sub-pixel CNN: conv5x5(3->64) tanh, conv3x3(64->32) tanh, conv3x3(32->3*S^2), PixelShuffle(S)."""

    def __init__(
        self, scale: int, width: float = 1.0, residual: bool = True, out_size: int | None = PATCH
    ) -> None:
        super().__init__(scale, residual, out_size)
        c1, c2 = _ch(64, width), _ch(32, width)
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 5, padding=2),
            nn.Tanh(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.Tanh(),
        )
        self.to_subpixels = nn.Conv2d(c2, 3 * scale**2, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        if residual:  # start at the bicubic baseline
            nn.init.normal_(self.to_subpixels.weight, std=1e-3)
            nn.init.zeros_(self.to_subpixels.bias)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.to_subpixels(self.features(x)))  # (B, 3, h*S, w*S)


class FSRCNN(_SuperRes):
    """FSRCNN(d=56, s=12, m=4): feature 5x5, shrink 1x1, m mapping 3x3, expand 1x1 (PReLU after
    each), then a 9x9 deconvolution of stride S."""

    def __init__(
        self,
        scale: int,
        width: float = 1.0,
        residual: bool = True,
        out_size: int | None = PATCH,
        d: int = 56,
        s: int = 12,
        m: int = 4,
    ) -> None:
        super().__init__(scale, residual, out_size)
        d, s = _ch(d, width), _ch(s, width)
        layers: list[nn.Module] = [nn.Conv2d(3, d, 5, padding=2), nn.PReLU(d)]
        layers += [nn.Conv2d(d, s, 1), nn.PReLU(s)]
        for _ in range(m):
            layers += [nn.Conv2d(s, s, 3, padding=1), nn.PReLU(s)]
        layers += [nn.Conv2d(s, d, 1), nn.PReLU(d)]
        self.features = nn.Sequential(*layers)
        for layer in self.features:
            if isinstance(layer, nn.Conv2d):  # He init for PReLU, as in the FSRCNN paper
                nn.init.kaiming_normal_(layer.weight, a=0.25, nonlinearity="leaky_relu")
                nn.init.zeros_(layer.bias)
        # out = (h - 1) * S - 2 * 4 + 9 + (S - 1) = h * S exactly
        self.deconv = nn.ConvTranspose2d(d, 3, 9, stride=scale, padding=4, output_padding=scale - 1)
        nn.init.normal_(self.deconv.weight, std=1e-3)  # the paper's init; with residual: start at bicubic
        nn.init.zeros_(self.deconv.bias)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.features(x))  # (B, 3, h*S, w*S)


EXPERT_KINDS = {"espcn": ESPCN, "fsrcnn": FSRCNN}


def build_expert(
    kind: str, scale: int, width: float = 1.0, residual: bool = True, out_size: int | None = PATCH
) -> nn.Module:
    """An untrained expert of `kind` ("espcn" or "fsrcnn") upscaling by `scale` to out_size patches."""
    try:
        cls = EXPERT_KINDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown super-resolution expert {kind!r}; expected one of {', '.join(EXPERT_KINDS)}"
        ) from None
    if int(scale) != scale or scale < 2:
        raise ValueError(f"scale must be an integer >= 2, got {scale}")
    return cls(int(scale), width=width, residual=residual, out_size=out_size)
