"""The README's main-job command (scripts/generate.py) on tiny stand-ins for the real model files."""
import subprocess
import sys

import av
import pytest
import torch
from safetensors.torch import save_file

from support.comfy_host import find_host_or_skip
from support.comfy_paths import REPO_ROOT
from support.decoder_weights import taehv_state_dict
from support.tiny import HOST_TINY
from selfforcing_core.model import CausalWanModel
from selfforcing_core.prompt_embeddings import save_prompt_embeddings

pytestmark = pytest.mark.host


def run_generate(*arguments):
    return subprocess.run([sys.executable, "-m", "scripts.generate", *arguments], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_offline_without_weights_lists_the_files_and_where_they_go(tmp_path):
    find_host_or_skip()
    result = run_generate("--models", str(tmp_path))
    assert result.returncode != 0
    for expected in ("diffusion_models/self_forcing_dmd.pt", "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                     "vae_approx/taew2_1.safetensors", "--download"):
        assert expected in result.stderr


def test_generates_an_mp4_from_the_official_file_names(tmp_path):
    find_host_or_skip()
    models = tmp_path / "models"
    torch.manual_seed(0)
    model = CausalWanModel(HOST_TINY)
    ema = {f"model.{k}": v for k, v in model.state_dict().items()}
    (models / "diffusion_models").mkdir(parents=True)
    torch.save({"generator_ema": ema, "generator": ema}, models / "diffusion_models" / "self_forcing_dmd.pt")
    (models / "vae_approx").mkdir()
    save_file(taehv_state_dict(), str(models / "vae_approx" / "taew2_1.safetensors"))
    save_prompt_embeddings(models / "prompt_embeddings" / "beach.safetensors", [(torch.randn(1, 9, 32), {})])
    result = run_generate("--models", str(models), "--embeddings", "beach.safetensors", "--width", "64",
                          "--height", "32", "--length", "17", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    videos = list((tmp_path / "out").rglob("*.mp4"))
    assert len(videos) == 1
    with av.open(str(videos[0])) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 17 and frames[0].shape == (32, 64, 3)
