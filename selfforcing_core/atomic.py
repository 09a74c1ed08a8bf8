"""Atomic file writes: write a temporary file in the target folder, then ``os.replace`` it.

A crash or interrupt never leaves a half-written checkpoint or LoRA under the final name.
"""
import os
import tempfile
from typing import Callable

import torch


def atomic_write(path, write: Callable[[str], None], overwrite: bool = True):
    """Call ``write(temp_path)`` and move the result to ``path``; the temporary file is removed on failure.

    overwrite False: never replace a file at ``path`` (FileExistsError, also when one appears while
    writing); the finished file is linked in under its name, whole.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(str(path))[1])
    os.close(handle)
    try:
        write(temp_path)
        if overwrite:
            os.replace(temp_path, path)
        else:
            os.link(temp_path, path)
            os.unlink(temp_path)
    except BaseException:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
        raise


def save_safetensors(tensors: dict, path, metadata: dict | None = None):
    """``safetensors.torch.save_file`` made atomic."""
    from safetensors.torch import save_file
    atomic_write(path, lambda temp: save_file(tensors, temp, metadata=metadata))


def save_torch(obj, path):
    """``torch.save`` made atomic (for training checkpoints)."""
    atomic_write(path, lambda temp: torch.save(obj, temp))
