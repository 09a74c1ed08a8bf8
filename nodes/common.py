"""What the sampler and loader nodes share: our custom types and host glue (no math here)."""
import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..selfforcing_core.latents import generator_to_comfy

SelfForcingModel = io.Custom("SELFFORCING_MODEL")
StreamingDecoder = io.Custom("SELFFORCING_DECODER")
PromptSchedule = io.Custom("SELFFORCING_PROMPT_SCHEDULE")
LoraList = io.Custom("SELFFORCING_LORA_LIST")
RuntimeOptionsType = io.Custom("SELFFORCING_RUNTIME_OPTIONS")
CacheRulesType = io.Custom("SELFFORCING_CACHE_RULES")

CATEGORY = "Self-Forcing"
PREVIEW_SIZE = 512


def prompt_tensor(conditioning, what: str = "positive") -> torch.Tensor:
    """The umT5 embeddings [1, L, 4096] of a CONDITIONING (its first entry)."""
    if not conditioning:
        raise ValueError(f"{what} conditioning is empty; connect a CLIP Text Encode (umT5, CLIPLoader type wan)")
    return conditioning[0][0]


def to_image(frames: torch.Tensor) -> torch.Tensor:
    """Frames [B, T, 3, H, W] in [0, 1] -> ComfyUI IMAGE [B*T, H, W, 3] on the CPU."""
    return frames.permute(0, 1, 3, 4, 2).flatten(0, 1).float().cpu().clamp(0, 1)


def to_latent(latents: torch.Tensor) -> dict:
    """Generator latents [B, F, 16, h, w] -> ComfyUI Wan 2.1 LATENT (raw VAE space, [B, 16, F, h, w])."""
    return {"samples": generator_to_comfy(latents.float().cpu())}


def block_reporter(total_blocks: int):
    """Per-block callback (``generate_video``): host progress bar, a preview of the newest frame, and
    the interrupt check."""
    progress = comfy.utils.ProgressBar(total_blocks)

    def on_block(info: dict):
        comfy.model_management.throw_exception_if_processing_interrupted()
        preview, frames = None, info["frames"]
        if frames is not None:
            from PIL import Image

            pixels = (to_image(frames[:, -1:])[0].numpy() * 255).round().astype("uint8")
            preview = ("JPEG", Image.fromarray(pixels), PREVIEW_SIZE)
        progress.update_absolute(info["block"] + 1, info["num_blocks"] or info["block"] + 2, preview)  # None: until stopped

    return on_block


def compute_device() -> torch.device:
    """The device the host runs models on (the CPU under --cpu)."""
    return comfy.model_management.get_torch_device()


def check_inputs(node_cls, values: dict, **checks) -> bool | str:
    """Body of a node's ``validate_inputs``: True, or the first problem as a message naming the input.

    ComfyUI skips its own min / max / option check for every input a ``validate_inputs`` takes by
    name (and 0.3.75 never checks the options of V3 combos), so the declared limits of ``values``
    are applied here from the node's own schema. Then each check runs: ``input_name=callable``
    that raises ValueError; a message that does not start with an input's name gets that name
    in front. Inputs linked from other nodes are not known yet and arrive as None. The host lists
    a failure once per input the function takes: keep those inputs few.
    """
    declared = node_cls.INPUT_TYPES()
    declared = {**declared.get("required", {}), **declared.get("optional", {})}
    for name, value in values.items():
        limits = declared[name][1] if value is not None else {}
        if "min" in limits and value < limits["min"]:
            return f"{name} {value} is below its minimum {limits['min']}"
        if "max" in limits and value > limits["max"]:
            return f"{name} {value} is above its maximum {limits['max']}"
        if "options" in limits and value not in limits["options"]:
            options = limits["options"]
            listed = ", ".join(map(repr, options)) if len(options) <= 20 else f"{len(options)} choices"
            return f"{name} {value!r} is not one of its choices ({listed or 'none available'})"
    for name, check in checks.items():
        try:
            check()
        except ValueError as error:
            message = str(error)
            return message if message.startswith(tuple(values) + (name,)) else f"{name}: {message}"
    return True


def register_folder(name: str, default_path: str, extensions: set[str]) -> None:
    """Make ``name`` a ``folder_paths`` folder: ``default_path`` first, then the folders an owner
    configured under that name in ``extra_model_paths.yaml``."""
    configured = folder_paths.folder_names_and_paths.get(name, ([], None))[0]
    folder_paths.folder_names_and_paths[name] = (
        [default_path] + [path for path in configured if path != default_path], extensions)


def save_path(name: str, root: str, what: str) -> tuple[str, str, int]:
    """(folder, file name, next free counter) of ``name`` inside ``root``, by the host's save-path
    helper (``folder_paths.get_save_image_path``: subfolders allowed, never outside ``root``)."""
    if os.path.basename(os.path.normpath(name)) in ("", ".", ".."):
        raise ValueError(f"{what} '{name}' names no file; give a name such as 'my_lora' (subfolders allowed)")
    try:
        folder, file_name, counter, _, _ = folder_paths.get_save_image_path(name, root)
    except Exception:  # the host raises a bare Exception (with its own paths in the message)
        raise ValueError(f"{what} '{name}' points outside its ComfyUI folder; give a name inside it such as "
                         "'my_lora' or 'project/my_lora'") from None
    return folder, file_name, counter


def file_options(*folders: str) -> list[str]:
    """``folder/file`` names of every model file in the host's ``folders``."""
    return [f"{folder}/{name}" for folder in folders for name in folder_paths.get_filename_list(folder)]


class ModelFileNotFound(ValueError):
    """A model file named by a node input is not in its ComfyUI folder."""


def resolve_file(choice: str, folders: tuple[str, ...]) -> str:
    """Full path of a ``folder/file`` choice (as ``file_options`` lists them) whose folder is one of
    ``folders``, found by the host's ``folder_paths`` inside that model folder only; a clear error
    naming the folder otherwise."""
    folder, _, name = choice.partition("/")
    path = folder_paths.get_full_path(folder, name) if folder in folders else None
    if path is None:
        where = f"models/{folder}" if folder in folders else " or ".join(f"models/{f}" for f in folders)
        raise ModelFileNotFound(f"model file '{name}' not found in {where}; put it there and refresh the node list")
    return path
