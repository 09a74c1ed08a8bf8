"""The sampler, loader and decoder nodes end to end in a real ComfyUI server (POST /prompt)."""
import uuid

import av
import pytest
import torch

from comfy_host import PromptExecutionError, PromptValidationError, run_watching
from decoder_weights import taehv_state_dict, wan_vae_state_dict
from selfforcing_core.model import CausalWanModel, WanConfig
from selfforcing_core.prompt_embeddings import save_prompt_embeddings

pytestmark = pytest.mark.host

# Head dim 128 as in every released Wan2.1 model, so the loader infers the head count itself.
E2E_CONFIG = WanConfig(dim=256, ffn_dim=256, num_layers=2, num_heads=2, text_dim=32)


@pytest.fixture(scope="module")
def server(comfy_server):
    """The session server with a tiny generator, decoders and two prompts in its model folders."""
    torch.manual_seed(0)
    model = CausalWanModel(E2E_CONFIG)
    comfy_server.write_safetensors("diffusion_models", "sf_tiny.safetensors",
                                   {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()})
    comfy_server.write_safetensors("diffusion_models", "not_a_generator.safetensors", wan_vae_state_dict())
    comfy_server.write_safetensors("vae_approx", "taew2_1.safetensors", taehv_state_dict())
    comfy_server.write_safetensors("vae", "wan_2.1_vae.safetensors", wan_vae_state_dict())
    for seed, name in ((1, "cat"), (2, "dog")):
        context = torch.randn(1, 12, E2E_CONFIG.text_dim, generator=torch.Generator().manual_seed(seed))
        save_prompt_embeddings(comfy_server.model_dir("prompt_embeddings") / f"{name}.safetensors",
                               [(context, {"pooled_output": None})])
    return comfy_server


def sampler_graph(width=64, height=48, length=25, decoder="vae_approx/taew2_1.safetensors", model="sf_tiny.safetensors",
                  seed=3, window=0, sink=0, extra=None):
    """API-format prompt: prompt embeddings -> model -> sampler (+ decoder) -> CreateVideo -> SaveVideo."""
    graph = {
        "1": {"class_type": "SelfForcingModelLoader",
              "inputs": {"model_name": model, "weight_dtype": "fp32", "device": "default"}},
        "2": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": "cat.safetensors"}},
        "4": {"class_type": "SelfForcingStreamingSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "width": width, "height": height,
                         "length": length, "seed": seed, "steps": "4 steps, shift 5 (paper)",
                         "kv_window_frames": window, "sink_frames": sink}},
        "5": {"class_type": "CreateVideo", "inputs": {"images": ["4", 1], "fps": 16.0}},
        "6": {"class_type": "SaveVideo", "inputs": {"video": ["5", 0], "filename_prefix": "sf/e2e",
                                                   "format": "mp4", "codec": "h264"}},
    }
    if decoder:
        graph["3"] = {"class_type": "SelfForcingDecoderLoader", "inputs": {"decoder_name": decoder, "dtype": "fp32"}}
        graph["4"]["inputs"]["decoder"] = ["3", 0]
    graph.update(extra or {})
    return graph


def saved_video(server, entry):
    result = entry["outputs"]["6"]["images"][0]
    return server.output_dir / result["subfolder"] / result["filename"]


def video_frames(path):
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_streaming_sampler_to_mp4_has_the_requested_frames_and_size(server):
    entry = server.run(sampler_graph(width=64, height=48, length=25), timeout=300)
    frames = video_frames(saved_video(server, entry))
    assert len(frames) == 25 and frames[0].shape == (48, 64, 3)


def test_progress_and_a_preview_reach_the_ui_after_every_block(server):
    """What the browser sees over the websocket: one progress step and one preview image per block."""
    graph = sampler_graph(length=25, seed=uuid.uuid4().int % 2**32)  # 3 blocks; a new seed: not a cached result
    outcome, progress, previews, _ = run_watching(server, graph, "4")
    assert outcome == "execution_success"
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert previews >= 3


def test_sampler_latent_decodes_with_the_hosts_own_vae_decode(server):
    graph = sampler_graph(length=13, decoder=None, extra={
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["7", 0]}},
        "5": {"class_type": "CreateVideo", "inputs": {"images": ["8", 0], "fps": 16.0}},
    })
    frames = video_frames(saved_video(server, server.run(graph, timeout=300)))
    assert len(frames) == 13 and frames[0].shape == (48, 64, 3)


def test_prompt_schedule_and_rolling_window_run(server):
    graph = sampler_graph(length=37, window=6, sink=3, extra={
        "9": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": "dog.safetensors"}},
        "10": {"class_type": "SelfForcingPromptSchedule",
               "inputs": {"conditioning": ["9", 0], "start_frame": 13}},
    })
    graph["4"]["inputs"]["prompt_schedule"] = ["10", 0]
    switched = video_frames(saved_video(server, server.run(graph, timeout=300)))
    del graph["4"]["inputs"]["prompt_schedule"]
    plain = video_frames(saved_video(server, server.run(graph, timeout=300)))
    assert len(switched) == len(plain) == 37
    # Frames before the switch (block 0: video frames 0..8 after TAEHV's start-up) are identical.
    assert all((a == b).all() for a, b in zip(switched[:9], plain[:9]))
    assert any((a != b).any() for a, b in zip(switched[13:], plain[13:]))


def test_interrupt_stops_the_stream_and_the_next_run_works(server):
    """POST /interrupt as soon as the first block is shown: the stream stops within a block or two
    (it is long enough to run for minutes otherwise) and the next run works."""
    long_run = sampler_graph(width=256, height=256, length=2001, window=9, seed=uuid.uuid4().int % 2**32)
    interrupted_at = []

    def interrupt_after_first_block(block):
        if not interrupted_at:
            interrupted_at.append(block)
            server.interrupt()

    outcome, progress, _, _ = run_watching(server, long_run, "4", on_progress=interrupt_after_first_block)
    assert outcome == "execution_interrupted"
    assert interrupted_at == [1] and progress[-1][0] <= 3 and progress[-1][1] == 167
    entry = server.run(sampler_graph(length=13), timeout=300)
    assert len(video_frames(saved_video(server, entry))) == 13


def test_size_not_a_multiple_of_16_is_refused_before_running(server):
    with pytest.raises(PromptValidationError, match="width 70 is not a positive multiple of 16"):
        server.queue_prompt(sampler_graph(width=70))
    with pytest.raises(PromptValidationError, match="4n \\+ 1"):
        server.queue_prompt(sampler_graph(length=24))


def test_checkpoint_of_another_model_is_a_clear_error(server):
    with pytest.raises(PromptExecutionError, match="unrecognised checkpoint layout \\(a Wan VAE\\)"):
        server.run(sampler_graph(model="not_a_generator.safetensors"), timeout=300)


def test_missing_model_file_is_a_validation_error(server):
    with pytest.raises(PromptValidationError, match="not found in models/diffusion_models"):
        server.queue_prompt(sampler_graph(model="nowhere.safetensors"))
    with pytest.raises(PromptValidationError, match="not found"):
        server.queue_prompt(sampler_graph(decoder="vae_approx/nowhere.safetensors"))


def test_fp8_weights_with_offload_and_compile_options_run(server):
    graph = sampler_graph(length=13, seed=21, extra={
        "11": {"class_type": "SelfForcingRuntimeOptions",
               "inputs": {"torch_compile": False, "offload_blocks": 1, "fp8_granularity": "channel"}},
    })
    graph["1"]["inputs"].update(fp8="e4m3fn", options=["11", 0])
    frames = video_frames(saved_video(server, server.run(graph, timeout=300)))
    assert len(frames) == 13 and frames[0].shape == (48, 64, 3)
    log = server.log()
    assert "FP8: 20 linear layers in e4m3fn" in log and "offload: 1/2 blocks" in log
