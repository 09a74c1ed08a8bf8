"""Keyframe-conditioned sampler: start prefill, keyframe pinning, strength 0 = plain stream, errors."""
from dataclasses import replace

import pytest
import torch

from support.decoder_weights import taehv_state_dict, wan_vae_state_dict
from selfforcing_core.keyframes import (Keyframe, KeyframeGuide, check_keyframes, encode_still, fit_images,
                                        generate_keyframed_video, keyframe_from_image, pixel_to_latent_frame,
                                        prepare_keyframes, start_block)
from selfforcing_core.codec_loading import load_codec
from selfforcing_core.rollout import NoiseSource, PromptSwitch, StreamSettings, sample_video, write_clean_context
from support.rounding import assert_within_float32_reductions, assert_within_roundings, module_reductions
from support.tiny import tiny_model, tiny_prompt

LATENT = (16, 4, 6)  # 2 x 3 = 6 tokens per frame; images are 32 x 48
NUM_BLOCKS = 3


def seeded(seed=0):
    return NoiseSource(generator=torch.Generator().manual_seed(seed))


def random_latent(seed, batch=1):
    return torch.randn(batch, *LATENT, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def taehv():
    return load_codec(taehv_state_dict())


def test_pixel_frames_map_to_latent_frames_like_the_decoders():
    # latent 0 -> pixel 0, latent k > 0 -> pixels 4k-3 .. 4k; 21 latents = 81 pixel frames
    assert [pixel_to_latent_frame(p, 21) for p in (0, 1, 4, 5, 8, 80)] == [0, 1, 1, 2, 2, 20]
    for outside in (-1, 81):
        with pytest.raises(ValueError, match=r"outside the clip.*0\.\.80"):
            pixel_to_latent_frame(outside, 21)


@pytest.mark.parametrize("codec_kind", ["taehv", "wan_vae"])
def test_start_image_prefill_puts_its_encoding_in_the_cache(model, codec_kind):
    """The first block is the encoded still start image (latent 0 = the image's own first-frame
    encoding) and the cache holds what the t = 0 pass of exactly those latents writes."""
    codec = load_codec(taehv_state_dict() if codec_kind == "taehv" else wan_vae_state_dict())
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    start = start_block(codec.encode_video, image)
    assert start.shape == (1, 3, *LATENT)
    # the still's first latent from a 9-frame clip vs a 1-frame one: the same convolutions over other lengths
    assert_within_float32_reductions(start[:, 0], codec.encode_video(image[:, None])[:, 0],
                                     *module_reductions(codec.encoder, tokens=LATENT[1] * LATENT[2]))
    states = []
    video = sample_video(model, tiny_prompt(), 2, LATENT, noise=seeded(), settings=StreamSettings(prefill=start),
                         guide=KeyframeGuide([]), callback=lambda info: states.append(info["state"]))
    assert torch.equal(video[:, :3], start)
    reference = model.new_kv_cache(LATENT[1], LATENT[2], 3, 0, rolling=False)
    write_clean_context(model, start, tiny_prompt(), reference, 0)
    cache, tokens = states[-1].kv_cache, 3 * reference.frame_seqlen
    assert cache.slot_frames[:3] == [0, 1, 2]
    torch.testing.assert_close(cache.k[:, :, :tokens], reference.k, rtol=0, atol=0)
    torch.testing.assert_close(cache.v[:, :, :tokens], reference.v, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["guidance", "anchor"])
@pytest.mark.parametrize("frame", [8, 4])  # end keyframe (last frame), keyframe between (block start)
def test_strength_one_lands_exactly_on_the_keyframe(model, method, frame):
    key = Keyframe(frame, random_latent(9), 1.0)
    video = sample_video(model, tiny_prompt(), NUM_BLOCKS, LATENT, noise=seeded(), guide=KeyframeGuide([key], method))
    torch.testing.assert_close(video[:, frame], key.latent, rtol=0, atol=0)
    plain = sample_video(model, tiny_prompt(), NUM_BLOCKS, LATENT, noise=seeded())
    assert (video[:, frame] - plain[:, frame]).abs().max() > 0.1


@pytest.mark.parametrize("method", ["guidance", "anchor"])
def test_strength_zero_equals_the_plain_streaming_sampler(model, method):
    keys = [Keyframe(4, random_latent(1), 0.0), Keyframe(8, random_latent(2), 0.0)]
    plain = sample_video(model, tiny_prompt(), NUM_BLOCKS, LATENT, noise=seeded(3))
    video = sample_video(model, tiny_prompt(), NUM_BLOCKS, LATENT, noise=seeded(3),
                         guide=KeyframeGuide(keys, method, ramp_frames=3))
    assert torch.equal(video, plain)


def test_guidance_ramp_rises_to_the_strength_and_can_reach_the_previous_block():
    key = Keyframe(4, torch.ones(1, *LATENT), 0.9)
    guide = KeyframeGuide([key], "guidance", ramp_frames=3)
    pulled = torch.cat([guide.guide_x0(start, 0, torch.zeros(1, 3, *LATENT)) for start in (0, 3)], dim=1)
    weights = pulled.mean(dim=(0, 2, 3, 4))  # x0 = 0, key = 1 -> the weight per frame
    expected = torch.tensor([0.0, 0.18, 0.36, 0.54, 0.72, 0.0]) * 1.25
    per_frame = pulled[0, 0].numel()  # a mean over this many values, after a few operations per value
    assert_within_roundings(weights, expected, 1.25, per_frame + 4)


def test_anchor_steers_earlier_blocks_and_leaves_the_cache(model):
    """Blocks before the keyframe's block see the anchor (their output changes) and after every
    block the cache holds exactly the generated frames again (with a rolling window and a prompt
    switch, the storyboard case)."""
    slots, prompt_b = [], tiny_prompt(seed=4)
    settings = StreamSettings(kv_window_frames=5, prompt_switches=[PromptSwitch(2, prompt_b)])
    video = sample_video(model, tiny_prompt(), 4, LATENT, noise=seeded(), settings=settings,
                         guide=KeyframeGuide([Keyframe(11, random_latent(7), 1.0)], "anchor"),
                         callback=lambda info: slots.append(list(info["state"].kv_cache.slot_frames)))
    plain = sample_video(model, tiny_prompt(), 4, LATENT, noise=seeded(), settings=settings)
    assert (video[:, :3] - plain[:, :3]).abs().max() > 1e-3
    # the anchor occupies one window slot while a block is denoised, so one older frame is evicted early
    assert slots == [[0, 1, 2], [2, 3, 4, 5], [5, 6, 7, 8], [7, 8, 9, 10, 11]]
    torch.testing.assert_close(video[:, 11], random_latent(7), rtol=0, atol=0)


def test_guidance_with_start_image_window_and_prompt_switch(model, taehv):
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    end_image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    end = keyframe_from_image(taehv.encode_video, end_image, pixel_to_latent_frame(44, 12))
    torch.testing.assert_close(end.latent, encode_still(taehv.encode_video, end_image, 2)[:, 1])
    settings = StreamSettings(prefill=start_block(taehv.encode_video, image), kv_window_frames=6,
                              prompt_switches=[PromptSwitch(1, tiny_prompt(seed=8))])
    video = sample_video(model, tiny_prompt(), 3, LATENT, noise=seeded(), settings=settings,
                         guide=KeyframeGuide([end]))
    assert video.shape == (1, 12, *LATENT) and end.latent_frame == 11
    torch.testing.assert_close(video[:, 11], end.latent, rtol=0, atol=0)


def test_keyframes_that_cannot_be_honoured_give_clear_errors():
    key = random_latent(0)
    cases = [
        ([Keyframe(9, key)], 9, 0, "outside the clip of 9 latent frames"),
        ([Keyframe(2, key)], 9, 3, "falls in the start image's block"),
        ([Keyframe(f, key) for f in range(3, 10)], 9, 3, "7 keyframes but the clip generates only 6"),
        ([Keyframe(4, key), Keyframe(4, key)], 9, 0, "both fall in latent frame 4"),
        ([Keyframe(4, key, 1.5)], 9, 0, "strength must be in"),
        ([Keyframe(4, torch.zeros(1, 16, 8, 8))], 9, 0, "latent has shape"),
    ]
    for keyframes, frames, first, message in cases:
        with pytest.raises(ValueError, match=message):
            check_keyframes(keyframes, frames, first, LATENT)
    with pytest.raises(ValueError, match="method must be one of"):
        KeyframeGuide([], "blend")


def test_images_of_another_size_are_cropped_resized_or_rejected():
    wide = torch.zeros(2, 3, 32, 96)
    wide[..., 24:72] = 1.0  # bright centre half, dark sides
    with pytest.raises(ValueError, match=r"96x32 but the video is 48x32.*'crop' or 'resize'"):
        fit_images(wide, 32, 48, "reject")
    cropped = fit_images(wide, 32, 48, "crop")  # same aspect after the centre crop: all bright
    resized = fit_images(wide, 32, 48, "resize")  # squeezed: dark sides stay
    assert cropped.shape == resized.shape == (2, 3, 32, 48)
    assert cropped.min() > 0.99 and resized[..., 0].max() < 0.01
    assert fit_images(wide, 32, 96, "reject") is wide
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        fit_images(torch.zeros(3, 32, 48), 32, 48)


def test_prepare_keyframes_fits_encodes_and_checks_images(taehv):
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))  # 2x the video size
    start, keys = prepare_keyframes(taehv.encode_video, LATENT[1:], 12, start_image=image,
                                    keyframe_images=[(44, image, 0.5), (20, image, 1.0)], batch_size=2)
    small = fit_images(image, 32, 48)
    assert start.shape == (2, 3, *LATENT) and torch.equal(start[1], start_block(taehv.encode_video, small)[0])
    assert [(k.latent_frame, k.strength) for k in keys] == [(11, 0.5), (5, 1.0)]
    torch.testing.assert_close(keys[0].latent, keyframe_from_image(taehv.encode_video, small, 11).latent)
    with pytest.raises(ValueError, match="96x64 but the video is 48x32"):
        prepare_keyframes(taehv.encode_video, LATENT[1:], 12, keyframe_images=[(44, image, 1.0)], fit="reject")
    with pytest.raises(ValueError, match="outside the clip"):
        prepare_keyframes(taehv.encode_video, LATENT[1:], 12, keyframe_images=[(45, small, 1.0)])
    with pytest.raises(ValueError, match="start image's block"):
        prepare_keyframes(taehv.encode_video, LATENT[1:], 12, start_image=small, keyframe_images=[(8, small, 1.0)])


def test_keyframed_video_counts_time_from_the_clip_start(model, taehv):
    """The sampler's entry point: length and prompt-switch blocks include the start block; the
    start block is the clip's first block and the end keyframe lands on the last frame."""
    prompt, other = tiny_prompt(1), tiny_prompt(2)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    end = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    video = generate_keyframed_video(model, prompt, 9, (8, 8), encode=taehv.encode_video, start_image=image,
                                     keyframe_images=[(32, end, 1.0)], seed=0,
                                     settings=StreamSettings(prompt_switches=[PromptSwitch(2, other)]))
    start = encode_still(taehv.encode_video, image, 3)
    assert video.latents.shape == (1, 9, 16, 8, 8)
    torch.testing.assert_close(video.latents[:, :3], start)
    torch.testing.assert_close(video.latents[:, 8], encode_still(taehv.encode_video, end, 2)[:, 1])
    # The switch at clip block 2 is generated block 1: block 1 of the clip uses the first prompt.
    unswitched = generate_keyframed_video(model, prompt, 9, (8, 8), encode=taehv.encode_video, start_image=image,
                                          keyframe_images=[(32, end, 1.0)], seed=0)
    torch.testing.assert_close(video.latents[:, :6], unswitched.latents[:, :6])
    assert not torch.allclose(video.latents[:, 6:8], unswitched.latents[:, 6:8])
    with pytest.raises(ValueError, match="still block fills"):
        generate_keyframed_video(model, prompt, 3, (8, 8), encode=taehv.encode_video, start_image=image, seed=0)
    with pytest.raises(ValueError, match="need an encoder"):
        generate_keyframed_video(model, prompt, 9, (8, 8), encode=None, start_image=image, seed=0)


def test_frame_wise_start_image_is_one_latent_frame_cached_alone(model, taehv):
    """Frame-wise families (Causal Forcing image-to-video): the start image becomes one latent
    frame, the image's own encoding, cached with a t = 0 call; the clip continues one frame per block."""
    from selfforcing_core.families import FAMILIES
    from selfforcing_core.rollout import NoiseSource, sample_video

    prompt = tiny_prompt(1)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    settings = FAMILIES["causal_forcing_framewise_2step"].settings()
    video = generate_keyframed_video(model, prompt, 4, (8, 8), encode=taehv.encode_video, start_image=image, seed=2,
                                     settings=settings)
    start = encode_still(taehv.encode_video, image, 1)
    assert start.shape[1] == 1 and video.latents.shape == (1, 4, 16, 8, 8)
    expected = sample_video(model, prompt, 3, (16, 8, 8), noise=NoiseSource(torch.Generator().manual_seed(2)),
                            settings=replace(settings, prefill=start))
    torch.testing.assert_close(video.latents, expected)
