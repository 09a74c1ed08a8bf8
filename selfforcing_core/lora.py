"""LoRA adapters for the causal Wan generator: several named adapter sets on one frozen model.

Training keeps one frozen base model and switches between adapter sets (the generator, the
critic's "fake" adapter, the teacher's "real" adapter) instead of holding three model copies.
``LoRALinear`` wraps any linear-like module (``nn.Linear`` or a quantised linear with its own
forward) and adds ``scale * up(down(x))`` of the active adapter, with ``scale = strength * alpha /
rank``.

File layout (``save_lora``; the layout ComfyUI's LoRA loader reads for Wan models):
    ``diffusion_model.{module}.lora_down.weight``  [rank, in_features]
    ``diffusion_model.{module}.lora_up.weight``    [out_features, rank]
    ``diffusion_model.{module}.alpha``             scalar
with ``{module}`` the original Wan2.1 name (``blocks.0.self_attn.q``). Files of other layouts are
read by ``lora_files``; ``merge_lora`` and ``attach_lora`` put any of them on a model.
"""
import contextlib
import os

import torch
import torch.nn as nn

from .atomic import save_safetensors
from .checkpoint import CheckpointError
from .linear import linear
from .lora_files import LoRAFile, read_lora, read_lora_file

DEFAULT_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                   "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
FILE_PREFIX = "diffusion_model."


class LoRALinear(nn.Module):
    """A frozen linear plus named low-rank adapters; one (or none) is active at a time.

    x: [..., in_features] -> [..., out_features].
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        weight = base.weight
        self.out_features, self.in_features = weight.shape
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        self.alpha: dict[str, float] = {}
        self.strength: dict[str, float] = {}
        self.active: str | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def add_adapter(self, name: str, rank: int, alpha: float, generator: torch.Generator | None = None):
        """New adapter: down ~ Kaiming-uniform (drawn on the CPU from ``generator``), up = 0, so the
        wrapped layer is unchanged."""
        weight = self.base.weight
        down = torch.empty(rank, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(down, a=5 ** 0.5, generator=generator)
        self.down[name] = nn.Parameter(down.to(weight.device))
        self.up[name] = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32, device=weight.device))
        self.alpha[name], self.strength[name] = float(alpha), 1.0

    def scale(self, name: str) -> float:
        return self.strength[name] * self.alpha[name] / self.down[name].shape[0]

    def forward(self, x):
        out = self.base(x)
        name = self.active
        if name is None or self.strength[name] == 0:
            return out
        down, up = self.down[name], self.up[name]
        low = linear(x.to(down.dtype), down)
        return out + (linear(low, up) * self.scale(name)).to(out.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter as a dense weight update [out_features, in_features] (float32)."""
        return (self.up[name].float() @ self.down[name].float()) * self.scale(name)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` of a model by its module name (original Wan names)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def _parent_and_attr(model: nn.Module, name: str):
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def inject_lora(model: nn.Module, adapter: str, rank: int, alpha: float | None = None,
                targets=DEFAULT_TARGETS, generator: torch.Generator | None = None) -> list[str]:
    """Add adapter ``adapter`` to every linear whose name ends with one of ``targets``.

    Linears are wrapped in ``LoRALinear`` on first use (later adapters reuse the wrapper).
    alpha defaults to rank (scale 1); ``generator`` makes the initialisation reproducible.
    Returns the adapted module names.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    wrapped = lora_layers(model)
    names = [name for name, module in model.named_modules()
             if not isinstance(module, LoRALinear) and not name.endswith(".base") and hasattr(module, "weight")
             and getattr(module.weight, "ndim", 0) == 2 and any(name.endswith(t) for t in targets)]
    names = sorted(set(names) | {n for n in wrapped if any(n.endswith(t) for t in targets)})
    if not names:
        raise ValueError(f"no linear layer matches the LoRA targets {list(targets)}; use names such as "
                         f"{', '.join(DEFAULT_TARGETS[:3])}")
    for name in names:
        layer = wrapped.get(name)
        if layer is None:
            parent, attr = _parent_and_attr(model, name)
            layer = LoRALinear(getattr(parent, attr))
            setattr(parent, attr, layer)
        if adapter in layer.down:
            raise ValueError(f"adapter {adapter!r} already exists on {name}")
        layer.add_adapter(adapter, rank, rank if alpha is None else alpha, generator)
    return names


def remove_lora(model: nn.Module):
    """Put every wrapped linear back in place, dropping all adapters (the model is as before injection)."""
    for name in lora_layers(model):
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, getattr(parent, attr).base)


def adapter_parameters(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """The trainable tensors of one adapter, ``{"<module>.down": ..., "<module>.up": ...}`` in a fixed order."""
    params = {}
    for name, layer in sorted(lora_layers(model).items()):
        if adapter in layer.down:
            params[f"{name}.down"], params[f"{name}.up"] = layer.down[adapter], layer.up[adapter]
    return params


@contextlib.contextmanager
def active_adapter(model: nn.Module, adapter: str | None, strength: float | None = None):
    """Run the model with ``adapter`` active (None: the bare base model), optionally at a strength."""
    layers = lora_layers(model).values()
    saved = [(layer.active, dict(layer.strength)) for layer in layers]
    try:
        for layer in layers:
            layer.active = adapter if adapter in layer.down else None
            if strength is not None and layer.active is not None:
                layer.strength[adapter] = strength
        yield model
    finally:
        for layer, (active, strengths) in zip(layers, saved):
            layer.active, layer.strength = active, strengths


def adapter_state_dict(model: nn.Module, adapter: str, params: dict[str, torch.Tensor] | None = None) -> dict:
    """One adapter in the file layout (see module docstring). ``params`` optionally replaces the
    live tensors (e.g. EMA shadows), keyed like ``adapter_parameters``."""
    state = {}
    for name, layer in sorted(lora_layers(model).items()):
        if adapter not in layer.down:
            continue
        down, up = layer.down[adapter], layer.up[adapter]
        if params is not None:
            down, up = params[f"{name}.down"], params[f"{name}.up"]
        state[f"{FILE_PREFIX}{name}.lora_down.weight"] = down.detach().float().cpu().contiguous()
        state[f"{FILE_PREFIX}{name}.lora_up.weight"] = up.detach().float().cpu().contiguous()
        state[f"{FILE_PREFIX}{name}.alpha"] = torch.tensor(layer.alpha[adapter], dtype=torch.float32)
    if not state:
        raise ValueError(f"the model has no adapter named {adapter!r}")
    return state


def save_lora(model: nn.Module, adapter: str, path, params: dict | None = None, metadata: dict | None = None):
    """Save one adapter to ``path`` (.safetensors, atomically) in the ComfyUI-readable layout."""
    save_safetensors(adapter_state_dict(model, adapter, params), path, metadata)


def load_adapter(model: nn.Module, adapter: str, source):
    """Copy a saved LoRA into an existing adapter of the model (e.g. to resume or evaluate)."""
    layers = lora_layers(model)
    for name, (down, up, alpha) in read_lora(source).items():
        layer = layers.get(name)
        if layer is None or adapter not in layer.down:
            raise ValueError(f"LoRA module {name} has no adapter {adapter!r} in this model")
        if layer.down[adapter].shape != down.shape or layer.up[adapter].shape != up.shape:
            raise ValueError(f"LoRA {name}: rank or shape {tuple(down.shape)} differs from the adapter "
                             f"{tuple(layer.down[adapter].shape)}")
        with torch.no_grad():
            layer.down[adapter].copy_(down)
            layer.up[adapter].copy_(up)
        layer.alpha[adapter] = alpha


def merge_lora(model: nn.Module, source, strength: float = 1.0) -> int:
    """Add a LoRA into the model's linear weights in place (inference); returns the layer count.

    Float weights get the update added; FP8 weights are dequantised, updated and re-quantised.

    ``merge_lora(model, same_source, -strength)`` undoes it (up to rounding in the weight dtype).
    """
    lora = read_lora_file(source)
    adapters = lora.adapters
    where = "the LoRA" if isinstance(source, dict) else f"LoRA {os.path.basename(source)}"
    linears = {name: module for name, module in model.named_modules()
               if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.ndim == 2}
    parameters = dict(model.named_parameters())
    for name, diff in lora.diffs.items():
        if name not in parameters or parameters[name].shape != diff.shape:
            raise CheckpointError(f"{where}: the diff for {name} {tuple(diff.shape)} does not fit this model; "
                                  "use a LoRA made for this model size")
        with torch.no_grad():
            param = parameters[name]
            param.copy_((param.float() + strength * diff.to(param.device)).to(param.dtype))
    for name, (down, up, alpha) in adapters.items():
        layer = linears.get(name)
        if layer is None:
            raise CheckpointError(f"{where} targets {name}, which is not a linear layer of this model (a LoRA "
                                  "for another architecture?); use a LoRA made for Wan2.1 1.3B")
        weight = layer.weight
        if weight.shape != (up.shape[0], down.shape[1]):
            raise CheckpointError(f"{where}: {name} is {up.shape[0]}x{down.shape[1]}, the layer is "
                                  f"{tuple(weight.shape)}; use a LoRA made for this model size")
        delta = (up.float() @ down.float()) * (strength * alpha / down.shape[0])
        with torch.no_grad():
            if hasattr(layer, "set_weight"):  # FP8Linear: merge in float, then re-quantise with a new scale
                layer.set_weight(layer.dequantised(torch.float32) + delta.to(weight.device))
            else:
                weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return len(adapters) + len(lora.diffs)


class AttachedLoRA:
    """A LoRA file on a model whose strength can change between runs without re-loading the base:
    low-rank parts as unmerged adapters (``LoRALinear``, in the weights' dtype when it is 16-bit,
    else float32), full-weight diffs merged reversibly (the original parameters are kept, so any
    strength is exact)."""

    def __init__(self, model: nn.Module, lora: LoRAFile, adapter: str, strength: float):
        self.model, self.lora, self.adapter, self.loaded_strength = model, lora, adapter, strength
        for name, (down, up, layer_alpha) in lora.adapters.items():
            try:
                parent, attr = _parent_and_attr(model, name)
                layer = getattr(parent, attr)
            except AttributeError:
                raise ValueError(f"LoRA targets {name}, which this model does not have "
                                 "(a LoRA for another architecture?)") from None
            if not isinstance(layer, LoRALinear):
                layer = LoRALinear(layer)
                setattr(parent, attr, layer)
            if layer.weight.shape != (up.shape[0], down.shape[1]):
                raise ValueError(f"LoRA {name} is {up.shape[0]}x{down.shape[1]}, the layer is "
                                 f"{tuple(layer.weight.shape)}")
            weight = layer.weight
            dtype = weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.float32
            layer.down[adapter] = nn.Parameter(down.to(weight.device, dtype), requires_grad=False)
            layer.up[adapter] = nn.Parameter(up.to(weight.device, dtype), requires_grad=False)
            layer.alpha[adapter] = layer_alpha
            layer.active = adapter
        parameters = dict(model.named_parameters())
        self.diffs = {}
        for name, diff in lora.diffs.items():
            param = parameters.get(name.replace(".weight", ".base.weight").replace(".bias", ".base.bias"),
                                   parameters.get(name))
            if param is None or param.shape != diff.shape:
                raise ValueError(f"LoRA diff for {name} {tuple(diff.shape)} does not fit this model"
                                 f"{'' if param is None else f' ({tuple(param.shape)})'}")
            self.diffs[name] = (param, param.detach().clone(), diff.to(param.device, torch.float32))
        self.set_strength(strength)

    def set_strength(self, strength: float):
        """Scale every part of the LoRA to ``strength`` (0: the bare base model)."""
        self.strength = strength
        for layer in lora_layers(self.model).values():
            if self.adapter in layer.strength or self.adapter in layer.down:
                layer.strength[self.adapter] = strength
        with torch.no_grad():
            for param, original, diff in self.diffs.values():
                param.copy_((original.float() + strength * diff).to(param.dtype))

    def describe(self) -> str:
        return f"{self.lora.describe()}; strength {self.strength:g}, unmerged (no re-load to change it)"


def attach_lora(model: nn.Module, source, adapter: str = "file", strength: float = 1.0,
                alpha: float | None = None) -> AttachedLoRA:
    """Put a LoRA file (any layout ``read_lora_file`` reads) on the model, active, at ``strength``."""
    return AttachedLoRA(model, read_lora_file(source, alpha), adapter, strength)
