"""generate_video: blocks decoded while generating equal decoding the whole clip; trimming; report."""
import pytest
import torch

from support.decoder_weights import taehv_state_dict
from selfforcing_core.generate import generate_video
from selfforcing_core.codec_loading import load_codec
from selfforcing_core.rollout import NoiseSource, StreamSettings, sample_video
from selfforcing_core.schedule import DEFAULT_STEPS, FlowMatchSchedule
from support.rounding import assert_within_float32_reductions, module_reductions
from support.tiny import tiny_model, tiny_prompt


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
    assert_within_float32_reductions(video.frames, decoder.decode_video(video.latents),  # 3-frame vs 7-frame calls
                                     *module_reductions(decoder.decoder))
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


def test_causal_forcing_frame_wise_family_runs_one_latent_frame_per_block_with_its_step_lists(model):
    """Frame-wise 2-step family = the rollout with 1-frame blocks, the first in 4 steps, the rest in
    2; each block (one latent frame) is decoded and reported as it is made."""
    from selfforcing_core.families import FAMILIES

    prompt, decoder = tiny_prompt(), load_codec(taehv_state_dict())
    family = FAMILIES["causal_forcing_framewise_2step"]
    schedule = FlowMatchSchedule(family.shift)
    expected = sample_video(model, prompt, 4, (16, 8, 8), noise=NoiseSource(torch.Generator().manual_seed(3)),
                            settings=StreamSettings(frames_per_block=1, timesteps=schedule.warp([1000, 500]),
                                                    first_block_timesteps=schedule.warp([1000, 750, 500, 250])))
    seen = []
    video = generate_video(model, prompt, 4, (8, 8), seed=3, settings=family.settings(), decoder=decoder,
                           callback=lambda info: seen.append((info["block"], info["num_blocks"],
                                                              info["latents"].shape[1], info["frames"].shape[1])))
    assert torch.equal(video.latents, expected)
    assert seen == [(0, 4, 1, 1), (1, 4, 1, 4), (2, 4, 1, 4), (3, 4, 1, 4)]  # one latent frame per preview
    assert "time to the first block" in video.report


def test_rolling_forcing_family_outputs_blocks_as_they_leave_the_window(model):
    from selfforcing_core.families import FAMILIES
    from selfforcing_core.rolling_forcing import sample_rolling

    prompt = tiny_prompt()
    family = FAMILIES["rolling_forcing"]
    schedule = FlowMatchSchedule(family.shift)
    expected = sample_rolling(model, prompt, 6, (16, 4, 4), noise=NoiseSource(torch.Generator().manual_seed(4)),
                              settings=StreamSettings(timesteps=schedule.warp(family.steps), sampler="rolling"))
    video = generate_video(model, prompt, 17, (4, 4), seed=4, settings=family.settings())
    assert torch.equal(video.latents, expected[:, :17])
    assert "leaves the 5-block window" in video.report
    with pytest.raises(ValueError, match="takes no start image"):
        generate_video(model, prompt, 17, (4, 4), seed=4,
                       settings=family.settings(prefill=torch.zeros(1, 3, 16, 4, 4)))
    with pytest.raises(ValueError, match="at least 57 frames long"):
        generate_video(model, prompt, 14, (4, 4), seed=4, settings=family.settings())


def test_family_overrides_keep_the_first_block_list_and_describe_what_runs():
    from selfforcing_core.families import FAMILIES

    family = FAMILIES["causal_forcing_framewise"].overridden(steps=(1000,))
    assert family.steps == (1000,) and family.first_block_steps == DEFAULT_STEPS
    settings = family.settings(kv_window_frames=21)
    first, later = settings.step_lists()
    assert settings.frames_per_block == 1 and settings.kv_window_frames == 21 and len(first) == 4 and len(later) == 1
    assert "1 latent frame per block" in family.describe() and "[1000]" in family.describe()
    iff = FAMILIES["self_forcing_first_frame"]
    assert [iff.block_of(frame) for frame in range(8)] == [0, 1, 1, 1, 2, 2, 2, 3]
