"""Training clips: read a folder of videos, cut windows, encode them once, cache latents on disk.

A clip is a video file (mp4, webm, gif, mov, mkv, avi; read with PyAV) or a folder of images
(png, jpg, webp, bmp; frames in name order). Its caption is ``<name>.txt`` beside it (for
``walk.mp4`` or the folder ``walk/``: ``walk.txt``); clips without a caption use the prompt for all.

Frames are resized to cover the training resolution and center-cropped, cut into
non-overlapping windows of ``1 + 4 (F - 1)`` video frames (F latent frames with the Wan 2.1
encoders), and encoded with a caller-given ``encode(frames [B, T, 3, H, W] in [0, 1]) ->
generator latents [B, F, 16, H/8, W/8]`` (e.g. ``StreamingCodec.encode_video``).

Cache folder layout (``prepare_clips`` writes it, ``load_clips`` reads it):
    index.json                 {"windows": [{"clip", "window", "latents", "prompt"}], "negative": file}
    windows/<key>.safetensors  tensor "latents" [F, 16, h, w]; key hashes clip, size, mtime and settings
    prompts/<key>.safetensors  prompt-embedding files (``prompt_embeddings.py`` format)
"""
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .atomic import save_safetensors
from .errors import SelfForcingError
from .images import resize_to
from .prompt_embeddings import load_prompt_embeddings, save_prompt_embeddings
from .units import video_frames_for

VIDEO_EXTENSIONS = {".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
log = logging.getLogger(__name__)


@dataclass
class ClipBatchSource:
    """Encoded training windows, what the trainer samples from: clip latents [N, F, C, h, w],
    per-window prompt embeddings (list of [L, text_dim]) and the negative prompt's embedding [L, text_dim]."""

    latents: torch.Tensor
    prompts: list
    negative: torch.Tensor
    names: list = field(default_factory=list)


class ClipError(SelfForcingError):
    """A clip that cannot be used (unreadable, too short); the message names the file."""


def find_clips(folder) -> list[Path]:
    """Video files and image-sequence folders directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"clip folder not found: {folder}")
    clips = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
            clips.append(path)
        elif path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
            clips.append(path)
    return clips


def read_frames(path) -> torch.Tensor:
    """All frames of a clip as float [T, 3, H, W] in [0, 1]; ClipError if it cannot be decoded."""
    path = Path(path)
    try:
        if path.is_dir():
            from PIL import Image
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
        else:
            import av
            with av.open(str(path)) as container:
                arrays = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        if not arrays:
            raise ClipError(f"{path}: no frames")
        frames = torch.from_numpy(np.stack(arrays))
    except ClipError:
        raise
    except Exception as error:  # PyAV / PIL raise many types for broken files
        raise ClipError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    return frames.permute(0, 3, 1, 2).float() / 255


def caption_file(clip: Path) -> Path:
    return clip.with_suffix(".txt") if clip.is_file() else clip.parent / f"{clip.name}.txt"


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _save_prompt(cache: Path, text_key: str, embedding: torch.Tensor) -> str:
    name = f"prompts/{_key(text_key)}.safetensors"
    if not (cache / name).is_file():
        save_prompt_embeddings(cache / name, [(embedding.reshape(1, *embedding.shape[-2:]), {})])
    return name


def prepare_clips(folder, cache_dir, encode: Callable[[torch.Tensor], torch.Tensor], *, width: int, height: int,
                  latent_frames: int, negative: torch.Tensor, prompt: torch.Tensor | None = None,
                  embed_caption: Callable[[str], torch.Tensor] | None = None, encoder_name: str = "encoder",
                  max_windows_per_clip: int | None = None) -> ClipBatchSource:
    """Encode every usable clip window of ``folder`` into ``cache_dir`` (reusing cached windows).

    negative / prompt: embeddings [L, text_dim] (the prompt for clips without a caption);
    embed_caption: text -> [L, text_dim] for captions. width, height: multiples of 16.
    Unreadable or too-short clips are skipped with a warning; no usable clip is an error.
    """
    if width % 16 or height % 16 or width <= 0 or height <= 0:
        raise ValueError(f"training resolution {width}x{height} must be positive multiples of 16")
    if latent_frames < 1:
        raise ValueError(f"clip length must be at least 1 latent frame, got {latent_frames}")
    cache = Path(cache_dir)
    (cache / "windows").mkdir(parents=True, exist_ok=True)
    window_length = video_frames_for(latent_frames)
    settings = (width, height, latent_frames, encoder_name)
    windows, prompt_name = [], None
    for clip in find_clips(folder):
        text_path = caption_file(clip)
        if text_path.is_file() and embed_caption is not None:
            text = text_path.read_text().strip()
            clip_prompt = _save_prompt(cache, "caption:" + text, embed_caption(text))
        elif prompt is not None:
            prompt_name = prompt_name or _save_prompt(cache, f"prompt-for-all:{_key(prompt.tolist())}", prompt)
            clip_prompt = prompt_name
        else:
            raise ValueError(f"{clip} has no caption ({text_path.name}) and no prompt for all clips was given")
        stat = clip.stat()
        clip_key = (str(clip.resolve()), stat.st_size, stat.st_mtime_ns, settings)
        try:
            new = _encode_clip_windows(clip, cache, clip_key, encode, width, height, window_length, latent_frames,
                                       max_windows_per_clip)
        except ClipError as error:
            log.warning("skipping clip: %s", error)
            continue
        windows += [{"clip": str(clip), "window": i, "latents": name, "prompt": clip_prompt} for i, name in new]
    if not windows:
        raise ValueError(f"no usable clip in {folder}: need videos or image folders with at least "
                         f"{window_length} frames each ({latent_frames} latent frames)")
    negative_name = _save_prompt(cache, f"negative:{_key(negative.tolist())}", negative)
    index = {"windows": windows, "negative": negative_name, "latent_frames": latent_frames,
             "width": width, "height": height, "encoder": encoder_name}
    temp = cache / ".index.json.tmp"
    temp.write_text(json.dumps(index, indent=1))
    os.replace(temp, cache / "index.json")
    return load_clips(cache)


def _encode_clip_windows(clip, cache, clip_key, encode, width, height, window_length, latent_frames, max_windows):
    """Encode the windows of one clip that are not cached yet; returns [(window index, file name)]."""
    frames, done = None, []
    for window in itertools.count():
        if max_windows is not None and window >= max_windows:
            break
        name = f"windows/{_key(clip_key, window)}.safetensors"
        if (cache / name).is_file():
            done.append((window, name))
            continue
        if frames is None:
            frames = read_frames(clip)
            if frames.shape[0] < window_length:
                raise ClipError(f"{clip}: {frames.shape[0]} frames, shorter than one window of {window_length}")
        end = (window + 1) * window_length
        if end > frames.shape[0]:
            break
        pixels = resize_to(frames[end - window_length:end], height, width)
        with torch.no_grad():
            latents = encode(pixels[None])[0]
        if latents.shape[0] != latent_frames:
            raise ValueError(f"the encoder turned {window_length} frames into {latents.shape[0]} latent frames, "
                             f"expected {latent_frames}; is it a Wan 2.1 encoder?")
        save_safetensors({"latents": latents.detach().float().cpu().contiguous()}, cache / name)
        done.append((window, name))
    return done


def load_clips(cache_dir) -> ClipBatchSource:
    """Read a prepared cache folder (``prepare_clips``) into a ``ClipBatchSource``."""
    from safetensors.torch import load_file
    cache = Path(cache_dir)
    if not (cache / "index.json").is_file():
        raise FileNotFoundError(f"{cache} holds no prepared dataset (index.json); prepare it with the "
                                "dataset node or selfforcing_core.clips.prepare_clips")
    index = json.loads((cache / "index.json").read_text())
    prompts = {}

    def prompt(name):
        if name not in prompts:
            prompts[name] = load_prompt_embeddings(cache / name)[0][0][0].float()
        return prompts[name]
    latents = torch.stack([load_file(cache / w["latents"])["latents"] for w in index["windows"]])
    return ClipBatchSource(latents=latents, prompts=[prompt(w["prompt"]) for w in index["windows"]],
                           negative=prompt(index["negative"]),
                           names=[f"{Path(w['clip']).name}#{w['window']}" for w in index["windows"]])
