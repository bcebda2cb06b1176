"""Serving hooks of the superres task (tasks.base.Task, serving section).

The client POSTs a whole PNG/JPEG image; the sensor side cuts it into 64x64 patches on the
training grid, the gate routes every patch (the paper's Fig. 7), and only the chosen expert's
bicubic LR patch crosses to that expert. The response reassembles the super-resolved patches into
the image (cropped to the 64-pixel grid, as in training) and returns it as base64 PNG.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from tasks.base import InputTooSmall, ServedInput
from tasks.images import decode_request_image
from tasks.superres import patches



def decode_request(body: bytes, K: int) -> ServedInput:  # noqa: N803 - the paper's K
    """PNG/JPEG bytes -> one routing unit per 64x64 patch (row-major on the image's grid)."""
    rgb = decode_request_image(body)  # the training data's conventions (tasks/images.py)
    height, width = rgb.shape[:2]
    if height < patches.PATCH or width < patches.PATCH:
        raise InputTooSmall(f"{width}x{height} image is smaller than one {patches.PATCH}x{patches.PATCH} "
                            "patch; send a larger image")
    hr, pos = patches.to_patches(rgb)  # (U, 64, 64, 3), (U, 2)
    return ServedInput(gate_input=hr, full_data_cost=float(hr.size * K), full_wire_bytes=int(hr.nbytes),
                       context={"hr": hr, "pos": pos, "shape": (height, width)})


def request_inputs(request: ServedInput, scale: int, units: np.ndarray) -> np.ndarray:
    """(len(units), h, h, 3) uint8 bicubic LR patches: P_n, made on the sensor."""
    return patches.downscale(request.context["hr"][units], scale)


def serve_expert(model: torch.nn.Module, x: np.ndarray, device: torch.device) -> list[np.ndarray]:
    """LR patches (B, h, w, 3) uint8 -> SR patches, one (64, 64, 3) uint8 array each."""
    lr = torch.as_tensor(np.asarray(x), device=device).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, h, w)
    with torch.no_grad():
        sr = model(lr).clamp(0, 1)  # (B, 3, 64, 64)
    out = (sr * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, 64, 64, 3)
    return list(out)


def response(request: ServedInput, outputs: list[np.ndarray]) -> dict:
    """The super-resolved image as base64 PNG, on the 64-pixel grid of the input."""
    pos = request.context["pos"]
    height, width = request.context["shape"]
    grid = (int(pos[:, 0].max()) + patches.PATCH, int(pos[:, 1].max()) + patches.PATCH)
    image = patches.from_patches(np.stack(outputs), pos, (*grid, 3))  # (H', W', 3) uint8
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return {"image_png_base64": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "width": grid[1], "height": grid[0], "input_width": width, "input_height": height,
            "patches": len(pos)}
