"""The same keyframe prompt gives the same video on a long-running server, whatever ran between:
other sizes and seeds, a training run on the very model object the sampler uses (the trainer
wraps and unwraps it), and /free.

The sampler's own outputs are compared bit for bit: its LATENT (Save Latent) and its IMAGE frames
(Save Image, lossless PNG). Save Video's h264 file is not: on a long-running server the host's
encoding (PyAV's conversion to yuv420p, then libx264) wrote different bitstreams for frames that
were bit-identical (equal latents and PNGs), so mp4 frames differed by up to 10/255 while the
sampler's output did not.
"""
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import test_nodes_e2e
import test_trainer_e2e
from test_nodes_keyframes import keyframe_graph

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def server(comfy_server, tmp_path_factory):
    """The session server with the sampler tests' and the trainer tests' models, prompts and clips."""
    test_nodes_e2e.server.__wrapped__(comfy_server)
    return test_trainer_e2e.server.__wrapped__(comfy_server, tmp_path_factory)


def keyframed(seed=7, prefix="repeat/run"):
    """The issue's prompt: a start image and a keyframe at frame 24 of 49; the sampler's latent and
    frames saved losslessly."""
    graph = keyframe_graph(length=49, start_image=["20", 0], keyframes=["22", 0])
    graph["4"]["inputs"]["seed"] = seed
    graph["22"] = {"class_type": "SelfForcingKeyframe", "inputs": {"image": ["21", 0], "frame": 24, "strength": 1.0}}
    graph["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix}}
    graph["8"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 1], "filename_prefix": prefix}}
    return graph


def sampler_outputs(server, entry):
    """(latent tensor, frames [T, H, W, 3] uint8) that a keyframed() run saved."""
    saved = entry["outputs"]["7"]["latents"][0]
    latent = load_file(server.output_dir / saved["subfolder"] / saved["filename"])["latent_tensor"]
    frames = np.stack([np.array(Image.open(server.output_dir / image["subfolder"] / image["filename"]))
                       for image in entry["outputs"]["8"]["images"]])
    return latent, frames


def test_keyframe_prompt_repeats_exactly_after_other_prompts_a_training_run_and_free(server):
    first_latent, first_frames = sampler_outputs(server, server.run(keyframed(), timeout=300))
    assert first_frames.shape == (49, 48, 64, 3)
    training = test_trainer_e2e.trainer_graph(server, "repeat_lora", steps=2)
    training["1"] = keyframed()["1"]  # the same loader inputs: the trainer works on the sampler's cached model
    between = [keyframed(seed=100), test_nodes_e2e.sampler_graph(width=48, height=64, length=13, seed=1), training]
    for step, other in enumerate(between + [None]):
        if other is None:
            server.post("/free", {"unload_models": True, "free_memory": True})
        else:
            server.run(other, timeout=300)
        latent, frames = sampler_outputs(server, server.run(keyframed(), timeout=300))
        assert latent.equal(first_latent), f"latent differs after step {step}"
        assert np.array_equal(frames, first_frames), f"frames differ after step {step}"
