"""The keyframe sampler node end to end in a real ComfyUI server (POST /prompt)."""
import uuid

import pytest

from comfy_host import PromptExecutionError
from test_nodes_e2e import sampler_graph, saved_video, server, video_frames  # noqa: F401 (module fixture)

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


def test_keyframe_sampler_repeats_exactly_on_a_long_running_server(server):
    """Start image + a keyframe at frame 24, length 49, one seed: the same frames on every run, with
    other prompts (another size, another seed, the plain sampler) run in between on the same server."""
    def keyframed(seed):
        graph = keyframe_graph(length=49, start_image=["20", 0], keyframes=["22", 0])
        graph["22"] = {"class_type": "SelfForcingKeyframe", "inputs": {"image": ["21", 0], "frame": 24, "strength": 1.0}}
        graph["4"]["inputs"]["seed"] = seed
        graph["6"]["inputs"]["filename_prefix"] = f"sf/repeat_{uuid.uuid4().hex}"  # never a cached output
        return graph
    runs = []
    for other in range(3):
        runs.append(video_frames(saved_video(server, server.run(keyframed(7), timeout=300))))
        between = keyframed(100 + other) if other != 1 else sampler_graph(width=48, height=64, length=13, seed=other)
        server.run(between, timeout=300)
        server.post("/free", {"unload_models": other == 2, "free_memory": other == 2})
    assert len(runs[0]) == 49
    for frames in runs[1:]:
        assert all((a == b).all() for a, b in zip(runs[0], frames))
