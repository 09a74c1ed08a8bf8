"""Live steering (selfforcing_core/live.py): a switch or a stop requested while the stream runs."""
import threading

import pytest
import torch

from selfforcing_core.live import LiveRequestError, LiveSteering
from selfforcing_core.model import ROPE_MAX_FRAMES
from selfforcing_core.generate import generate_video
from selfforcing_core.kv_cache import CacheRules
from selfforcing_core.rollout import PromptSwitch, StreamSettings
from support.tiny import tiny_model, tiny_prompt

HW = (4, 4)
PROMPTS = {"cat": tiny_prompt(1), "dog": tiny_prompt(2), "owl": tiny_prompt(3)}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def steer_during(requests: dict, steering: LiveSteering):
    """Per-block callback that sends requests[block](steering) right after ``block`` is generated
    (while the next one would be computing in a live run)."""
    def on_block(info):
        if info["block"] in requests:
            requests[info["block"]](steering)
    return on_block


@pytest.mark.parametrize("window,switch_block", [(None, 1), (None, 3), (6, 2), (6, 4)])
def test_live_switch_at_block_k_equals_a_prompt_schedule_switching_at_block_k(model, window, switch_block):
    steering = LiveSteering(PROMPTS.__getitem__)
    live = generate_video(model, PROMPTS["cat"], 15, HW, seed=3, live=steering,
                          callback=steer_during({switch_block - 1: lambda s: s.request_prompt("dog")}, steering),
                          settings=StreamSettings(kv_window_frames=window))
    scheduled = generate_video(model, PROMPTS["cat"], 15, HW, seed=3,
                               settings=StreamSettings(kv_window_frames=window,
                                                       prompt_switches=[PromptSwitch(switch_block, PROMPTS["dog"])]))
    assert torch.equal(live.latents, scheduled.latents)
    assert [(event.kind, event.text, event.block) for event in steering.log] == [("switch", "dog", switch_block)]
    assert steering.log[0].requested_at <= steering.log[0].applied_at


def test_two_live_switches_equal_a_two_entry_schedule(model):
    steering = LiveSteering(PROMPTS.__getitem__)
    live = generate_video(model, PROMPTS["cat"], 15, HW, seed=4, live=steering,
                          callback=steer_during({0: lambda s: s.request_prompt("dog"),
                                                 2: lambda s: s.request_prompt("owl")}, steering),
                          settings=StreamSettings(kv_window_frames=6, sink_frames=3))
    scheduled = generate_video(model, PROMPTS["cat"], 15, HW, seed=4,
                               settings=StreamSettings(kv_window_frames=6, sink_frames=3, prompt_switches=[
                                   PromptSwitch(1, PROMPTS["dog"]), PromptSwitch(3, PROMPTS["owl"])]))
    assert torch.equal(live.latents, scheduled.latents)


def test_a_newer_prompt_replaces_one_not_yet_taken(model):
    steering = LiveSteering(PROMPTS.__getitem__)
    both = {1: lambda s: (s.request_prompt("dog"), s.request_prompt("owl"))}
    live = generate_video(model, PROMPTS["cat"], 12, HW, seed=1, live=steering, callback=steer_during(both, steering))
    scheduled = generate_video(model, PROMPTS["cat"], 12, HW, seed=1,
                               settings=StreamSettings(prompt_switches=[PromptSwitch(2, PROMPTS["owl"])]))
    assert torch.equal(live.latents, scheduled.latents)
    assert [event.text for event in steering.log] == ["owl"]


def test_stop_keeps_every_block_generated_so_far(model):
    steering = LiveSteering(PROMPTS.__getitem__)
    stopped = generate_video(model, PROMPTS["cat"], 21, HW, seed=2, live=steering,
                             callback=steer_during({1: LiveSteering.request_stop}, steering))
    whole = generate_video(model, PROMPTS["cat"], 21, HW, seed=2)
    assert stopped.latents.shape[1] == 6 and torch.equal(stopped.latents, whole.latents[:, :6])
    assert [(event.kind, event.block) for event in steering.log] == [("stop", 2)]
    assert "stopped after block 2" in stopped.report and "2 blocks" in stopped.report


def test_length_zero_runs_until_stopped_with_a_rolling_window(model):
    steering = LiveSteering(PROMPTS.__getitem__)
    video = generate_video(model, PROMPTS["cat"], 0, HW, seed=2, live=steering,
                           callback=steer_during({4: LiveSteering.request_stop}, steering),
                           settings=StreamSettings(kv_window_frames=6))
    assert video.latents.shape[1] == 15
    with pytest.raises(ValueError, match="needs a rolling KV window"):
        generate_video(model, PROMPTS["cat"], 0, HW, seed=2)


def test_an_endless_stream_ends_cleanly_at_the_end_of_the_rope_table(model, monkeypatch):
    import selfforcing_core.rollout as rollout

    monkeypatch.setattr(rollout, "ROPE_MAX_FRAMES", 10)  # a short table instead of 1024 frames
    video = generate_video(model, PROMPTS["cat"], 0, HW, seed=2, settings=StreamSettings(kv_window_frames=6))
    assert video.latents.shape[1] == 9 and "end of the model's RoPE table (9 latent frames)" in video.report
    assert ROPE_MAX_FRAMES == 1024


def test_with_relative_rope_a_stream_until_stop_runs_past_the_rope_table(model, monkeypatch):
    import selfforcing_core.model as model_module
    import selfforcing_core.rollout as rollout

    for module in (rollout, model_module):
        monkeypatch.setattr(module, "ROPE_MAX_FRAMES", 10)  # absolute positions would end at latent frame 9
    steering = LiveSteering(PROMPTS.__getitem__)
    video = generate_video(model, PROMPTS["cat"], 0, HW, seed=2, live=steering,
                           callback=steer_during({5: LiveSteering.request_stop}, steering),
                           settings=StreamSettings(kv_window_frames=6, sink_frames=3,
                                                   cache_rules=CacheRules(rope="relative")))
    assert video.latents.shape[1] == 18 and "stopped after block 6" in video.report


def test_bad_requests_get_clear_answers_and_leave_the_stream_alone():
    steering = LiveSteering(PROMPTS.__getitem__)
    with pytest.raises(LiveRequestError, match="empty"):
        steering.request_prompt("   ")
    steering.request_prompt("dog")
    steering.request_stop()
    with pytest.raises(LiveRequestError, match="already pressed"):
        steering.request_stop()
    with pytest.raises(LiveRequestError, match="stopping"):
        steering.request_prompt("owl")
    assert torch.equal(steering.take_prompt(5), PROMPTS["dog"])  # the accepted one still applies
    assert steering.take_stop(6) and not steering.take_stop(7)


def test_requests_from_other_threads_are_taken_whole():
    steering = LiveSteering(lambda text: text)
    threads = [threading.Thread(target=steering.request_prompt, args=(f"p{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    taken = steering.take_prompt(0)
    assert taken in {f"p{i}" for i in range(8)} and steering.take_prompt(1) is None
