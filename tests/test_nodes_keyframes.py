"""The keyframe sampler node end to end in a real ComfyUI server (POST /prompt)."""
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from support.comfy_host import PromptExecutionError, sampler_graph, saved_video
from support.files import video_frames, write_gif

pytestmark = pytest.mark.host


def keyframe_graph(length=25, **keyframe_inputs):
    """sampler_graph with the keyframe sampler; the start / end images are solid colours."""
    graph = sampler_graph(length=length, extra={
        "20": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0xFF0000}},
        "21": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 48, "batch_size": 1, "color": 0x0000FF}},
    })
    graph["4"]["class_type"] = "SelfForcingKeyframeSampler"
    graph["4"]["inputs"].update(method="guidance", ramp_frames=5, image_fit="crop", end_strength=1.0,
                                **keyframe_inputs)
    return graph


def test_keyframe_sampler_with_start_and_end_images_gives_the_requested_frames(server):
    graph = keyframe_graph(start_image=["20", 0], end_image=["21", 0])
    frames = video_frames(saved_video(server, server.run(graph, timeout=300)))
    assert len(frames) == 25 and frames[0].shape == (48, 64, 3)


def test_keyframe_outside_the_clip_is_a_clear_error(server):
    graph = keyframe_graph(keyframes=["22", 0])
    graph["22"] = {"class_type": "SelfForcingKeyframe", "inputs": {"image": ["20", 0], "frame": 25, "strength": 1.0}}
    with pytest.raises(PromptExecutionError, match="outside the clip"):
        server.run(graph, timeout=300)


def repeat_graph(seed=7):
    """The prompt of the repeatability report: a start image and a keyframe at frame 24 of 49; the
    sampler's latent and frames saved losslessly (Save Latent, Save Image)."""
    graph = keyframe_graph(length=49, start_image=["20", 0], keyframes=["22", 0])
    graph["4"]["inputs"]["seed"] = seed
    graph["22"] = {"class_type": "SelfForcingKeyframe", "inputs": {"image": ["21", 0], "frame": 24, "strength": 1.0}}
    graph["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "repeat/run"}}
    graph["8"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 1], "filename_prefix": "repeat/run"}}
    return graph


def training_graph(server):
    """Two trainer steps on the sampler's own loader node (the host hands the trainer the cached
    model object the keyframe prompt samples with; the trainer wraps and unwraps it)."""
    clips = server.base_dir / "input" / "repeat_clips"
    clips.mkdir(parents=True, exist_ok=True)
    write_gif(clips / "clip.gif")
    graph = {key: node for key, node in repeat_graph().items() if key in ("1", "2", "3")}
    graph.update({
        "30": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": "dog.safetensors"}},
        "31": {"class_type": "SelfForcingTrainingClips",
               "inputs": {"folder": "repeat_clips", "encoder": ["3", 0], "prompt": ["2", 0], "negative": ["30", 0],
                          "width": 32, "height": 32, "length": 9}},
        "32": {"class_type": "SelfForcingTrainer",
               "inputs": {"model": ["1", 0], "training_videos": ["31", 0], "lora_name": "repeat_lora", "steps": 2,
                          "generator_lr": 1e-3, "critic_lr": 1e-3, "lora_rank": 4, "real_lora_weight": 1.0,
                          "batch_size": 1, "seed": 0, "save_every": 2, "resume": True}},
        "33": {"class_type": "PreviewImage", "inputs": {"images": ["32", 1]}},
    })
    return graph


def sampler_outputs(server, entry):
    """(latent tensor, frames [T, H, W, 3] uint8) that a repeat_graph() run saved."""
    saved = entry["outputs"]["7"]["latents"][0]
    latent = load_file(server.output_dir / saved["subfolder"] / saved["filename"])["latent_tensor"]
    frames = np.stack([np.array(Image.open(server.output_dir / image["subfolder"] / image["filename"]))
                       for image in entry["outputs"]["8"]["images"]])
    return latent, frames


def test_keyframe_prompt_repeats_exactly_after_other_prompts_a_training_run_and_free(server):
    """Bit for bit: the sampler's LATENT and IMAGE frames. Save Video's h264 file is not compared: on
    a long-running server the host's encoding (PyAV's conversion to yuv420p, then libx264) wrote
    different bitstreams for bit-identical frames, so mp4 frames differed by up to 10/255 while
    the sampler's output did not."""
    first_latent, first_frames = sampler_outputs(server, server.run(repeat_graph(), timeout=300))
    assert first_frames.shape == (49, 48, 64, 3)
    between = [repeat_graph(seed=100), sampler_graph(width=48, height=64, length=13, seed=1), training_graph(server)]
    for step, other in enumerate(between + [None]):
        if other is None:
            server.post("/free", {"unload_models": True, "free_memory": True})
        else:
            server.run(other, timeout=300)
        latent, frames = sampler_outputs(server, server.run(repeat_graph(), timeout=300))
        assert latent.equal(first_latent), f"latent differs after step {step}"
        assert np.array_equal(frames, first_frames), f"frames differ after step {step}"
