"""generate_video: blocks decoded while generating equal decoding the whole clip; trimming; report."""
import pytest
import torch

from decoder_weights import taehv_state_dict
from selfforcing_core.latents import load_codec
from selfforcing_core.rollout import NoiseSource, sample_video
from selfforcing_core.schedule import FlowMatchSchedule
from selfforcing_core.streaming import STEP_PRESETS, generate_video
from tiny import tiny_model, tiny_prompt


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_frames_decoded_per_block_equal_the_whole_clip_decode(model):
    decoder = load_codec(taehv_state_dict())
    blocks = []
    video = generate_video(model, tiny_prompt(), 7, (8, 8), seed=5, decoder=decoder,
                           on_block=lambda block, total, latents, frames: blocks.append((block, total, frames.shape[1])))
    assert video.latents.shape == (1, 7, 16, 8, 8)  # 3 blocks generated, trimmed to 7 latent frames
    assert video.frames.shape == (1, 25, 3, 64, 64)  # 1 + 4 * 6 video frames
    torch.testing.assert_close(video.frames, decoder.decode_video(video.latents), atol=1e-5, rtol=0)
    assert [(b, t) for b, t, _ in blocks] == [(0, 3), (1, 3), (2, 3)]
    assert "memory estimate" in video.report and "3 blocks" in video.report


def test_seed_and_preset_reproduce_the_rollout(model):
    prompt = tiny_prompt()
    shift, steps = STEP_PRESETS["4 steps, shift 8 (official demo)"]
    schedule = FlowMatchSchedule(shift)
    expected = sample_video(model, prompt, 2, (16, 8, 8), noise=NoiseSource(torch.Generator().manual_seed(9)),
                            schedule=schedule, timesteps=schedule.warp(steps))
    video = generate_video(model, prompt, 6, (8, 8), seed=9, preset="4 steps, shift 8 (official demo)")
    assert video.frames is None and torch.equal(video.latents, expected)
    with pytest.raises(ValueError, match="unknown step preset"):
        generate_video(model, prompt, 6, (8, 8), seed=9, preset="8 steps")


def test_prefill_frames_lead_the_output(model):
    prefill = torch.randn(1, 3, 16, 8, 8)
    video = generate_video(model, tiny_prompt(), 3, (8, 8), seed=1, prefill=prefill)
    assert video.latents.shape[1] == 6 and torch.equal(video.latents[:, :3], prefill)
