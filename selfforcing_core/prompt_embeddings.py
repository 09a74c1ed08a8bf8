"""Prompt-embedding files: a text encoder's output saved to `.safetensors` and read back.

Encoding a prompt with umT5-XXL needs an 11 GB model; a long session or the trainer only needs
its output. A prompt embedding is a list of entries `(context, extras)`, the shape of ComfyUI's
CONDITIONING for Wan: `context` is the encoder output [B, L, C] (B=1, L=512 padded tokens,
C=4096 for umT5-XXL) and `extras` a dict such as `{"pooled_output": None}`.

File layout (plain safetensors, readable without this module):
    tensors   "context.{i}"       context of entry i, dtype kept
              "extras.{i}.{key}"  tensor-valued extras of entry i (e.g. an attention mask)
    metadata  "format"            FILE_FORMAT
              "extras"            JSON list, per entry, of the non-tensor extras
                                  (None, bool, int, float, str)
"""
import json
import os

import torch
from safetensors import SafetensorError, safe_open

from .atomic import save_safetensors

FILE_FORMAT = "self-forcing-prompt-embeddings/1"
PLAIN_TYPES = (type(None), bool, int, float, str)


def save_prompt_embeddings(path, entries):
    """Write `entries` (a list of `(context [B, L, C], extras dict)`) to `path` atomically."""
    if not entries:
        raise ValueError("no prompt embeddings to save: the conditioning list is empty")
    tensors, plain_extras = {}, []
    for index, (context, extras) in enumerate(entries):
        _check_context(context, f"entry {index}")
        tensors[f"context.{index}"] = context.detach().cpu().contiguous().clone()
        plain = {}
        for key, value in extras.items():
            if isinstance(value, torch.Tensor):
                tensors[f"extras.{index}.{key}"] = value.detach().cpu().contiguous().clone()
            elif isinstance(value, PLAIN_TYPES):
                plain[key] = value
            else:
                raise ValueError(
                    f"entry {index} carries '{key}' of type {type(value).__name__}, which a prompt-"
                    "embedding file cannot hold; save the text encoder output before attaching "
                    "control nets, hooks or areas")
        plain_extras.append(plain)
    save_safetensors(tensors, path, {"format": FILE_FORMAT, "extras": json.dumps(plain_extras)})


def load_prompt_embeddings(path):
    """Read a file written by `save_prompt_embeddings`: a list of `(context [B, L, C], extras)`."""
    from .checkpoint import CheckpointError, CheckpointNotFoundError, check_finite
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"prompt-embedding file not found: {name}")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except SafetensorError as error:
        raise CheckpointError(f"{name} is not a readable .safetensors file ({error}); save it again with Save "
                              "Prompt Embeddings") from None
    check_finite(tensors, name)
    if metadata.get("format") != FILE_FORMAT:
        raise ValueError(
            f"{name} is not a prompt-embedding file (metadata format={metadata.get('format')!r}, "
            f"expected {FILE_FORMAT!r}); create it with the Save Prompt Embeddings node")
    try:
        plain_extras = json.loads(metadata.get("extras", ""))
    except json.JSONDecodeError:
        plain_extras = None
    if not isinstance(plain_extras, list) or not all(isinstance(plain, dict) for plain in plain_extras):
        raise ValueError(f"{name} has a damaged 'extras' metadata entry: {metadata.get('extras')!r}")
    entries = []
    for index, plain in enumerate(plain_extras):
        context = tensors.pop(f"context.{index}", None)
        if context is None:
            raise ValueError(f"{name} lists {len(plain_extras)} entries but has no 'context.{index}'")
        _check_context(context, f"{name} entry {index}")
        prefix = f"extras.{index}."
        extras = dict(plain)
        extras.update({key[len(prefix):]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)})
        entries.append((context, extras))
    if tensors:
        raise ValueError(f"{name} holds tensors no entry refers to: {sorted(tensors)}")
    return entries


def _check_context(context, where):
    if not isinstance(context, torch.Tensor) or context.ndim != 3 or not context.is_floating_point():
        description = f"shape {tuple(context.shape)} {context.dtype}" if isinstance(context, torch.Tensor) \
            else type(context).__name__
        raise ValueError(f"{where}: expected a floating-point [batch, tokens, channels] tensor, got {description}")
