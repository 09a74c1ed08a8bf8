"""Codec detection and loading: the key layout picks TAEHV or the Wan VAE; anything else is refused clearly."""
import pytest
import torch

from support.decoder_weights import taehv_state_dict
from selfforcing_core.checkpoint import read_tensors
from selfforcing_core.codec_loading import detect_codec, load_codec


def test_loader_detects_codecs_and_refuses_other_models(tmp_path):
    assert detect_codec(taehv_state_dict()) == "taehv"
    other = {"model.diffusion_model.blocks.0.self_attn.q.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match="not a Wan 2.1 decoder.*model.diffusion_model.blocks.0"):
        load_codec(other)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_tensors(tmp_path / "missing.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_tensors(tmp_path / "list.pth")
    with pytest.raises(ValueError, match="dtype"):
        load_codec(taehv_state_dict(), dtype=torch.int8)
