"""Wan 2.1 VAE: fixture parity, ComfyUI parity, chunked == whole clip, cache bounds, bad input."""
import json

import pytest
import torch

from support.decoder_weights import wan_vae_shapes, wan_vae_state_dict
from selfforcing_core.codec_loading import load_codec
from selfforcing_core.latents import normalised_to_raw, raw_to_normalised
from selfforcing_core.parity import wanvae_fixture
from selfforcing_core.wan_vae import WanVAE
from support.rounding import assert_float64_orders_agree, assert_within_float32_reductions, module_reductions


@pytest.fixture(scope="module")
def sd():
    return wan_vae_state_dict(dim=4, seed=7)


@pytest.fixture(scope="module")
def model64(sd):
    return WanVAE.from_state_dict(sd).double().eval()


@pytest.mark.slow
def test_fixture_parity(fixtures_dir):
    comparisons = wanvae_fixture.run(fixtures_dir / "wanvae")
    names = {c.tensor for c in comparisons}
    assert names >= {"encoder_out", "encode_mu", "encode_latents", "decode_raw", "decode_chunked (blocks of 3)"}
    assert all(c.passed for c in comparisons), [c.line() for c in comparisons if not c.passed]


def test_layout_matches_real_checkpoint(fixtures_dir):
    real = json.loads((fixtures_dir / "wanvae" / "real_model_keys_wan2_1_vae.json").read_text())["keys"]
    assert {k: list(v) for k, v in wan_vae_shapes(96).items()} == real
    with torch.device("meta"):
        model = WanVAE.from_state_dict({k: torch.zeros(v) for k, v in real.items()})
    assert sum(p.numel() for p in model.parameters()) == 126_892_531


@pytest.mark.parametrize("block", [1, 2, 3])
def test_streaming_decode_equals_whole_clip(model64, block):
    latents = torch.randn(1, 5, 16, 2, 3, dtype=torch.float64)
    with torch.no_grad():  # the whole clip as one chunk
        whole = model64.decode_raw(normalised_to_raw(latents).transpose(1, 2), {})
    whole = whole.clamp(-1, 1).transpose(1, 2) / 2 + 0.5
    assert whole.shape == (1, 17, 3, 16, 24)
    stream = model64.stream()
    parts = [stream.decode(latents[:, i:i + block]) for i in range(0, 5, block)]
    assert parts[0].shape[1] == 1 + 4 * (block - 1)
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(model64.decode_video(latents), whole, atol=1e-12, rtol=0)


def test_decode_cache_holds_at_most_two_frames_per_layer(model64):
    stream = model64.stream()
    for _ in range(3):
        stream.decode(torch.randn(1, 3, 16, 2, 2, dtype=torch.float64))
    cached = [v for v in stream.state.values() if isinstance(v, torch.Tensor)]
    assert cached and max(v.shape[2] for v in cached) <= 2


def test_chunked_encode_equals_whole_clip_and_drops_incomplete_tail(model64):
    video = torch.rand(1, 11, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        whole_mu = model64.encode_mean(video[:, :9].transpose(1, 2) * 2 - 1, {})
    latents = model64.encode_video(video)  # 11 = 1 + 4*2 + 2: the last 2 frames are dropped
    assert latents.shape == (1, 3, 16, 2, 2)
    stream = model64.stream()
    parts = [stream.encode(video[:, i:i + 2]) for i in range(0, 11, 2)] + [stream.flush()]
    streamed = torch.cat([p for p in parts if p is not None], 1)
    torch.testing.assert_close(streamed, latents, atol=1e-12, rtol=0)
    torch.testing.assert_close(latents, raw_to_normalised(whole_mu.transpose(1, 2)), atol=1e-12, rtol=0)


def _comfy_vae(comfy_import, sd, dim):
    vae = comfy_import("comfy.ldm.wan.vae")
    model = vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True], dropout=0.0)
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.mark.host
def test_decoder_and_encoder_match_comfyui(sd, comfy_import):
    host = _comfy_vae(comfy_import, sd, dim=4).double()  # float64: the two implementations differ in rounding only
    ours = WanVAE.from_state_dict(sd).eval().double()
    z_raw = torch.randn(1, 16, 4, 4, 4, dtype=torch.float64) * 2
    video = torch.rand(1, 3, 9, 32, 32, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        assert_float64_orders_agree(ours.decode_raw(z_raw, {}), host.decode(z_raw))
        assert_float64_orders_agree(ours.encode_mean(video, {}), host.encode(video))


@pytest.mark.host
def test_fixture_weights_match_comfyui(fixtures_dir, comfy_import):
    from safetensors.torch import load_file

    root = fixtures_dir / "wanvae"
    sd = load_file(str(root / "weights.safetensors"))
    outputs, inputs = load_file(str(root / "outputs.safetensors")), load_file(str(root / "inputs.safetensors"))
    host = _comfy_vae(comfy_import, sd, dim=json.loads((root / "config.json").read_text())["narrowed_dim"])
    ours = WanVAE.from_state_dict(sd).eval()
    with torch.no_grad():
        ours_decoded = ours.decode_raw(inputs["latents_raw"], {})
        host_decoded = host.decode(inputs["latents_raw"])
    reductions = module_reductions(ours.decoder)  # float32 here: the fixture was computed in float32 elsewhere
    assert_within_float32_reductions(ours_decoded, host_decoded, *reductions)
    assert_within_float32_reductions(host_decoded, outputs["decode_raw"], *reductions)


def test_files_and_dtypes(tmp_path, sd):
    from safetensors.torch import save_file

    torch.save(sd, tmp_path / "Wan2.1_VAE.pth")
    save_file(sd, str(tmp_path / "wan_2.1_vae.safetensors"))
    latents = torch.randn(1, 2, 16, 4, 4)
    from_pth = load_codec(tmp_path / "Wan2.1_VAE.pth")
    assert isinstance(from_pth, WanVAE)
    expected = from_pth.decode_video(latents)
    torch.testing.assert_close(load_codec(tmp_path / "wan_2.1_vae.safetensors").decode_video(latents), expected,
                               atol=0, rtol=0)
    frames_bf16 = load_codec(sd, dtype=torch.bfloat16).decode_video(latents)
    assert frames_bf16.dtype == torch.bfloat16 and frames_bf16.shape == expected.shape


def test_bad_inputs_have_clear_errors(sd, model64):
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\].*transpose"):
        model64.decode_video(torch.randn(1, 16, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"16 channels.*got shape \(1, 2, 4, 4, 4\)"):
        model64.stream().decode(torch.randn(1, 2, 4, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="missing decoder.conv1.weight"):
        WanVAE.from_state_dict({k: v for k, v in sd.items() if k != "decoder.conv1.weight"})
    with pytest.raises(ValueError, match="unexpected"):
        WanVAE.from_state_dict(dict(sd, **{"decoder.extra.weight": torch.zeros(1)}))
    decoder_only = WanVAE.from_state_dict({k: v for k, v in sd.items() if not k.startswith(("encoder.", "conv1."))})
    with pytest.raises(ValueError, match="no encoder"):
        decoder_only.encode_video(torch.rand(1, 5, 3, 32, 32))
