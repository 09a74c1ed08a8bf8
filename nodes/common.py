"""What the sampler and loader nodes share: our custom types and host glue (no math here)."""
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
        progress.update_absolute(info["block"] + 1, info["num_blocks"], preview)

    return on_block


def compute_device() -> torch.device:
    """The device the host runs models on (the CPU under --cpu)."""
    return comfy.model_management.get_torch_device()


def file_options(*folders: str) -> list[str]:
    """``folder/file`` names of every model file in the host's ``folders``."""
    return [f"{folder}/{name}" for folder in folders for name in folder_paths.get_filename_list(folder)]


def resolve_file(choice: str) -> str:
    """Full path of a ``folder/file`` choice made from ``file_options``; clear error if it is gone."""
    folder, _, name = choice.partition("/")
    path = folder_paths.get_full_path(folder, name) if folder in folder_paths.folder_names_and_paths else None
    if path is None:
        raise FileNotFoundError(f"model file '{choice}' not found; put it into ComfyUI/models/{folder}/ "
                                "and refresh the node list")
    return path
