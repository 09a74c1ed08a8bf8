"""TAEHV: fixture parity, streaming == whole clip, layout inference, loading rules, bad input."""
import json

import pytest
import torch

from support.decoder_weights import taehv_shapes, taehv_state_dict
from selfforcing_core.codec_loading import load_codec
from selfforcing_core.latents import normalised_to_raw
from selfforcing_core.parity import taehv_fixture
from selfforcing_core.taehv import TAEHV


@pytest.fixture
def model64():
    return TAEHV.from_state_dict(taehv_state_dict(seed=1)).double().eval()


def test_fixture_parity(fixtures_dir):
    comparisons = taehv_fixture.run(fixtures_dir / "taehv")
    assert {c.tensor for c in comparisons} >= {"decoder_raw", "decoded", "encoded"}
    assert all(c.passed for c in comparisons), [c.line() for c in comparisons if not c.passed]


def test_layout_matches_real_checkpoint(fixtures_dir):
    real = json.loads((fixtures_dir / "taehv" / "real_model_keys_taew2_1.json").read_text())["taehv_taew2_1"]
    assert {k: list(v) for k, v in taehv_shapes().items()} == real
    model = TAEHV.from_state_dict({k: torch.zeros(v) for k, v in real.items()})
    assert sum(p.numel() for p in model.decoder.parameters()) == 9_844_611
    assert sum(p.numel() for p in model.encoder.parameters()) == 1_470_928


@pytest.mark.parametrize("block", [1, 3])
def test_streaming_decode_equals_whole_clip(model64, block):
    latents = torch.randn(2, 7, 16, 4, 6, dtype=torch.float64)
    whole = model64.decode_video(latents)
    assert whole.shape == (2, 1 + 4 * 6, 3, 32, 48)
    stream = model64.stream()
    parts = [stream.decode(latents[:, i:i + block]) for i in range(0, 7, block)]
    assert [p.shape[1] for p in parts][0] == 4 * block - 3
    assert stream.flush() is None
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-12, rtol=0)


def test_decode_video_is_trimmed_clamped_raw_output(model64):
    latents = torch.randn(1, 3, 16, 4, 4, dtype=torch.float64)
    raw = model64.decode_raw(latents)
    assert raw.shape[1] == 12
    torch.testing.assert_close(model64.decode_video(latents), raw[:, 3:].clamp(0, 1), atol=1e-12, rtol=0)


def test_streaming_encode_equals_whole_clip(model64):
    video = torch.rand(1, 10, 3, 32, 32, dtype=torch.float64)  # padded to 12 frames -> 3 latents
    whole = model64.encode_video(video)
    assert whole.shape == (1, 3, 16, 4, 4)
    padded = torch.cat([video, video[:, -1:], video[:, -1:]], 1)
    torch.testing.assert_close(model64.encode_video(padded), whole, atol=1e-12, rtol=0)
    stream = model64.stream()
    parts = [stream.encode(video[:, i:i + 3]) for i in range(0, 10, 3)] + [stream.flush()]
    assert parts[0] is None  # 3 frames do not complete a latent
    torch.testing.assert_close(torch.cat([p for p in parts if p is not None], 1), whole, atol=1e-12, rtol=0)


def test_flush_ends_the_clip_the_same_way_for_decoding_and_encoding(model64):
    """flush() returns what is pending (decode: nothing; encode: the padded tail) and resets the
    stream, so the next clip starts fresh in either direction; one stream never mixes directions."""
    latents, video = torch.randn(1, 2, 16, 4, 4, dtype=torch.float64), torch.rand(1, 5, 3, 32, 32, dtype=torch.float64)
    stream = model64.stream()
    stream.decode(latents)
    with pytest.raises(ValueError, match="decodes a clip"):
        stream.encode(video)
    assert stream.flush() is None
    first = stream.encode(video[:, :3])
    tail = stream.flush()
    torch.testing.assert_close(torch.cat([p for p in (first, tail) if p is not None], 1), model64.encode_video(video[:, :3]),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(stream.decode(latents), model64.decode_video(latents), atol=1e-12, rtol=0)


def test_decoder_start_up_frames_follow_the_time_upscaling(model64):
    assert model64.startup_frames == 3  # two stride-2 TGrows: 4 frames per latent, latent 0 -> 1 frame


def test_tgrow_with_extra_output_channels_keeps_trailing_ones():
    sd = taehv_state_dict(seed=2)
    wide = dict(sd, **{"decoder.7.conv.weight": torch.cat([torch.randn_like(sd["decoder.7.conv.weight"]),
                                                          sd["decoder.7.conv.weight"]])})
    latents = torch.randn(1, 2, 16, 4, 4)
    expected = TAEHV.from_state_dict(sd).decode_video(latents)
    torch.testing.assert_close(TAEHV.from_state_dict(wide).decode_video(latents), expected, atol=0, rtol=0)


def test_raw_latent_variant_unnormalises_first():
    sd = taehv_state_dict(seed=3)
    latents = torch.randn(1, 2, 16, 4, 4)
    light = TAEHV.from_state_dict(sd, latent_space="raw")
    plain = TAEHV.from_state_dict(sd, latent_space="normalised")
    torch.testing.assert_close(light.decode_video(latents), plain.decode_video(normalised_to_raw(latents)))
    assert TAEHV.latent_space_for_name("lighttaew2_1.safetensors") == "raw"
    assert TAEHV.latent_space_for_name("taew2_1.pth") == "normalised"


def test_pth_and_safetensors_files_load_alike(tmp_path):
    from safetensors.torch import save_file

    sd = taehv_state_dict(seed=4)
    torch.save(sd, tmp_path / "taew2_1.pth")
    save_file(sd, str(tmp_path / "lighttaew2_1.safetensors"))
    from_pth, from_st = load_codec(tmp_path / "taew2_1.pth"), load_codec(tmp_path / "lighttaew2_1.safetensors")
    assert (from_pth.latent_space, from_st.latent_space) == ("normalised", "raw")
    for key, value in from_pth.state_dict().items():
        assert torch.equal(value, from_st.state_dict()[key])


def test_half_precision_weights_load_as_requested_dtype():
    sd = {k: v.half() for k, v in taehv_state_dict(seed=5).items()}
    latents = torch.randn(1, 2, 16, 4, 4)
    model32 = load_codec(sd, dtype=torch.float32)
    reference = TAEHV.from_state_dict({k: v.float() for k, v in sd.items()}).decode_video(latents)
    torch.testing.assert_close(model32.decode_video(latents), reference, atol=0, rtol=0)
    frames_bf16 = load_codec(sd, dtype=torch.bfloat16).decode_video(latents)
    assert frames_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(frames_bf16.float(), reference, atol=0.05, rtol=0)


def test_bad_inputs_have_clear_errors(model64):
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\].*transpose"):
        model64.stream().decode(torch.randn(1, 16, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"16 channels.*got shape \(1, 3, 4, 4, 4\)"):
        model64.decode_video(torch.randn(1, 3, 4, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="3 channels"):
        model64.encode_video(torch.rand(1, 4, 4, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="missing decoder.3.conv.0.weight"):
        TAEHV.from_state_dict({k: v for k, v in taehv_state_dict().items() if not k.startswith("decoder.3.")})
    decoder_only = TAEHV.from_state_dict({k: v for k, v in taehv_state_dict().items() if k.startswith("decoder.")})
    with pytest.raises(ValueError, match="no encoder"):
        decoder_only.encode_video(torch.rand(1, 4, 3, 32, 32))
