"""The training-clips and trainer nodes end to end in a real ComfyUI server (POST /prompt)."""
import av
import numpy as np
import pytest
import torch

from comfy_host import PromptValidationError, run_watching
from decoder_weights import taehv_state_dict
from selfforcing_core.lora import read_lora
from selfforcing_core.model import CausalWanModel, WanConfig
from selfforcing_core.prompt_embeddings import save_prompt_embeddings
from selfforcing_core.trainer import format_losses

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


@pytest.fixture(scope="module")
def server(comfy_server, tmp_path_factory):
    """The session server with a tiny generator, TAEHV, two prompt embeddings and a clip folder."""
    torch.manual_seed(0)
    comfy_server.write_safetensors("diffusion_models", "sf_train_tiny.safetensors", CausalWanModel(CONFIG).state_dict())
    comfy_server.write_safetensors("vae_approx", "taew2_1.safetensors", taehv_state_dict())
    for seed, name in ((1, "train_prompt"), (2, "train_negative")):
        context = torch.randn(1, 12, CONFIG.text_dim, generator=torch.Generator().manual_seed(seed))
        save_prompt_embeddings(comfy_server.model_dir("prompt_embeddings") / f"{name}.safetensors",
                               [(context, {"pooled_output": None})])
    clips = tmp_path_factory.mktemp("clips")
    for c in range(2):
        write_gif(clips / f"clip{c}.gif")
    (clips / "broken.mp4").write_bytes(b"nothing")
    comfy_server.training_clips = clips
    return comfy_server


def trainer_graph(server, lora_name, steps, save_every=2, resume=True):
    return {
        "1": {"class_type": "SelfForcingModelLoader",
              "inputs": {"model_name": "sf_train_tiny.safetensors", "weight_dtype": "fp32", "device": "default"}},
        "2": {"class_type": "SelfForcingDecoderLoader",
              "inputs": {"decoder_name": "vae_approx/taew2_1.safetensors", "dtype": "fp32"}},
        "3": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": "train_prompt.safetensors"}},
        "4": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": "train_negative.safetensors"}},
        "5": {"class_type": "SelfForcingTrainingClips",
              "inputs": {"folder": str(server.training_clips), "encoder": ["2", 0], "prompt": ["3", 0],
                         "negative": ["4", 0], "width": 32, "height": 32, "length": 9}},
        "6": {"class_type": "SelfForcingTrainer",
              "inputs": {"model": ["1", 0], "clips": ["5", 0], "lora_name": lora_name, "steps": steps,
                         "generator_lr": 1e-3, "critic_lr": 1e-3, "lora_rank": 4, "clip_weight": 1.0,
                         "batch_size": 1, "seed": 0, "save_every": save_every, "resume": resume}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 1]}},
    }


def read_checkpoint(server, lora_name):
    return torch.load(server.output_dir / "self_forcing_training" / lora_name / "checkpoint.pt", weights_only=True)


def test_trainer_node_trains_saves_a_loadable_lora_and_a_checkpoint(server):
    graph = trainer_graph(server, "e2e_lora", steps=3)
    outcome, progress, previews, prompt_id = run_watching(server, graph, "6")
    assert outcome == "execution_success"
    assert progress == [(1, 3), (2, 3), (3, 3)] and previews == 1  # the loss curves after the last step
    adapters = read_lora(server.model_dir("loras") / "e2e_lora.safetensors")
    assert len(adapters) == CONFIG.num_layers * 10
    checkpoint = read_checkpoint(server, "e2e_lora")
    assert checkpoint["step"] == 3 and len(checkpoint["history"]) == 3
    assert "broken.mp4" in server.log()
    text = server.get(f"/history/{prompt_id}")[prompt_id]["outputs"]["6"]["text"]
    assert f"last losses: {format_losses(checkpoint['history'])}" in text[0]
    assert "step 3/3: critic" in server.log()  # every step's losses in the log
    # the trained LoRA loads through the pack's LoRA and model-loader nodes and samples
    server.wait(server.queue_prompt({
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


def test_interrupt_saves_a_checkpoint_that_the_next_run_resumes_to_the_end(server):
    """POST /interrupt mid-run: the run ends interrupted with a checkpoint of the finished steps;
    queued again with resume on, it continues from there (not from 0) to the requested step count."""
    def interrupt_after_six_steps(value):
        if value == 6:
            server.interrupt()
    long_run = trainer_graph(server, "e2e_interrupt", steps=5000, save_every=5000)
    outcome, progress, previews, _ = run_watching(server, long_run, "6", on_progress=interrupt_after_six_steps)
    assert outcome == "execution_interrupted" and previews >= 1  # a loss-curve preview at step 5
    assert not (server.model_dir("loras") / "e2e_interrupt.safetensors").exists()  # no LoRA from a cut run
    interrupted = read_checkpoint(server, "e2e_interrupt")
    done = interrupted["step"]
    assert 6 <= done < 5000 and len(interrupted["history"]) == done
    assert done >= progress[-1][0]  # the checkpoint holds every step the progress bar showed
    outcome, progress, _, _ = run_watching(server, trainer_graph(server, "e2e_interrupt", steps=done + 3), "6")
    assert outcome == "execution_success"
    assert [value for value, _ in progress] == [done + 1, done + 2, done + 3]  # resumed, not restarted
    finished = read_checkpoint(server, "e2e_interrupt")
    assert finished["step"] == done + 3 and len(finished["history"]) == done + 3
    assert finished["history"][:done] == interrupted["history"]
    assert (server.model_dir("loras") / "e2e_interrupt.safetensors").is_file()


def test_training_length_that_is_not_whole_blocks_is_refused_before_running(server):
    graph = trainer_graph(server, "never_trained", steps=1)
    clips_node = next(node for node in graph.values() if node["class_type"] == "SelfForcingTrainingClips")
    clips_node["inputs"]["length"] = 13
    with pytest.raises(PromptValidationError, match="not whole blocks of 3; use one of 9, 21"):
        server.queue_prompt(graph)
