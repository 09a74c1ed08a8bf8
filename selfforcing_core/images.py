"""Fitting pictures to the video size: scale to cover and crop the centre, or stretch."""
import math

import torch
import torch.nn.functional as F


def resize_to(images: torch.Tensor, height: int, width: int, keep_aspect: bool = True) -> torch.Tensor:
    """Images or frames [N, 3, H, W] in [0, 1] -> [N, 3, height, width] (antialiased bilinear).

    keep_aspect: scale to cover the target and crop the centre; otherwise stretch.
    """
    in_height, in_width = images.shape[-2:]
    if (in_height, in_width) == (height, width):
        return images
    size = (height, width)
    if keep_aspect:
        scale = max(height / in_height, width / in_width)
        size = (max(height, math.ceil(in_height * scale - 1e-6)), max(width, math.ceil(in_width * scale - 1e-6)))
    images = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return images[:, :, top:top + height, left:left + width].clamp(0, 1)
