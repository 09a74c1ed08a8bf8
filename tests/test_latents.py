"""Latent conventions: normalisation constants, space/layout conversions, host round trips."""
import json

import pytest
import torch

from selfforcing_core.latents import (WAN21_LATENT_MEAN, WAN21_LATENT_STD, check_video, comfy_to_generator,
                                      generator_to_comfy, normalised_to_raw, raw_to_normalised)


def test_constants_equal_the_official_float32_values(fixtures_dir):
    config = json.loads((fixtures_dir / "wanvae" / "config.json").read_text())
    assert torch.equal(torch.tensor(WAN21_LATENT_MEAN), torch.tensor(config["latent_mean"]))
    assert torch.equal(torch.tensor(WAN21_LATENT_STD), torch.tensor(config["latent_std"]))


def test_normalised_raw_round_trip_and_formula():
    z = torch.randn(2, 3, 16, 4, 4, dtype=torch.float64)
    raw = normalised_to_raw(z)
    std = torch.tensor(WAN21_LATENT_STD, dtype=torch.float64).view(1, 1, 16, 1, 1)
    mean = torch.tensor(WAN21_LATENT_MEAN, dtype=torch.float64).view(1, 1, 16, 1, 1)
    torch.testing.assert_close(raw, z * std + mean, atol=1e-6, rtol=0)  # 1/std built in float32
    torch.testing.assert_close(raw_to_normalised(raw), z, atol=1e-12, rtol=0)


def test_generator_comfy_layouts():
    z = torch.randn(1, 5, 16, 2, 3)
    samples = generator_to_comfy(z)
    assert samples.shape == (1, 16, 5, 2, 3)
    torch.testing.assert_close(samples, normalised_to_raw(z.transpose(1, 2), channel_dim=1))
    torch.testing.assert_close(comfy_to_generator(samples), z, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"\[B, 16, F, H, W\]"):
        comfy_to_generator(z)


@pytest.mark.host
def test_host_wan21_format_matches_our_conversions(comfy_import):
    formats = comfy_import("comfy.latent_formats")
    wan21 = formats.Wan21()
    samples = torch.randn(1, 16, 5, 4, 4) * 2 + 0.3  # a ComfyUI LATENT: raw values
    generator_latents = comfy_to_generator(samples)
    torch.testing.assert_close(generator_latents, wan21.process_in(samples).transpose(1, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(generator_to_comfy(generator_latents), wan21.process_out(wan21.process_in(samples)),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(wan21.process_out(generator_latents.transpose(1, 2)), generator_to_comfy(generator_latents),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(WAN21_LATENT_MEAN), wan21.latents_mean.flatten(), atol=0, rtol=0)
    torch.testing.assert_close(torch.tensor(WAN21_LATENT_STD), wan21.latents_std.flatten(), atol=0, rtol=0)


def test_check_video_names_expected_and_given():
    check_video(torch.zeros(1, 2, 16, 4, 4), 16, "latents")
    with pytest.raises(ValueError, match=r"look like \[B, C, T, H, W\].*x.transpose\(1, 2\)"):
        check_video(torch.zeros(1, 16, 2, 4, 4), 16, "latents")
    with pytest.raises(ValueError, match=r"5-D \[B, T, 16, H, W\], got shape \(16, 4, 4\)"):
        check_video(torch.zeros(16, 4, 4), 16, "latents")
