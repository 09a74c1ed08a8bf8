"""The trainer's loss history as text and as an image (the trainer node's preview and output)."""
import math

import numpy as np
import torch

LOSS_COLOURS = {"generator": (220, 60, 60), "critic": (60, 120, 220), "real": (40, 160, 80)}


def format_losses(history: list[dict]) -> str:
    """The latest recorded value of each loss, e.g. ``generator 0.01234, critic 0.5, real 0.98``."""
    latest = {name: r[name] for r in history for name in LOSS_COLOURS if r.get(name) is not None}
    return ", ".join(f"{name} {value:.4g}" for name, value in latest.items())


def draw_loss_curves(history: list[dict], width: int = 640, height: int = 360):
    """Plot the recorded losses, each curve scaled to its own range (labelled with min/max). -> PIL RGB image."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    last_step = max([r["step"] for r in history] + [1])
    for row, (name, colour) in enumerate(LOSS_COLOURS.items()):
        points = [(r["step"], r[name]) for r in history if r.get(name) is not None and math.isfinite(r[name])]
        if not points:
            continue
        low, high = min(v for _, v in points), max(v for _, v in points)
        span = (high - low) or 1.0
        xy = [(10 + (width - 20) * s / last_step, height - 10 - (height - 40) * (v - low) / span) for s, v in points]
        draw.line(xy if len(xy) > 1 else xy * 2, fill=colour, width=2)
        draw.text((10, 4 + 10 * row), f"{name}: {low:.4g} .. {high:.4g} (last {points[-1][1]:.4g})", fill=colour)
    return image


def loss_curve_image(history: list[dict], width: int = 640, height: int = 360) -> torch.Tensor:
    """``draw_loss_curves`` as an RGB image [height, width, 3] float in [0, 1] (ComfyUI IMAGE layout without batch)."""
    return torch.from_numpy(np.array(draw_loss_curves(history, width, height))).float() / 255
