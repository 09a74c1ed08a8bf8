"""FP8 weight storage for the transformer blocks' linear layers.

Each ``nn.Linear`` inside ``blocks.*`` (self/cross-attention q, k, v, o and the two FFN layers,
98% of the 1.3B parameters) becomes an ``FP8Linear``: a float8 weight [out, in] plus a float32
scale, per tensor ([]) or per output channel ([out, 1]), so ``weight_fp8 * scale`` is the
original weight. Embeddings, norms, modulation tables, biases and the head stay in the compute
dtype.

Sources: quantise float weights on load, or load pre-quantised files in ComfyUI's scaled-fp8
layout (marker key ``scaled_fp8``, per-layer ``<layer>.scale_weight``; the newer per-layer
``<layer>.weight_scale`` name is read the same way) or plain float8 tensors without scales
(scale 1).

Compute: ``torch._scaled_mm`` (activations quantised per call to e4m3fn with a per-tensor
scale) on CUDA devices of compute capability 8.9+, otherwise the weight is dequantised per
layer on the fly into the activation dtype. ``choose_fp8_matmul`` picks the path at run time,
probes it, and says why.
"""
import re

import torch
import torch.nn as nn

from .errors import SelfForcingError
from .linear import linear

FP8_FORMATS = ("e4m3fn", "e5m2")
GRANULARITIES = ("tensor", "channel")
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI scaled-fp8 / per-layer quantised names
DROPPED_SUFFIXES = (".scale_input", ".input_scale")  # activation scales: we scale activations per call
COMFY_MARKER = "scaled_fp8"  # empty tensor whose dtype names the file's float8 format


class FP8Error(SelfForcingError):
    """An FP8 request or FP8 file that cannot be honoured."""


def float8_dtype(fmt: str) -> torch.dtype:
    """torch dtype of an FP8 format name ("e4m3fn" or "e5m2"); FP8Error when torch lacks it."""
    if fmt not in FP8_FORMATS:
        raise FP8Error(f"unknown FP8 format {fmt!r}; choose one of {', '.join(FP8_FORMATS)} (or 'off')")
    dtype = getattr(torch, f"float8_{fmt}", None)
    if dtype is None:
        raise FP8Error(f"this torch ({torch.__version__}) has no float8 dtypes; FP8 weights need "
                       "torch >= 2.1. Set fp8 to 'off' or upgrade torch.")
    return dtype


def is_float8(tensor: torch.Tensor) -> bool:
    return tensor.dtype.is_floating_point and tensor.element_size() == 1


def quantise(weight: torch.Tensor, fmt: str = "e4m3fn", granularity: str = "tensor"):
    """Scale a float weight [out, in] into float8 range and cast.

    Returns (weight_fp8 [out, in], scale float32 [] or [out, 1]) with ``weight_fp8 * scale ~= weight``;
    each tensor's / row's largest magnitude maps to the format's largest finite value.
    """
    if granularity not in GRANULARITIES:
        raise FP8Error(f"unknown FP8 scale granularity {granularity!r}; choose 'tensor' or 'channel'")
    dtype = float8_dtype(fmt)
    weight = weight.float()
    largest = torch.finfo(dtype).max
    amax = weight.abs().amax() if granularity == "tensor" else weight.abs().amax(dim=1, keepdim=True)
    scale = (amax / largest).clamp_min(torch.finfo(torch.float32).tiny)  # all-zero rows keep scale > 0
    return (weight / scale).clamp(-largest, largest).to(dtype), scale


def checked_scale(name: str, scale: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """A file's scale for layer ``name`` as float32 [] or [out, 1]; FP8Error for corrupt ones."""
    if scale is None:
        return torch.ones(())  # plain float8 tensor: stored values are the weights
    if not scale.dtype.is_floating_point or is_float8(scale):
        raise FP8Error(f"scale tensor of {name} has dtype {scale.dtype}; expected a float32/16 scale. "
                       "The file is corrupt or in an unknown quantisation layout.")
    scale = scale.float()
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif scale.numel() == out_features:
        scale = scale.reshape(out_features, 1)
    else:
        raise FP8Error(f"scale tensor of {name} has shape {tuple(scale.shape)}; expected one value or "
                       f"one per output channel ({out_features}). The file is corrupt or block-quantised.")
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise FP8Error(f"scale tensor of {name} holds non-finite or non-positive values "
                       f"(min {scale.min().item():.3g}, max {scale.max().item():.3g}); the file is corrupt. "
                       "Re-download or re-quantise it.")
    return scale


class FP8Linear(nn.Module):
    """``y = x @ (weight * scale_weight).T + bias`` with a float8 ``weight`` buffer.

    weight: [out, in] float8; scale_weight: float32 [] or [out, 1]; bias: [out] (compute dtype) or None.
    ``matmul`` is "dequantise" or "scaled_mm" (see ``choose_fp8_matmul``). x: [..., in] -> [..., out].
    """

    def __init__(self, weight: torch.Tensor, scale_weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale_weight", scale_weight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.matmul = "dequantise"

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, {self.weight.dtype}, "
                f"per-{self.granularity} scale, matmul={self.matmul}")

    @property
    def granularity(self) -> str:
        return "tensor" if self.scale_weight.numel() == 1 else "channel"

    def dequantised(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight [out, in] in ``dtype``."""
        return self.weight.to(dtype) * self.scale_weight.to(dtype)

    def set_weight(self, weight: torch.Tensor):
        """Re-quantise a new float weight [out, in] (e.g. with a LoRA merged in): same format and granularity."""
        fmt = str(self.weight.dtype).removeprefix("torch.float8_")
        stored, scale = quantise(weight.to(self.weight.device), fmt, self.granularity)
        self.weight, self.scale_weight = stored, scale

    def forward(self, x):
        if self.matmul == "scaled_mm":
            return self.scaled_mm(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return linear(x, self.dequantised(x.dtype), bias)

    def scaled_mm(self, x):
        """FP8 x FP8 matmul: activations get one dynamic per-tensor e4m3fn scale per call."""
        rows = x.reshape(-1, self.in_features)
        activation_max = torch.finfo(torch.float8_e4m3fn).max
        x_scale = (rows.abs().amax().float() / activation_max).clamp_min(torch.finfo(torch.float32).tiny)
        rows_fp8 = (rows / x_scale.to(rows.dtype)).clamp(-activation_max, activation_max).to(torch.float8_e4m3fn)
        per_tensor = self.scale_weight.numel() == 1
        weight_scale = self.scale_weight if per_tensor else torch.ones((), device=x.device)
        out = torch._scaled_mm(rows_fp8, self.weight.t(), scale_a=x_scale, scale_b=weight_scale,
                               out_dtype=x.dtype)
        if not per_tensor:
            out = out * self.scale_weight.view(1, -1).to(out.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)


def fp8_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers FP8 applies to: every ``nn.Linear`` / ``FP8Linear`` inside ``blocks``."""
    return {name: module for name, module in model.named_modules()
            if name.startswith("blocks.") and isinstance(module, (nn.Linear, FP8Linear))}


def split_fp8_scales(state_dict: dict) -> tuple[dict, dict]:
    """Separate quantisation metadata from weights (canonical Wan names).

    Returns (weights, scales): ``scales`` maps a layer name (``blocks.0.ffn.0``) to its scale
    tensor; the ``scaled_fp8`` marker and activation scales are dropped.
    """
    weights, scales = {}, {}
    for key, value in state_dict.items():
        if key == COMFY_MARKER or key.endswith(DROPPED_SUFFIXES):
            continue
        suffix = next((s for s in SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix:
            scales[key[:-len(suffix)]] = value
        else:
            weights[key] = value
    return weights, scales


def holds_float8(state_dict: dict) -> bool:
    return any(is_float8(value) for value in state_dict.values())


def dequantise(name: str, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A stored weight times its file scale (scaled-fp8 semantics), in float32. weight: [out, ...]."""
    scale = checked_scale(name, scale, weight.shape[0])
    return weight.float() * scale.reshape(scale.shape[:1] + (1,) * (weight.ndim - 1))


def load_fp8_weights(model: nn.Module, state_dict: dict, scales: dict, fp8: str = "e4m3fn",
                     granularity: str = "tensor", dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Fill ``model`` (built on the meta device) from a canonical state dict, with FP8 block linears.

    state_dict/scales: as returned by ``split_fp8_scales`` (names verified against the model).
    fp8: "e4m3fn" / "e5m2" stores the block linears in float8: float weights are quantised on
    load, float8 weights keep their stored format and scales. "off" loads every tensor in
    ``dtype`` (a pre-quantised file is dequantised). Everything outside the block linears is
    loaded in ``dtype``.
    """
    if fp8 != "off":
        float8_dtype(fp8)
    stray = sorted(name for name in scales if f"{name}.weight" not in state_dict)
    if stray:
        raise FP8Error(f"scale tensors without a weight: {', '.join(stray[:5])}; the file does not match this model")
    if fp8 != "off":
        for name in fp8_layers(model):
            weight, bias, scale = state_dict[f"{name}.weight"], state_dict.get(f"{name}.bias"), scales.get(name)
            if is_float8(weight):
                stored = weight, checked_scale(name, scale, weight.shape[0])
            else:
                stored = quantise(weight if scale is None else dequantise(name, weight, scale), fp8, granularity)
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).register_module(
                child, FP8Linear(*stored, None if bias is None else bias.to(dtype)))
    rest = {}
    for key, value in state_dict.items():
        layer = key.rpartition(".")[0]
        if isinstance(model.get_submodule(layer), FP8Linear):
            continue
        if key.endswith(".weight") and (is_float8(value) or layer in scales):
            value = dequantise(layer, value, scales.get(layer))
        rest[key] = value.to(dtype)
    result = model.load_state_dict(rest, strict=False, assign=True)
    unfilled = [k for k in result.missing_keys if not isinstance(model.get_submodule(k.rpartition(".")[0]), FP8Linear)]
    if unfilled or result.unexpected_keys:
        raise FP8Error(f"FP8 load left tensors unfilled: missing {unfilled[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model


def choose_fp8_matmul(model: nn.Module, device) -> str:
    """Pick and set the FP8 compute path of every ``FP8Linear`` for ``device``; returns a report line.

    ``scaled_mm`` needs CUDA with compute capability 8.9+ (Ada, Hopper, Blackwell) and must pass a
    probe with the model's own float8 formats; otherwise weights are dequantised per layer.
    """
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    if not layers:
        return "FP8: off"
    device = torch.device(device)
    formats = sorted({str(m.weight.dtype).removeprefix("torch.float8_") for m in layers})
    path, reason = "dequantise", f"{device.type} device has no FP8 matmul"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            reason = f"CUDA compute capability {capability[0]}.{capability[1]} < 8.9"
        elif any(m.in_features % 16 or m.out_features % 16 for m in layers):
            reason = "layer widths are not multiples of 16, as torch._scaled_mm requires"
        else:
            try:
                for dtype in {m.weight.dtype for m in layers}:
                    probe = torch.zeros(16, 16, device=device)
                    torch._scaled_mm(probe.to(torch.float8_e4m3fn), probe.to(dtype).t(), out_dtype=torch.bfloat16,
                                     scale_a=torch.ones((), device=device), scale_b=torch.ones((), device=device))
                path, reason = "scaled_mm", f"CUDA compute capability {capability[0]}.{capability[1]}"
            except (RuntimeError, TypeError) as error:
                reason = f"torch._scaled_mm failed on this device ({str(error).splitlines()[0]})"
    for layer in layers:
        layer.matmul = path
    granularity = sorted({m.granularity for m in layers})
    how = "FP8 matmul (torch._scaled_mm)" if path == "scaled_mm" else "dequantise per layer"
    return (f"FP8: {len(layers)} linear layers in {'/'.join(formats)}, per-{'/'.join(granularity)} scales; "
            f"compute: {how} ({reason})")
