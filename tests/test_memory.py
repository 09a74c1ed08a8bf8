"""Memory estimate: exact for weights and caches, within 10% of the measured activation peaks; the guards."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from selfforcing_core import memory
from selfforcing_core.checkpoint import load_generator
from selfforcing_core.config import WAN_T2V_1P3B as REAL_1P3B
from selfforcing_core.families import FAMILIES
from selfforcing_core.generate import cache_and_call_frames, check_video_fits
from selfforcing_core.memory import (MemoryGuardError, activation_bytes, decoder_activation_bytes, estimate_for_model,
                                     estimate_memory, frame_bytes)
from selfforcing_core.model import CausalWanModel, WanConfig
from selfforcing_core.offload import offload_blocks
from selfforcing_core.taehv import TAEHV
from selfforcing_core.wan_vae import WanVAE
from support.decoder_weights import taehv_state_dict, wan_vae_state_dict
from support.tiny import TINY



def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("fp8, granularity", [("off", "tensor"), ("e4m3fn", "tensor"), ("e5m2", "channel")])
def test_weight_bytes_equal_loaded_model(fp8, granularity):
    torch.manual_seed(0)
    model = load_generator(CausalWanModel(TINY).state_dict(), dtype="fp32", num_heads=2, text_len=16,
                           fp8=fp8, fp8_granularity=granularity)
    estimate = estimate_memory(TINY, 64, 64, dtype=torch.float32, fp8=fp8, fp8_granularity=granularity)
    assert estimate.weights == tensor_bytes(model.state_dict().values())


def test_offloaded_weights_leave_the_device_total():
    torch.manual_seed(0)
    model = CausalWanModel(TINY)
    offload_blocks(model, 1, "cpu")
    estimate = estimate_memory(TINY, 64, 64, dtype=torch.float32, offload_blocks=1)
    assert estimate.offloaded_weights == tensor_bytes(model.blocks[0].offload.host)
    assert estimate.weights + estimate.offloaded_weights == tensor_bytes(model.state_dict().values())


@pytest.mark.parametrize("window", [None, 6])
def test_cache_bytes_equal_allocated_cache(window):
    model = CausalWanModel(TINY).eval()
    cache = model.new_kv_cache(8, 12, window or 9, rolling=window is not None)
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 8, 12), torch.full((1, 3), 500.0), torch.randn(1, 4, 32), kv_cache=cache)
    estimate = estimate_memory(TINY, 64, 96, kv_window_frames=window, num_frames=9, dtype=torch.float32)
    assert estimate.kv_cache == tensor_bytes([cache.k, cache.v])
    assert estimate.cross_cache == tensor_bytes(cache.cross_k + cache.cross_v)


def peak_live_bytes(fn) -> int:
    """Peak of CPU bytes allocated and not yet freed while ``fn`` runs (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dim, ffn_dim", [(512, 512), (256, 1536)])  # normalisation-bound, FFN-bound
def test_activation_estimate_matches_measured_peak_of_one_block_call(dim, ffn_dim):
    cfg = WanConfig(dim=dim, ffn_dim=ffn_dim, num_layers=1, num_heads=dim // 128, text_dim=64, text_len=32)
    model = CausalWanModel(cfg).eval()
    cache = model.new_kv_cache(20, 20, 6)
    x, t, prompt = torch.randn(1, 3, 16, 20, 20), torch.full((1, 3), 500.0), torch.randn(1, 32, 64)
    with torch.no_grad():
        model(x, t, prompt, kv_cache=cache)  # fills the text cache, as every call after the first
        measured = peak_live_bytes(lambda: model(x, t, prompt, kv_cache=cache))
    estimate = activation_bytes(cfg, 3 * 10 * 10, torch.float32)
    assert abs(measured - estimate) < 0.1 * measured


def test_real_model_at_480x832_kv_window_is_the_memory_dial():
    cfg = REAL_1P3B
    small, large = (estimate_memory(cfg, 480, 832, kv_window_frames=w) for w in (6, 12))
    per_frame = 2 * 30 * 1560 * 1536 * 2  # k, v x layers x tokens x channels x bf16 bytes
    assert large.kv_cache - small.kv_cache == 6 * per_frame
    assert estimate_memory(cfg, 480, 832).kv_cache == 21 * per_frame  # global cache: 21 frames
    assert large.weights == small.weights == 2 * 1_418_996_800  # parameter count of SPEC 1.1


def test_video_size_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="width 830 is not a positive multiple of 16"):
        estimate_memory(REAL_1P3B, 480, 830)


def test_estimate_for_a_loaded_model_reads_its_dtype_fp8_format_and_offload():
    torch.manual_seed(0)
    model = load_generator(CausalWanModel(TINY).state_dict(), dtype="fp32", num_heads=2, text_len=16,
                           fp8="e5m2", fp8_granularity="channel")
    offload_blocks(model, 1, "cpu")
    expected = estimate_memory(TINY, 64, 48, 6, 9, dtype=torch.float32, fp8="e5m2", fp8_granularity="channel",
                               offload_blocks=1)
    assert estimate_for_model(model, 64, 48, 6, 9) == expected
    assert estimate_for_model(model, 64, 48, 6, 9).offloaded_weights > 0


@pytest.mark.parametrize("codec_name, frames, latent_h, latent_w", [("taehv", 3, 8, 12), ("wan_vae", 1, 6, 10)])
def test_traced_decoder_activations_match_the_measured_peak_of_one_block_decode(codec_name, frames, latent_h, latent_w):
    """The fake-tensor trace counts the tensors the real decode holds (none of it is allocated)."""
    codec = {"taehv": lambda: TAEHV.from_state_dict(taehv_state_dict()),
             "wan_vae": lambda: WanVAE.from_state_dict(wan_vae_state_dict())}[codec_name]().eval()
    block = torch.randn(1, frames, 16, latent_h, latent_w)
    codec.stream().decode(block)  # first calls of a kernel may allocate once
    measured = peak_live_bytes(lambda: codec.stream().decode(block))
    assert abs(decoder_activation_bytes(codec, frames, latent_h, latent_w) - measured) < 0.1 * measured


@pytest.fixture
def free_memory(monkeypatch):
    """Set the free memory the guard sees: call with a byte count."""
    def set_free(nbytes):
        monkeypatch.setattr(memory, "available_memory", lambda device: nbytes)
    return set_free


def need_of(check) -> int:
    """The bytes a guard asks for, read off its refusal when nothing is free."""
    with pytest.raises(MemoryGuardError) as refusal:
        check()
    return refusal.value.need


def test_generation_guard_counts_the_decoders_activations(free_memory):
    model = CausalWanModel(TINY).eval()
    decoder = TAEHV.from_state_dict(taehv_state_dict()).eval()
    settings = FAMILIES["self_forcing"].settings()

    def check(decoder):
        return lambda: check_video_fits(model, 9, (32, 32), settings=settings, decoder=decoder)
    free_memory(0)
    without_decoder, with_decoder = need_of(check(None)), need_of(check(decoder))
    frames = 2 * frame_bytes(33, 256, 256)  # blocks and joined clip, float32, in host memory
    assert with_decoder == without_decoder + frames + decoder_activation_bytes(decoder, 3, 32, 32)
    free_memory(with_decoder)
    check(decoder)()  # a request that fits runs
    free_memory(with_decoder - 1)
    with pytest.raises(MemoryGuardError, match="this video needs about .* is free; lower width, height or length"):
        check(decoder)()
    check(None)()


def test_generation_guard_counts_the_rolling_forcing_window_and_its_clean_cache(free_memory):
    """Rolling Forcing calls the model on its window of 5 blocks at once and keeps 24 clean frames."""
    model = CausalWanModel(TINY).eval()
    family = FAMILIES["rolling_forcing"]
    assert cache_and_call_frames(family.settings()) == (24, 15)

    def check(settings):
        return lambda: check_video_fits(model, 30, (32, 32), settings=settings)
    free_memory(0)
    rolling = need_of(check(family.settings()))
    estimate = estimate_for_model(model, 256, 256, 24, 30, 1, 15)
    assert rolling == estimate.total - estimate.weights
    blockwise = need_of(check(FAMILIES["self_forcing"].settings(kv_window_frames=24)))
    assert blockwise < rolling  # the same cache, one block per call
    free_memory(rolling - 1)
    with pytest.raises(MemoryGuardError, match="lower width, height or length, or the KV window"):
        check(family.settings())()
