"""Streaming rollout: cache vs recompute equality, official fixtures, prompt switching, noise sources."""
import pytest
import torch

from selfforcing_core.kv_cache import CacheRules
from selfforcing_core.parity import run_parity
from selfforcing_core.rollout import (NoiseSource, PromptSwitch, StreamSettings, block_plan, max_latent_frames,
                                      sample_video,
                                      stream_blocks, write_clean_context)
from selfforcing_core.schedule import FlowMatchSchedule
from support.rounding import assert_float64_orders_agree
from support.tiny import tiny_model, tiny_prompt

LATENT = (16, 8, 6)  # non-square latent: 4 x 3 = 12 tokens per frame


def record_cached_calls(model):
    """Record (x, t, start_frame, flow) of every model call made in cached mode."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((args[0].clone(), args[1].clone(), kwargs["start_frame"], output.clone()))

    return calls, model.register_forward_hook(hook, with_kwargs=True)


def seeded(seed):
    return NoiseSource(generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("window", [None, 6, 7])
def test_cached_rollout_equals_block_causal_recompute(window):
    """Every denoising call against the cache equals a full-sequence block-causal forward over
    [clean earlier frames at t = 0, the current block at its t] (windowed: the mask's window)."""
    model, prompt = tiny_model().double(), tiny_prompt().double()  # float64: the orders differ in rounding only
    calls, handle = record_cached_calls(model)
    latents = sample_video(model, prompt, 4, LATENT, noise=seeded(3),
                           settings=StreamSettings(kv_window_frames=window))
    handle.remove()
    assert len(calls) == 4 * 5  # 4 denoising calls + 1 clean-context pass per block
    for x, t, start_frame, flow in calls:
        history = latents[:, :start_frame]
        sequence = torch.cat([history, x], dim=1)
        t_full = torch.cat([torch.zeros(1, start_frame), t], dim=1)
        full = model(sequence, t_full, prompt, mode="block_causal", window_frames=window)
        assert_float64_orders_agree(full[:, start_frame:], flow)


def test_rollout_reproduces_official_fixtures(fixtures_dir):
    comparisons = run_parity(fixtures_dir / "selfforcing")
    assert comparisons and all(c.passed for c in comparisons), [c.line() for c in comparisons]


def test_blocks_stream_out_before_later_blocks_are_computed():
    model, prompt = tiny_model(), tiny_prompt()
    calls, handle = record_cached_calls(model)
    stream = stream_blocks(model, prompt, 3, LATENT, noise=seeded(0))
    first = next(stream)
    assert first.shape == (1, 3, *LATENT) and len(calls) == 5
    handle.remove()


def test_seeded_stream_is_reproducible_and_callback_sees_every_block():
    model, prompt = tiny_model(), tiny_prompt()
    seen = []
    a = sample_video(model, prompt, 3, LATENT, noise=seeded(7), callback=lambda info: seen.append(info["block"]))
    b = sample_video(model, prompt, 3, LATENT, noise=seeded(7))
    assert torch.equal(a, b) and seen == [0, 1, 2]
    assert not torch.equal(a, sample_video(model, prompt, 3, LATENT, noise=seeded(8)))


def test_endless_stream_runs_past_any_global_capacity_with_a_window():
    model, prompt = tiny_model(), tiny_prompt()
    stream = stream_blocks(model, prompt, None, LATENT, noise=seeded(0),
                           settings=StreamSettings(kv_window_frames=6, sink_frames=3))
    blocks = [next(stream) for _ in range(8)]
    assert len(blocks) == 8 and all(torch.isfinite(b).all() for b in blocks)
    with pytest.raises(ValueError, match="kv_window_frames"):
        next(stream_blocks(model, prompt, None, LATENT, noise=seeded(0)))


def test_relative_rope_equals_absolute_until_the_window_first_evicts():
    """Block-relativistic RoPE places slot i at position i: identical to absolute positions while
    no frame was evicted, different from the first block generated after an eviction."""
    model, prompt = tiny_model(), tiny_prompt()

    def run(rope, window, blocks=4):
        rules = CacheRules(rope=rope, protect_sink=True, switch_recache="window")
        return sample_video(model, prompt, blocks, LATENT, noise=seeded(4),
                            settings=StreamSettings(cache_rules=rules, kv_window_frames=window, sink_frames=3))

    assert torch.equal(run("relative", 12), run("absolute", 12))
    relative, absolute = run("relative", 6), run("absolute", 6)
    assert torch.equal(relative[:, :6], absolute[:, :6])
    assert (relative[:, 6:9] - absolute[:, 6:9]).abs().max() > 1e-3


def test_callback_exception_stops_the_stream():
    model, prompt = tiny_model(), tiny_prompt()

    def interrupt(info):
        if info["block"] == 1:
            raise KeyboardInterrupt

    produced = []
    with pytest.raises(KeyboardInterrupt):
        for block in stream_blocks(model, prompt, 5, LATENT, noise=seeded(0), callback=interrupt):
            produced.append(block)
    assert len(produced) == 1


def test_switch_to_the_same_prompt_changes_nothing():
    """Re-caching the whole global cache under an unchanged prompt must reproduce it exactly."""
    model, prompt = tiny_model(), tiny_prompt()
    plain = sample_video(model, prompt, 4, LATENT, noise=seeded(5))
    switched = sample_video(model, prompt, 4, LATENT, noise=seeded(5),
                            settings=StreamSettings(prompt_switches=[PromptSwitch(2, prompt)]))
    torch.testing.assert_close(switched, plain, atol=0, rtol=0)


@pytest.mark.parametrize("window,sink,switch", [(None, 0, 2), (7, 1, 2), (7, 1, 3)])
def test_prompt_switch_rebuilds_both_caches_under_the_new_prompt(window, sink, switch):
    model, old, new = tiny_model(), tiny_prompt(1), tiny_prompt(2)
    states = []
    settings = StreamSettings(kv_window_frames=window, sink_frames=sink, prompt_switches=[PromptSwitch(switch, new)])
    latents = sample_video(model, old, 4, LATENT, noise=seeded(5), settings=settings,
                           callback=lambda info: states.append((info["block"],
                                                                list(info["state"].kv_cache.slot_frames))))
    plain = sample_video(model, old, 4, LATENT, noise=seeded(5),
                         settings=StreamSettings(kv_window_frames=window, sink_frames=sink))
    first = 3 * switch
    torch.testing.assert_close(latents[:, :first], plain[:, :first], atol=0, rtol=0)  # blocks before it: untouched
    assert not torch.allclose(latents[:, first:], plain[:, first:], atol=1e-3)

    # Reference for the cache right after the switch: the frames cached after block 1, written
    # into an empty cache under the new prompt, in their blocks and at their positions.
    frames_before_switch = dict(states)[switch - 1]
    cache = model.new_kv_cache(*LATENT[1:], capacity_frames=window or 12, sink_frames=sink, rolling=window is not None)
    captured = {}

    def capture(info):
        if info["block"] == switch:
            captured["state"] = info["state"]

    with torch.no_grad():
        for block_start in sorted({3 * (f // 3) for f in frames_before_switch}):
            group = [f for f in frames_before_switch if 3 * (f // 3) == block_start]
            write_clean_context(model, latents[:, group[0]:group[-1] + 1], new, cache, group[0])
    replay = model.new_kv_cache(*LATENT[1:], capacity_frames=window or 12, sink_frames=sink, rolling=window is not None)
    stream = stream_blocks(model, old, 4, LATENT, noise=seeded(5), settings=settings, kv_cache=replay,
                           callback=capture)
    with torch.no_grad():
        for _ in range(switch):
            next(stream)
        calls, handle = record_cached_calls(model)
        next(stream)
        handle.remove()
    # The first denoising call after the switch attended to the re-cached frames; recompute it against `cache`.
    x, t, start_frame, flow = next(call for call in calls if call[2] == first)
    expected = model(x, t, new, kv_cache=cache, start_frame=start_frame)
    torch.testing.assert_close(flow, expected, atol=0, rtol=0)
    cross_k = captured["state"].kv_cache.cross_k[0]
    projected_k, _ = model.blocks[0].cross_attn.project_context(model.embed_text(new))
    torch.testing.assert_close(cross_k, projected_k)


def test_switch_without_recache_keeps_the_cached_frames_and_moves_only_the_cross_attention():
    """switch_recache 'none': the first call after the switch attends to the cache exactly as the
    earlier prompt left it, with the new prompt's cross-attention."""
    import copy

    model, old, new = tiny_model(), tiny_prompt(1), tiny_prompt(2)
    settings = StreamSettings(kv_window_frames=6, sink_frames=3, cache_rules=CacheRules(switch_recache="none"),
                              prompt_switches=[PromptSwitch(2, new)])
    kept = {}
    stream = stream_blocks(model, old, 3, LATENT, noise=seeded(5), settings=settings,
                           callback=lambda info: kept.setdefault(info["block"], copy.deepcopy(info["state"].kv_cache)))
    with torch.no_grad():
        next(stream), next(stream)
        calls, handle = record_cached_calls(model)
        next(stream)
        handle.remove()
        cache = kept[1]
        cache.invalidate_prompt()
        x, t, start_frame, flow = calls[0]
        assert start_frame == 6 and len(calls) == 5  # 4 steps and the clean pass, no re-cache call
        torch.testing.assert_close(flow, model(x, t, new, kv_cache=cache, start_frame=start_frame), atol=1e-5,
                                   rtol=1e-5)


def test_a_switch_with_its_own_recache_rule_equals_the_stream_wide_rule():
    """A PromptSwitch's ``recache`` applies that re-cache to its switch exactly as the stream's
    CacheRules would; other switches keep the stream's rule."""
    model, old, new, newer = tiny_model(), tiny_prompt(1), tiny_prompt(2), tiny_prompt(3)

    def frames(cache_rules, switches):
        settings = StreamSettings(kv_window_frames=6, sink_frames=3, cache_rules=cache_rules, prompt_switches=switches)
        return torch.cat(list(stream_blocks(model, old, 4, LATENT, noise=seeded(5), settings=settings)), dim=1)

    replayed = frames(CacheRules(), [PromptSwitch(2, new)])
    for recache in ({"switch_recache": "none"}, {"switch_recache": "window", "global_sink": False}):
        own = frames(CacheRules(), [PromptSwitch(2, new, recache)])
        assert torch.equal(own, frames(CacheRules(**recache), [PromptSwitch(2, new)]))
        assert not torch.equal(own, replayed)
    # only the switch that names a rule departs from the stream's: the later one replays again
    mixed = frames(CacheRules(), [PromptSwitch(1, new, {"switch_recache": "none"}), PromptSwitch(3, newer)])
    none_first = frames(CacheRules(switch_recache="none"),
                        [PromptSwitch(1, new), PromptSwitch(3, newer, {"switch_recache": "replay"})])
    assert torch.equal(mixed, none_first)
    assert not torch.equal(mixed, frames(CacheRules(switch_recache="none"), [PromptSwitch(1, new), PromptSwitch(3, newer)]))


def test_a_paused_or_abandoned_stream_leaves_gradient_mode_alone():
    """The stream runs without gradients, but only inside its own steps: between blocks (and after
    an abandoned stream) the caller's gradient mode is untouched."""
    model, prompt = tiny_model(), tiny_prompt()
    streams = [stream_blocks(model, prompt, 3, LATENT, noise=seeded(seed)) for seed in (0, 1)]
    for stream in streams:
        next(stream)
        assert torch.is_grad_enabled()
    del streams[0]  # closed out of order
    del streams
    assert torch.is_grad_enabled()


def test_block_plans_uniform_framewise_and_independent_first_frame():
    assert block_plan(9) == [3, 3, 3]
    assert block_plan(4, frames_per_block=1) == [1, 1, 1, 1]
    assert block_plan(7, first_block_frames=1) == [1, 3, 3]
    with pytest.raises(ValueError, match="use 7 or 10 latent frames"):
        block_plan(8, first_block_frames=1)


def test_independent_first_frame_stream_yields_the_plan_and_its_own_first_step_list():
    model, prompt = tiny_model(), tiny_prompt()
    timesteps = FlowMatchSchedule(5.0).warp([1000, 500])
    blocks = list(stream_blocks(model, prompt, 3, LATENT, noise=seeded(4),
                                settings=StreamSettings(first_block_frames=1, timesteps=timesteps,
                                                        first_block_timesteps=timesteps[:1])))
    assert [b.shape[1] for b in blocks] == [1, 3, 3]
    # the first block is one call on the first noise draw (a 1-frame block) at t = 1000
    first_noise = torch.randn((1, 1, *LATENT), generator=torch.Generator().manual_seed(4))
    t = torch.full((1, 1), float(timesteps[0]))
    with torch.no_grad():
        flow = model(first_noise, t, prompt, kv_cache=model.new_kv_cache(*LATENT[1:], 1))
    expected = FlowMatchSchedule(5.0).x0_from_flow(first_noise, flow, t)
    torch.testing.assert_close(blocks[0], expected, atol=0, rtol=0)


def test_relative_rope_stream_runs_past_2000_frames_with_the_same_buffers_and_bounded_state():
    """Block-relativistic RoPE: no length limit (far past the 1024-position RoPE table, a prompt
    switch included), positions stay inside the window, the cache buffers are never reallocated
    and the rollout keeps a bounded number of clean frames."""
    model, prompt = tiny_model(num_layers=1), tiny_prompt()  # one layer, one token per frame: 3335 fast calls
    rules = CacheRules(rope="relative", protect_sink=True, switch_recache="window")
    seen = []

    def record(info):
        cache = info["state"].kv_cache
        seen.append(((cache.k.data_ptr(), cache.v.data_ptr(), cache.k_rotated.data_ptr()),
                     len(info["state"].clean_frames), cache.plan.position, info["start_frame"]))

    settings = StreamSettings(kv_window_frames=9, sink_frames=3, cache_rules=rules,
                              prompt_switches=[PromptSwitch(400, tiny_prompt(seed=5))])
    stream = stream_blocks(model, prompt, None, (16, 2, 2), noise=seeded(0), settings=settings, callback=record)
    for _ in range(667):
        assert torch.isfinite(next(stream)).all()
    buffers, kept, positions, starts = zip(*seen)
    assert starts[-1] + 3 >= 2000
    assert len(set(buffers)) == 1
    assert max(kept) <= 9 + 3 + 3 and max(positions) == 6  # window 9: the block always takes slots 6..8


def test_absolute_rope_refuses_an_unreachable_length_before_any_compute():
    model, prompt = tiny_model(), tiny_prompt()
    calls, handle = record_cached_calls(model)
    assert max_latent_frames(CacheRules(), 21) == 1023
    assert max_latent_frames(CacheRules(rope="relative"), None) == 1023  # a global cache places frames by index
    assert max_latent_frames(CacheRules(rope="relative"), 12) is None
    with pytest.raises(ValueError, match="absolute RoPE.*at most 1023"):
        next(stream_blocks(model, prompt, 342, LATENT, noise=seeded(0), settings=StreamSettings(kv_window_frames=6)))
    handle.remove()
    assert calls == []
