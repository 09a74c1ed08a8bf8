"""Speed and memory options of the generator, as one bundle the loader and sampler pass through.

    options = RuntimeOptions(fp8="e4m3fn", compile=True, offload_blocks=10)
    model, report = load_with_options("self_forcing_dmd.pt", options, dtype="bf16", device="cuda")

Order: FP8 conversion while loading, LoRA merges, then block offload (moves the model to the
device), then the FP8 compute path for that device, then compilation. ``report`` lists what was done and why
(one line per option), for the node to show.
"""
from dataclasses import dataclass

import torch

from .checkpoint import describe_auto_dtype, load_generator
from .compile import compile_blocks
from .fp8 import FP8_FORMATS, GRANULARITIES, choose_fp8_matmul
from .linear import describe_cpu_kernel
from .lora import attach_lora, merge_lora
from .offload import offload_blocks


@dataclass(frozen=True)
class RuntimeOptions:
    fp8: str = "off"  # "off", "e4m3fn" or "e5m2": block linear weights stored in float8
    fp8_granularity: str = "tensor"  # "tensor" or "channel": one scale per weight or per output row
    compile: bool = False  # torch.compile each transformer block (first block takes much longer)
    offload_blocks: int = 0  # transformer blocks kept in CPU memory, streamed to the device per call

    def __post_init__(self):
        if self.fp8 not in ("off", *FP8_FORMATS):
            raise ValueError(f"fp8 must be 'off' or one of {', '.join(FP8_FORMATS)}, got {self.fp8!r}")
        if self.fp8_granularity not in GRANULARITIES:
            raise ValueError(f"fp8_granularity must be one of {', '.join(GRANULARITIES)}, got {self.fp8_granularity!r}")
        if self.offload_blocks < 0:
            raise ValueError(f"offload_blocks must be >= 0, got {self.offload_blocks}")


def load_with_options(path_or_state_dict, options: RuntimeOptions = RuntimeOptions(), dtype="auto",
                      device="cpu", loras=(), unmerged: bool = False, **load_kwargs):
    """``load_generator`` plus LoRAs (``[(path or state dict, strength)]``, before FP8 compute, offload
    and compilation see them) and the runtime options. Returns (model, report lines).

    LoRAs are merged into the weights (fastest per block), or with ``unmerged`` attached beside
    them (one LoRA: each layer runs one adapter), listed in ``model.unmerged_loras``: their strength
    then changes without a re-load (``scale_unmerged_loras``).
    """
    if unmerged and len(loras) > 1:
        raise ValueError(f"unmerged LoRAs: {len(loras)} given, one can stay unmerged (each layer runs one adapter); "
                         "merge the others, or use one LoRA")
    model = load_generator(path_or_state_dict, dtype=dtype, device="cpu", fp8=options.fp8,
                           fp8_granularity=options.fp8_granularity, compute_device=device, **load_kwargs)
    report = [describe_auto_dtype(model.patch_embedding.weight.dtype, device)] if dtype == "auto" else []
    model.unmerged_loras = [attach_lora(model, source, f"lora{index + 1}", strength)
                            for index, (source, strength) in enumerate(loras) if unmerged]
    report += [f"LoRA {index + 1}: {attached.describe()}" for index, attached in enumerate(model.unmerged_loras)]
    report += [f"LoRA {index + 1}: {merge_lora(model, source, strength)} layers merged at strength {strength}"
               for index, (source, strength) in enumerate(loras) if not unmerged]
    report += [offload_blocks(model, options.offload_blocks, device), choose_fp8_matmul(model, device)]
    report += [describe_cpu_kernel()] if torch.device(device).type == "cpu" else []
    if options.compile:
        report.append(compile_blocks(model, device))
    return model, report


def scale_unmerged_loras(model, multiplier: float) -> str:
    """Set every unmerged LoRA of a ``load_with_options`` model to its loaded strength times
    ``multiplier`` (no re-load; 0: the bare base model). Returns a line for ``info`` ('' without one)."""
    attached = getattr(model, "unmerged_loras", [])
    for lora in attached:
        lora.set_strength(lora.loaded_strength * multiplier)
    return "; ".join(f"unmerged LoRA at strength {lora.strength:g} ({lora.loaded_strength:g} x {multiplier:g})"
                     for lora in attached)
