"""Reading LoRA files of every layout users bring into one form (``LoRAFile``, in Wan module names).

Layouts: ComfyUI ``diffusion_model.<module>.lora_down/lora_up.weight`` + ``.alpha`` (what
``lora.save_lora`` writes); PEFT ``base_model.model.<module>.lora_A/lora_B.weight`` (``.safetensors``
with or without ``adapter_config.json``, or LongLive's ``.pt`` with ``generator_lora``); Kohya
``lora_unet_*``; diffusers module names; the prefixes ``transformer.``, ``model.diffusion_model.``
or none; and ``.diff`` / ``.diff_b`` / ``.diff_m`` full-weight tensors. ``lora.py`` puts them on a
model.
"""
import json
import os
import re
from dataclasses import dataclass

import torch

from .checkpoint import DIFFUSERS_RENAMES, CheckpointError, read_tensors

READ_PREFIXES = ("diffusion_model.", "transformer.", "model.diffusion_model.", "base_model.model.", "")
PT_ENTRIES = ("generator_lora",)  # LongLive's lora.pt: {"generator_lora": {...}, "critic_lora": {...}, "step"}
KOHYA_PREFIX = "lora_unet_"
KOHYA_TOKENS = ("self_attn", "cross_attn", "norm_q", "norm_k", "time_embedding", "text_embedding",
                "time_projection", "patch_embedding")
DIFF_SUFFIXES = {"diff": "weight", "diff_b": "bias", "diff_m": "modulation"}  # -> the parameter they add to


@dataclass
class LoRAFile:
    """A LoRA file in Wan module names, whatever layout it came in.

    adapters: {module: (down [r, in], up [out, r], alpha)}; diffs: {parameter name: additive
    delta} (``.diff`` weights, ``.diff_b`` biases, ``.diff_m`` modulation tables of distillation
    LoRAs); layout: 'comfyui', 'peft' or 'kohya'; alpha_source: where alpha came from, for ``info``.
    """

    adapters: dict
    diffs: dict
    layout: str
    alpha_source: str

    def describe(self) -> str:
        parts = [f"{len(self.adapters)} low-rank layers"] if self.adapters else []
        if self.diffs:
            parts.append(f"{len(self.diffs)} full-weight diffs")
        return f"{self.layout} layout, {' + '.join(parts)}; alpha {self.alpha_source}"


def kohya_module_name(stem: str) -> str:
    """``lora_unet_blocks_0_self_attn_q`` -> ``blocks.0.self_attn.q``."""
    name = stem[len(KOHYA_PREFIX):]
    for index, token in enumerate(KOHYA_TOKENS):
        name = name.replace(token, f"\0{index}\0")
    name = name.replace("_", ".")
    for index, token in enumerate(KOHYA_TOKENS):
        name = name.replace(f"\0{index}\0", token)
    return name


def module_name(stem: str) -> tuple[str, str]:
    """A key stem in any known layout -> (Wan module name, layout)."""
    if stem.startswith(KOHYA_PREFIX):
        return kohya_module_name(stem), "kohya"
    prefix = next(p for p in READ_PREFIXES if stem.startswith(p))
    layout = "peft" if prefix == "base_model.model." else "comfyui"
    name = stem[len(prefix):] + "."  # diffusers module names -> Wan names (the patterns end with a dot)
    for pattern, replacement in DIFFUSERS_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name[:-1], layout


def adapter_config_alpha(path) -> tuple[float | None, int | None]:
    """(lora_alpha, r) from a PEFT ``adapter_config.json`` beside ``path``, or (None, None)."""
    if path is None:
        return None, None
    config = os.path.join(os.path.dirname(str(path)), "adapter_config.json")
    if not os.path.isfile(config):
        return None, None
    values = json.loads(open(config).read())
    return values.get("lora_alpha"), values.get("r")


def read_lora_file(source, alpha: float | None = None) -> LoRAFile:
    """Read a LoRA file (or state dict) of any supported layout into ``LoRAFile``.

    Layouts: ComfyUI ``diffusion_model.<module>.lora_down/lora_up.weight`` + ``.alpha``; PEFT
    ``base_model.model.<module>.lora_A/lora_B.weight`` (``.safetensors`` with or without an
    ``adapter_config.json`` beside it, or LongLive's ``.pt`` with ``generator_lora``); Kohya
    ``lora_unet_blocks_N_<module>.lora_down/lora_up.weight`` + ``.alpha``; plus ``.diff``,
    ``.diff_b`` and ``.diff_m`` tensors. Alpha: stored in the file, else ``lora_alpha`` of
    ``adapter_config.json``, else ``alpha`` (None: the rank, scale 1). Non-finite tensors are refused.
    """
    path = None if isinstance(source, dict) else source
    tensors = source if path is None else read_lora_tensors(path)
    where = "LoRA" if path is None else f"LoRA {os.path.basename(path)}"
    for key, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where}: tensor {key} holds non-finite values (NaN or Inf); the file is "
                                  "damaged, use another copy")
    config_alpha, _ = adapter_config_alpha(path)
    pattern = re.compile(r"^(.*)\.(lora_down|lora_A)(\.default)?\.weight$")
    adapters, diffs, layouts, sources = {}, {}, set(), set()
    for key, down in tensors.items():
        match = pattern.match(key)
        if match:
            stem, kind, default = match.groups()
            up_name = "lora_up" if kind == "lora_down" else "lora_B"
            up = tensors.get(f"{stem}.{up_name}{default or ''}.weight")
            if up is None:
                raise CheckpointError(f"{where}: tensor {key} has no matching {up_name} tensor")
            name, layout = module_name(stem)
            layouts.add(layout)
            stored = tensors.get(f"{stem}.alpha")
            if stored is not None:
                layer_alpha, origin = float(stored), "stored in the file"
            elif config_alpha is not None:
                layer_alpha, origin = float(config_alpha), f"{config_alpha:g} from adapter_config.json"
            elif alpha is not None:
                layer_alpha, origin = float(alpha), f"{alpha:g} as set (the file stores none)"
            else:
                layer_alpha, origin = float(down.shape[0]), "= rank (the file stores none: scale 1, times strength)"
            sources.add(origin)
            adapters[name] = (down, up, layer_alpha)
            continue
        stem, _, suffix = key.rpartition(".")
        if suffix in DIFF_SUFFIXES:
            name, layout = module_name(stem)
            layouts.add(layout)
            diffs[f"{name}.{DIFF_SUFFIXES[suffix]}"] = tensors[key]
    if not adapters and not diffs:
        sample = ", ".join(sorted(tensors)[:4]) or "(empty)"
        raise CheckpointError(f"{where}: no LoRA tensors found (expected '<module>.lora_down.weight', "
                              f"'lora_A.weight', 'lora_unet_...' or '.diff' names); keys such as {sample}")
    return LoRAFile(adapters, diffs, "+".join(sorted(layouts)), "; ".join(sorted(sources)) or "not used")


def read_lora_tensors(path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file: ``.safetensors``, or a ``.pt``/``.pth`` read with ``weights_only``
    (LongLive's dict yields its ``generator_lora`` entry), through ``checkpoint.read_tensors`` (its
    clear errors, NaN / Inf refused)."""
    return read_tensors(path, entries=PT_ENTRIES)


def read_lora(source, alpha: float | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """LoRA file or state dict -> {wan module name: (down [r, in], up [out, r], alpha)} (see ``read_lora_file``)."""
    return read_lora_file(source, alpha).adapters
