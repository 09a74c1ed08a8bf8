"""generate_video: blocks decoded while generating equal decoding the whole clip; trimming; report."""
import pytest
import torch

from decoder_weights import taehv_state_dict
from selfforcing_core.generate import generate_video
from selfforcing_core.codec_loading import load_codec
from selfforcing_core.rollout import NoiseSource, StreamSettings, sample_video
from selfforcing_core.schedule import DEFAULT_STEPS, FlowMatchSchedule
from tiny import tiny_model, tiny_prompt


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_frames_decoded_per_block_equal_the_whole_clip_decode(model):
    decoder = load_codec(taehv_state_dict())
    blocks = []
    video = generate_video(model, tiny_prompt(), 7, (8, 8), seed=5, decoder=decoder,
                           callback=lambda info: blocks.append((info["block"], info["num_blocks"],
                                                                info["frames"].shape[1])))
    assert video.latents.shape == (1, 7, 16, 8, 8)  # 3 blocks generated, trimmed to 7 latent frames
    assert video.frames.shape == (1, 25, 3, 64, 64)  # 1 + 4 * 6 video frames
    torch.testing.assert_close(video.frames, decoder.decode_video(video.latents), atol=1e-5, rtol=0)
    assert [(b, t) for b, t, _ in blocks] == [(0, 3), (1, 3), (2, 3)]
    assert "memory estimate" in video.report and "3 blocks" in video.report


def test_seed_and_shift_reproduce_the_rollout(model):
    """A seed and a shift alone (the official demo's 8) give the rollout of the shift-warped default steps."""
    prompt = tiny_prompt()
    schedule = FlowMatchSchedule(8.0)
    expected = sample_video(model, prompt, 2, (16, 8, 8), noise=NoiseSource(torch.Generator().manual_seed(9)),
                            settings=StreamSettings(shift=8.0, timesteps=schedule.warp(DEFAULT_STEPS)))
    video = generate_video(model, prompt, 6, (8, 8), seed=9, settings=StreamSettings(shift=8.0))
    assert video.frames is None and torch.equal(video.latents, expected)
    with pytest.raises(ValueError, match="timesteps must lie in"):
        generate_video(model, prompt, 6, (8, 8), seed=9, settings=StreamSettings(timesteps=[1000.0, 0.0]))


def test_prefill_frames_lead_the_output(model):
    prefill = torch.randn(1, 3, 16, 8, 8)
    video = generate_video(model, tiny_prompt(), 3, (8, 8), seed=1, settings=StreamSettings(prefill=prefill))
    assert video.latents.shape[1] == 6 and torch.equal(video.latents[:, :3], prefill)
