"""KVCache contract: append, overwrite on re-denoise, rolling eviction with a pinned sink, reset."""
import pytest
import torch

from selfforcing_core.kv_cache import KVCache

FRAME_SEQLEN = 2


def frame_values(frames, heads=1, head_dim=2):
    """k/v for ``frames`` whose every entry equals the absolute frame index (easy to track)."""
    values = torch.tensor(frames, dtype=torch.float32).repeat_interleave(FRAME_SEQLEN)
    return values.view(1, -1, 1, 1).expand(1, -1, heads, head_dim).clone()


def write_block(cache, start_frame, num_frames=3, scale=1.0):
    cache.begin_call(start_frame, num_frames)
    frames = list(range(start_frame, start_frame + num_frames))
    k, v = cache.store(0, scale * frame_values(frames), -scale * frame_values(frames))
    return k, v


def cached_frames(k):
    return k[0, ::FRAME_SEQLEN, 0, 0].tolist()


def test_global_cache_appends_blocks_in_order():
    cache = KVCache(1, FRAME_SEQLEN, 1, 2, capacity_frames=9)
    for start in (0, 3, 6):
        k, v = write_block(cache, start)
    assert cached_frames(k) == list(range(9))
    assert cached_frames(-v) == list(range(9))


def test_repeated_calls_overwrite_the_block_instead_of_appending():
    cache = KVCache(1, FRAME_SEQLEN, 1, 2, capacity_frames=6)
    write_block(cache, 0)
    for step_scale in (10.0, 20.0, 1.0):  # denoising steps, then the clean-context pass
        k, _ = write_block(cache, 3, scale=step_scale)
        assert cache.slot_frames == [0, 1, 2, 3, 4, 5]
    assert cached_frames(k) == [0, 1, 2, 3, 4, 5]


def test_rolling_window_evicts_oldest_frames_and_pins_the_sink():
    # Window 7 with a 1-frame sink, blocks of 3: block 2 evicts 2 frames, block 3 evicts 3.
    cache = KVCache(1, FRAME_SEQLEN, 1, 2, capacity_frames=7, sink_frames=1, rolling=True)
    history = []
    for start in (0, 3, 6, 9):
        write_block(cache, start, scale=5.0)  # a denoising step ...
        k, v = write_block(cache, start)  # ... then the clean pass overwrites it
        history.append(cached_frames(k))
        assert cached_frames(-v) == cached_frames(k)
    assert history == [[0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 3, 4, 5, 6, 7, 8], [0, 6, 7, 8, 9, 10, 11]]


def test_rolling_window_without_sink_keeps_the_last_frames():
    cache = KVCache(1, FRAME_SEQLEN, 1, 2, capacity_frames=6, rolling=True)
    for start in (0, 3, 6, 9):
        k, _ = write_block(cache, start)
    assert cached_frames(k) == [6, 7, 8, 9, 10, 11]


def test_rolling_buffers_are_allocated_once_for_any_number_of_blocks():
    cache = KVCache(2, FRAME_SEQLEN, 1, 2, capacity_frames=6, sink_frames=3, rolling=True)
    pointer = cache.k.data_ptr()
    for block in range(200):
        k, _ = write_block(cache, 3 * block)
    assert cache.k.data_ptr() == pointer and cache.k.shape[2] == 6 * FRAME_SEQLEN
    assert cached_frames(k) == [0, 1, 2, 597, 598, 599]


def test_global_cache_refuses_to_overflow_with_a_clear_message():
    cache = KVCache(1, FRAME_SEQLEN, 1, 2, capacity_frames=3)
    write_block(cache, 0)
    with pytest.raises(ValueError, match="kv_window_frames"):
        write_block(cache, 3)


def test_writing_an_old_block_again_is_refused():
    cache = KVCache(1, FRAME_SEQLEN, 1, 2, capacity_frames=9)
    write_block(cache, 0)
    write_block(cache, 3)
    with pytest.raises(ValueError, match="in order"):
        write_block(cache, 0)


def test_reset_empties_self_and_cross_attention_caches():
    cache = KVCache(1, FRAME_SEQLEN, 1, 2, capacity_frames=6)
    write_block(cache, 0)
    cache.cross(0, lambda: (torch.ones(1), torch.ones(1)))
    cache.reset()
    assert cache.slot_frames == [] and cache.cross_k == [None]
    k, _ = write_block(cache, 0)
    assert cached_frames(k) == [0, 1, 2]


def test_cross_attention_projection_is_computed_once_until_invalidated():
    cache = KVCache(1, FRAME_SEQLEN, 1, 2, capacity_frames=3)
    calls = []

    def project():
        calls.append(1)
        return torch.full((1,), float(len(calls))), torch.zeros(1)

    assert cache.cross(0, project)[0].item() == 1.0
    assert cache.cross(0, project)[0].item() == 1.0
    cache.invalidate_prompt()
    assert cache.cross(0, project)[0].item() == 2.0 and len(calls) == 2


def test_gradients_flow_through_the_current_call_only():
    cache = KVCache(1, FRAME_SEQLEN, 1, 2, capacity_frames=6)
    write_block(cache, 0)
    cache.begin_call(3, 3)
    k_new = frame_values([3, 4, 5]).requires_grad_(True)
    k, v = cache.store(0, k_new, frame_values([3, 4, 5]))
    assert not cache.k.requires_grad
    k.sum().backward()
    assert torch.equal(k_new.grad, torch.ones_like(k_new))
    assert cached_frames(k.detach()) == [0, 1, 2, 3, 4, 5]
