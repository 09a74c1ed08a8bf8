"""Load a causal Wan generator from the checkpoint layouts people share, strictly.

Accepted files: ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)`` only: the official
``self_forcing_dmd.pt`` dict with ``generator_ema`` / ``generator`` / ``model`` entries, or a
bare state dict) and ``.safetensors``. Accepted key layouts, all mapped to the original Wan2.1
names that ``CausalWanModel`` uses:

* ``official``: Self Forcing training checkpoints, every key prefixed ``model.``
* ``wan``: original Wan2.1 ``diffusion_pytorch_model.safetensors`` (no prefix)
* ``comfyui``: ComfyUI full checkpoints, prefix ``model.diffusion_model.``
* ``diffusers``: ``WanTransformer3DModel`` names (``condition_embedder.*``, ``attn1``, ...)

A file is loaded completely or not at all: missing, unexpected or mis-shaped tensors raise
``CheckpointError`` naming the detected layout and the offending keys.
"""
import os
import re
import zipfile
from pathlib import Path

import torch

from .errors import SelfForcingError
from .fp8 import holds_float8, load_fp8_weights, split_fp8_scales
from .model import CausalWanModel, WanConfig

OFFICIAL_ENTRIES = ("generator_ema", "generator", "model")  # preference order inside a .pt dict
PREFIXES = {"comfyui": "model.diffusion_model.", "official": "model."}

# diffusers name -> original Wan name (regex over the whole key)
DIFFUSERS_RENAMES = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]

SUPPORTED_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(SelfForcingError):
    """A weights file that cannot be read, or not loaded as the model asked for."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The weights file does not exist."""


def check_finite(tensors: dict, source: str) -> dict:
    """Return ``tensors``; CheckpointError naming the first floating-point tensor with NaN or Inf."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor if tensor.element_size() > 1 else tensor.float()).all():
            raise CheckpointError(f"{source}: tensor {name} holds NaN or Inf values (a damaged download or a "
                                  "diverged training run); replace the file")
    return tensors


def read_tensors(path: str | Path, entries: tuple[str, ...] = OFFICIAL_ENTRIES) -> dict:
    """Read a ``.safetensors`` or ``.pt``/``.pth`` file (any model's weights) into a flat dict of
    tensors (CPU), refusing NaN or Inf values (``read_checkpoint`` without the entry's name)."""
    return read_checkpoint(path, entries)[0]


def read_checkpoint(path: str | Path, entries: tuple[str, ...] = OFFICIAL_ENTRIES) -> tuple[dict, str | None]:
    """(flat dict of CPU tensors, name of the training-dict entry it came from or None) of a weights file.

    Pickled files are read with ``weights_only=True``; a training dict yields its first entry
    found in ``entries``, in that order (official checkpoints: ``generator_ema``, else
    ``generator``, else ``model``; a family may prefer another order, ``Family.checkpoint_keys``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"weights file not found: {path} (put the file there or fix the path)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path.name} is not a readable .safetensors file: {error}") from None
        return check_finite(tensors, path.name), None
    if path.suffix not in (".pt", ".pth", ".ckpt", ".bin"):
        raise CheckpointError(f"unsupported checkpoint extension {path.suffix!r} ({path.name}); "
                              "use .safetensors, .pt or .pth")
    try:
        # Memory-map zip-format files (torch >= 1.6); older pickles cannot be mapped.
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        raise CheckpointError(f"{path.name} could not be read with torch.load(weights_only=True) "
                              f"(only plain tensor dicts are accepted, never arbitrary pickles): {error}") from None
    entry = next((name for name in entries if isinstance(data, dict) and isinstance(data.get(name), dict)), None)
    if entry is not None:
        data = data[entry]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path.name} does not hold a state dict (expected tensors, or a dict with one of "
                              f"{', '.join(entries)})")
    return check_finite(data, path.name), entry


def detect_layout(state_dict: dict) -> str:
    """Name of the key layout of a Wan2.1 DiT state dict; CheckpointError for anything else."""
    keys = set(state_dict)
    for layout, prefix in PREFIXES.items():
        if f"{prefix}head.modulation" in keys:
            return layout
    if "head.modulation" in keys:
        return "wan"
    if "scale_shift_table" in keys and any(k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    hints = {"decoder.conv1.weight": "a Wan VAE", "decoder.0.weight": "a TAEHV decoder",
             "shared.weight": "a umT5 text encoder", "encoder.block.0.layer.0.SelfAttention.q.weight": "a umT5 text encoder"}
    what = next((name for key, name in hints.items() if key in keys), "not a Wan2.1 diffusion model")
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(f"unrecognised checkpoint layout ({what}); expected the Self Forcing, Wan2.1, "
                          f"ComfyUI or diffusers layout with a 'head.modulation' tensor. First keys: {sample}")


def to_wan_names(state_dict: dict) -> tuple[dict, str]:
    """Map any supported layout to original Wan2.1 names. Returns (state_dict, layout name)."""
    layout = detect_layout(state_dict)
    if layout in PREFIXES:
        prefix = PREFIXES[layout]
        # Full ComfyUI checkpoints also carry the VAE and text encoder: keep the DiT only.
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}, layout
    if layout == "diffusers":
        renamed = {}
        for key, value in state_dict.items():
            for pattern, replacement in DIFFUSERS_RENAMES:
                key, hits = re.subn(pattern, replacement, key)
                if hits:
                    break
            renamed[key] = value
        return renamed, layout
    return dict(state_dict), layout


def verify_state_dict(model: torch.nn.Module, state_dict: dict, layout: str):
    """Raise CheckpointError unless ``state_dict`` matches the model's parameters name for name and shape."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}"
                  for k in sorted(set(expected) & set(state_dict)) if tuple(state_dict[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        def listing(title, items):
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else "") if items else ""
        raise CheckpointError(f"checkpoint (detected layout: {layout}) does not match a causal Wan2.1 model"
                              + listing("missing", missing) + listing("unexpected", unexpected)
                              + listing("shape mismatch", mismatched)
                              + "\nNothing was loaded. Is this an image-to-video or 14B model, or another model entirely?")


def load_generator(path_or_state_dict, dtype: str | torch.dtype = "auto", device="cpu",
                   num_heads: int | None = None, head_dim: int = 128, text_len: int = 512,
                   fp8: str = "off", fp8_granularity: str = "tensor", compute_device=None,
                   checkpoint_keys: tuple[str, ...] = OFFICIAL_ENTRIES) -> CausalWanModel:
    """Build a ``CausalWanModel`` from a checkpoint file or state dict in any supported layout.

    dtype: "auto" (see ``resolve_dtype``), "fp32", "bf16", "fp16" or a torch dtype: the compute
    dtype, chosen for ``compute_device`` (default: ``device``). fp8: "off", "e4m3fn" or "e5m2"
    stores the block linears in float8 (see ``fp8.py``; FP8 files, e.g. ComfyUI scaled-fp8, are
    accepted either way). checkpoint_keys: the entries of an official ``.pt`` training dict to
    try, in order (a family's ``checkpoint_keys``; ``model`` is tried last whatever is given); the
    one loaded is ``model.checkpoint_entry``.
    The config is inferred from the weights (``WanConfig.from_state_dict``). Tensors of a state
    dict passed in are used as they are (no copy) when dtype and device already match.
    """
    entries = tuple(dict.fromkeys((*checkpoint_keys, "model")))
    state_dict, entry = ((path_or_state_dict, None) if isinstance(path_or_state_dict, dict)
                         else read_checkpoint(path_or_state_dict, entries))
    state_dict, layout = to_wan_names(state_dict)
    state_dict, fp8_scales = split_fp8_scales(state_dict)
    try:
        cfg = WanConfig.from_state_dict(state_dict, head_dim=head_dim, num_heads=num_heads, text_len=text_len)
    except KeyError as error:
        raise CheckpointError(f"checkpoint (detected layout: {layout}) lacks {error}, which every Wan2.1 "
                              "diffusion model has; the file is incomplete or another model") from None
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    target = resolve_dtype(dtype, state_dict, compute_device or device)
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    verify_state_dict(model, state_dict, layout)
    if fp8 != "off" or fp8_scales or holds_float8(state_dict):
        load_fp8_weights(model, state_dict, fp8_scales, fp8, fp8_granularity, target)
    else:
        model.load_state_dict({k: v.to(target) for k, v in state_dict.items()}, strict=True, assign=True)
    model.layout, model.checkpoint_entry = layout, entry
    return model.to(device).eval().requires_grad_(False)


def resolve_dtype(dtype, state_dict: dict, device="cpu") -> torch.dtype:
    """Compute dtype for loading: an explicit choice, or for "auto" bf16 on CUDA (fp16 where bf16
    is unsupported), bf16 on a CPU with bf16 matrix instructions (``cpu_bf16_matrix_units``), and
    the checkpoint's own float dtype elsewhere (bf16 for float8 files)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        device_type = torch.device(device).type
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device_type == "cpu" and cpu_bf16_matrix_units():
            return torch.bfloat16
        found = state_dict["patch_embedding.weight"].dtype
        return found if found in SUPPORTED_DTYPES.values() else torch.bfloat16
    if dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(f"unsupported weight dtype {dtype!r}; choose auto, {', '.join(SUPPORTED_DTYPES)}")
    return SUPPORTED_DTYPES[dtype]


def cpu_bf16_matrix_units() -> str | None:
    """The CPU's bf16 matrix instructions ("AMX-BF16" or "AVX512-BF16"), or None without them.

    Read from the CPU's feature flags (/proc/cpuinfo, or torch's cpuid probe where that file is
    missing or silent), never from the vendor or a timing, so the answer is the same on every run.
    ``SELFFORCING_CPU_BF16=0`` (or ``1``) overrides the answer, e.g. to keep "auto" at fp32.
    """
    override = os.environ.get("SELFFORCING_CPU_BF16")
    if override is not None:
        return "forced by SELFFORCING_CPU_BF16=1" if override == "1" else None
    flags = cpu_flags()
    for name, flag, probe in (("AMX-BF16", "amx_bf16", "_is_amx_tile_supported"),
                              ("AVX512-BF16", "avx512_bf16", "_is_avx512_bf16_supported")):
        if flag in flags or getattr(torch.cpu, probe, lambda: False)():
            return name
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is no such file)."""
    try:
        return set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    except (OSError, AttributeError):
        return set()


def describe_auto_dtype(dtype: torch.dtype, device) -> str:
    """One line for a loader's info: what "auto" chose for ``device`` and why."""
    name = str(dtype).removeprefix("torch.")
    if torch.device(device).type == "cuda":
        return f"dtype auto: {name} (CUDA)"
    if torch.device(device).type == "cpu":
        units = cpu_bf16_matrix_units()
        if units:
            return f"dtype auto: {name} (CPU bf16 matrix instructions: {units})"
        return f"dtype auto: {name}, the file's precision (the CPU has no bf16 matrix instructions)"
    return f"dtype auto: {name}, the file's precision"
