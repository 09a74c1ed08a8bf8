"""The training-clips and trainer nodes end to end in a real ComfyUI server (POST /prompt)."""
import av
import numpy as np
import pytest
import torch

from decoder_weights import taehv_state_dict
from selfforcing_core.lora import read_lora
from selfforcing_core.model import CausalWanModel, WanConfig
from selfforcing_core.prompt_embeddings import save_prompt_embeddings

pytestmark = pytest.mark.host

CONFIG = WanConfig(dim=256, ffn_dim=256, num_layers=2, num_heads=2, text_dim=32)  # head dim 128 as released


def write_gif(path, frames=9, size=32):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("gif", rate=8)
        stream.width, stream.height, stream.pix_fmt = size, size, "rgb8"
        for i in range(frames):
            image = np.full((size, size, 3), (25 * i, 120, 200 - 20 * i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_trainer_node_trains_saves_a_loadable_lora_and_a_checkpoint(comfy_server, tmp_path):
    torch.manual_seed(0)
    comfy_server.write_safetensors("diffusion_models", "sf_train_tiny.safetensors", CausalWanModel(CONFIG).state_dict())
    comfy_server.write_safetensors("vae_approx", "taew2_1.safetensors", taehv_state_dict())
    for seed, name in ((1, "train_prompt"), (2, "train_negative")):
        context = torch.randn(1, 12, CONFIG.text_dim, generator=torch.Generator().manual_seed(seed))
        save_prompt_embeddings(comfy_server.model_dir("prompt_embeddings") / f"{name}.safetensors",
                               [(context, {"pooled_output": None})])
    clips = tmp_path / "clips"
    clips.mkdir()
    for c in range(2):
        write_gif(clips / f"clip{c}.gif")
    (clips / "broken.mp4").write_bytes(b"nothing")
    graph = {
        "1": {"class_type": "SelfForcingModelLoader",
              "inputs": {"model_name": "sf_train_tiny.safetensors", "weight_dtype": "fp32", "device": "default"}},
        "2": {"class_type": "SelfForcingDecoderLoader",
              "inputs": {"decoder_name": "vae_approx/taew2_1.safetensors", "dtype": "fp32"}},
        "3": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": "train_prompt.safetensors"}},
        "4": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": "train_negative.safetensors"}},
        "5": {"class_type": "SelfForcingTrainingClips",
              "inputs": {"folder": str(clips), "encoder": ["2", 0], "prompt": ["3", 0], "negative": ["4", 0],
                         "width": 32, "height": 32, "length": 9}},
        "6": {"class_type": "SelfForcingTrainer",
              "inputs": {"model": ["1", 0], "clips": ["5", 0], "lora_name": "e2e_lora", "steps": 3,
                         "generator_lr": 1e-3, "critic_lr": 1e-3, "lora_rank": 4, "clip_weight": 1.0,
                         "batch_size": 1, "seed": 0, "save_every": 2, "resume": True}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 1]}},
    }
    comfy_server.wait(comfy_server.queue_prompt(graph))
    lora = comfy_server.model_dir("loras") / "e2e_lora.safetensors"
    adapters = read_lora(lora)
    assert len(adapters) == CONFIG.num_layers * 10
    checkpoint = torch.load(comfy_server.output_dir / "self_forcing_training" / "e2e_lora" / "checkpoint.pt",
                            weights_only=True)
    assert checkpoint["step"] == 3 and len(checkpoint["history"]) == 3
    assert "broken.mp4" in comfy_server.log()
    # the trained LoRA loads through the pack's LoRA and model-loader nodes and samples
    comfy_server.wait(comfy_server.queue_prompt({
        "1": {"class_type": "SelfForcingLora", "inputs": {"lora_name": "e2e_lora.safetensors", "strength": 1.0}},
        "2": {"class_type": "SelfForcingModelLoader",
              "inputs": {"model_name": "sf_train_tiny.safetensors", "weight_dtype": "fp32", "device": "default",
                         "loras": ["1", 0]}},
        "3": graph["3"],
        "4": {"class_type": "SelfForcingStreamingSampler",
              "inputs": {"model": ["2", 0], "positive": ["3", 0], "width": 32, "height": 32, "length": 9, "seed": 1,
                         "steps": "4 steps, shift 5 (paper)", "kv_window_frames": 0, "sink_frames": 0}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }))
