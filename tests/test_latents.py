"""Latent conventions: normalisation constants, space/layout conversions, host round trips."""
import json

import pytest
import torch

from selfforcing_core.latents import (WAN21_LATENT_MEAN, WAN21_LATENT_STD, check_video, comfy_to_generator,
                                      generator_to_comfy, normalised_to_raw, raw_to_normalised)
from support.rounding import assert_within_roundings


def test_constants_equal_the_official_float32_values(fixtures_dir):
    config = json.loads((fixtures_dir / "wanvae" / "config.json").read_text())
    assert torch.equal(torch.tensor(WAN21_LATENT_MEAN), torch.tensor(config["latent_mean"]))
    assert torch.equal(torch.tensor(WAN21_LATENT_STD), torch.tensor(config["latent_std"]))


def test_normalised_raw_round_trip_and_formula():
    z = torch.randn(2, 3, 16, 4, 4, dtype=torch.float64)
    raw = normalised_to_raw(z)
    std = torch.tensor(WAN21_LATENT_STD, dtype=torch.float64).view(1, 1, 16, 1, 1)
    mean = torch.tensor(WAN21_LATENT_MEAN, dtype=torch.float64).view(1, 1, 16, 1, 1)
    # std, 1/std and mean rounded to float32: three roundings
    assert_within_roundings(raw, z * std + mean, (z * std).abs() + mean.abs(), 3, dtype=torch.float32)
    torch.testing.assert_close(raw_to_normalised(raw), z, atol=1e-12, rtol=0)


def test_generator_comfy_layouts():
    z = torch.randn(1, 5, 16, 2, 3)
    samples = generator_to_comfy(z)
    assert samples.shape == (1, 16, 5, 2, 3)
    torch.testing.assert_close(samples, normalised_to_raw(z.transpose(1, 2), channel_dim=1))
    stats = (torch.tensor(WAN21_LATENT_MEAN) / torch.tensor(WAN21_LATENT_STD)).abs().view(1, 1, 16, 1, 1)
    assert_within_roundings(comfy_to_generator(samples), z, z.abs() + stats, 4)  # / 1/std, + mean, - mean, * 1/std
    with pytest.raises(ValueError, match=r"\[B, 16, F, H, W\]"):
        comfy_to_generator(z)


@pytest.mark.host
def test_host_wan21_format_matches_our_conversions(comfy_import):
    formats = comfy_import("comfy.latent_formats")
    wan21 = formats.Wan21()
    samples = torch.randn(1, 16, 5, 4, 4) * 2 + 0.3  # a ComfyUI LATENT: raw values
    generator_latents = comfy_to_generator(samples)
    mean = torch.tensor(WAN21_LATENT_MEAN).abs().view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, 16, 1, 1, 1)
    raw_size = samples.abs() + mean  # each way at most 3 float32 operations (and 1/std), twice for round trips
    assert_within_roundings(generator_latents, wan21.process_in(samples).transpose(1, 2),
                            (raw_size / std).transpose(1, 2), 4)
    assert_within_roundings(generator_to_comfy(generator_latents), wan21.process_out(wan21.process_in(samples)),
                            raw_size + mean, 8)
    assert_within_roundings(wan21.process_out(generator_latents.transpose(1, 2)), generator_to_comfy(generator_latents),
                            raw_size + mean, 4)
    torch.testing.assert_close(torch.tensor(WAN21_LATENT_MEAN), wan21.latents_mean.flatten(), atol=0, rtol=0)
    torch.testing.assert_close(torch.tensor(WAN21_LATENT_STD), wan21.latents_std.flatten(), atol=0, rtol=0)


def test_check_video_names_expected_and_given():
    check_video(torch.zeros(1, 2, 16, 4, 4), 16, "latents")
    with pytest.raises(ValueError, match=r"look like \[B, C, T, H, W\].*x.transpose\(1, 2\)"):
        check_video(torch.zeros(1, 16, 2, 4, 4), 16, "latents")
    with pytest.raises(ValueError, match=r"5-D \[B, T, 16, H, W\], got shape \(16, 4, 4\)"):
        check_video(torch.zeros(16, 4, 4), 16, "latents")
