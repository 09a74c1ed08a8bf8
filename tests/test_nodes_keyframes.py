"""The keyframe sampler node end to end in a real ComfyUI server (POST /prompt)."""
import pytest

from support.comfy_host import PromptExecutionError, sampler_graph, saved_video
from support.files import video_frames

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
