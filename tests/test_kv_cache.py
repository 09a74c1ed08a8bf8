"""KVCache contract: append, overwrite on re-denoise, rolling eviction with a pinned sink, reset."""
import pytest
import torch

from selfforcing_core.kv_cache import CacheRules, KVCache

FRAME_SEQLEN = 2


def frame_values(frames, heads=1, head_dim=2):
    """k/v for ``frames`` whose every entry equals the absolute frame index (easy to track)."""
    values = torch.tensor(frames, dtype=torch.float32).repeat_interleave(FRAME_SEQLEN)
    return values.view(1, -1, 1, 1).expand(1, -1, heads, head_dim).clone()


def no_rope(keys, first_position):
    return keys


def write_block(cache, start_frame, num_frames=3, scale=1.0):
    cache.begin_call(start_frame, num_frames)
    frames = list(range(start_frame, start_frame + num_frames))
    k, v = cache.store(0, scale * frame_values(frames), -scale * frame_values(frames), no_rope)
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
    k, v = cache.store(0, k_new, frame_values([3, 4, 5]), no_rope)
    assert not cache.k.requires_grad
    k.sum().backward()
    assert torch.equal(k_new.grad, torch.ones_like(k_new))
    assert cached_frames(k.detach()) == [0, 1, 2, 3, 4, 5]


def recording_rotation(log):
    """A stand-in RoPE that records (first position, frames) and tags keys with their position."""
    def rotate(keys, first_position):
        frames = keys.shape[1] // FRAME_SEQLEN
        log.append((first_position, frames))
        positions = torch.arange(first_position, first_position + frames, dtype=keys.dtype).repeat_interleave(FRAME_SEQLEN)
        return keys + 1000 * positions.view(1, -1, 1, 1)
    return rotate


def test_relative_rope_places_slots_by_index_and_rerotates_the_context_once_per_block():
    rules = CacheRules(rope="relative")
    cache = KVCache(1, FRAME_SEQLEN, 1, 2, capacity_frames=9, sink_frames=3, rolling=True, rules=rules)
    for start in range(0, 30, 3):
        log = []
        for call in range(5):  # 4 denoising steps and the clean pass
            plan = cache.begin_call(start, 3)
            k, _ = cache.store(0, frame_values(range(start, start + 3)), frame_values(range(start, start + 3)),
                               recording_rotation(log))
        assert plan.position == min(start, 6)  # the block's own frames take the last slots
        # keys read back: frame value + 1000 * slot position; raw keys stay unrotated
        assert k[0, ::FRAME_SEQLEN, 0, 0].tolist() == [f + 1000 * slot for slot, f in enumerate(cache.slot_frames)]
        assert cached_frames(cache.k[0][:, :len(cache.slot_frames) * FRAME_SEQLEN]) == cache.slot_frames
        rotated_context = [entry for entry in log if entry != (plan.position, 3)]
        assert rotated_context == ([(3, 3)] if start >= 9 else [])  # moved window slots, first call only


def test_protected_sink_is_never_written_by_recomputations():
    cache = KVCache(1, FRAME_SEQLEN, 1, 2, capacity_frames=9, sink_frames=3, rolling=True,
                    rules=CacheRules(protect_sink=True))
    for step_scale in (5.0, 1.0):  # block 0 is no re-computation: its clean pass fills the sink
        write_block(cache, 0, scale=step_scale)
    for start in (3, 6, 9, 12):
        write_block(cache, start, scale=5.0)
        write_block(cache, start)
    # LongLive's switch re-cache: one call over the whole window [6, 15) ending at the newest frame
    cache.begin_call(6, 9)
    k, _ = cache.store(0, 7.0 * frame_values(range(6, 15)), frame_values(range(6, 15)), no_rope)
    assert cache.slot_frames == [0, 1, 2, 9, 10, 11, 12, 13, 14]
    assert cached_frames(k) == [0, 1, 2] + [7.0 * f for f in range(9, 15)]
    with cache.sink_protection(False):  # global_sink off: the sink is re-written too
        cache.begin_call(6, 9)
        k, _ = cache.store(0, 7.0 * frame_values(range(6, 15)), frame_values(range(6, 15)), no_rope)
    assert cache.slot_frames == list(range(6, 15)) and cached_frames(k) == [7.0 * f for f in range(6, 15)]


def test_sink_larger_than_a_block_keeps_the_first_step_of_the_protected_part():
    """LongLive's quirk with sink > block: block 1's re-computations cannot write inside the sink."""
    cache = KVCache(1, FRAME_SEQLEN, 1, 2, capacity_frames=9, sink_frames=4, rolling=True,
                    rules=CacheRules(protect_sink=True))
    cache.reset()
    k, _ = write_block(cache, 0)
    assert k.shape[1] == 4 * FRAME_SEQLEN and cached_frames(k)[3] == 0  # zero-filled sink slot attended
    write_block(cache, 3, scale=5.0)
    k, _ = write_block(cache, 3)
    assert cached_frames(k) == [0, 1, 2, 15.0, 4, 5]
