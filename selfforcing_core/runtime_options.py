"""Speed and memory options of the generator, as one bundle the loader and sampler pass through.

    options = RuntimeOptions(fp8="e4m3fn", compile=True, offload_blocks=10)
    model, report = load_with_options("self_forcing_dmd.pt", options, dtype="bf16", device="cuda")

Order: FP8 conversion while loading, LoRA merges, then block offload (moves the model to the
device), then the FP8 compute path for that device, then compilation. ``report`` lists what was done and why
(one line per option), for the node to show.
"""
from dataclasses import dataclass

from .checkpoint import describe_auto_dtype, load_generator
from .compile import compile_blocks
from .fp8 import FP8_FORMATS, GRANULARITIES, choose_fp8_matmul
from .lora import merge_lora
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
                      device="cpu", loras=(), **load_kwargs):
    """``load_generator`` plus LoRAs merged into the weights (``[(path or state dict, strength)]``,
    before FP8 compute, offload and compilation see them) and the runtime options.
    Returns (model, report lines)."""
    model = load_generator(path_or_state_dict, dtype=dtype, device="cpu", fp8=options.fp8,
                           fp8_granularity=options.fp8_granularity, compute_device=device, **load_kwargs)
    report = [describe_auto_dtype(model.patch_embedding.weight.dtype, device)] if dtype == "auto" else []
    report += [f"LoRA {index + 1}: {merge_lora(model, source, strength)} layers merged at strength {strength}"
               for index, (source, strength) in enumerate(loras)]
    report += [offload_blocks(model, options.offload_blocks, device), choose_fp8_matmul(model, device)]
    if options.compile:
        report.append(compile_blocks(model, device))
    return model, report
