"""Live runs in a real ComfyUI server over its HTTP API and websocket (nodes/live.py): the pack's
routes, the `selfforcing.live` frame events, stop-and-keep, recording and the prompt log."""
import asyncio
import json
import time
import urllib.error
import uuid

import pytest

from support.comfy_host import PromptValidationError, sampler_graph, saved_video
from support.files import video_frames

pytestmark = pytest.mark.host
SAMPLER = "4"


def post(server, route, payload):
    """(HTTP status, JSON answer) of a POST, refusals included."""
    try:
        return 200, server.post(route, payload)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def live_graph(length=0, record=True):
    graph = sampler_graph(length=length, window=6, sink=3, seed=uuid.uuid4().int % 2**32)
    graph[SAMPLER]["inputs"]["record"] = record
    graph["6"]["inputs"]["filename_prefix"] = "self_forcing/live"
    return graph


def run_live(server, graph, on_block):
    """Queue ``graph`` as a browser tab would and call on_block(event, prompt_id) (in a thread) for
    every `selfforcing.live` block event; returns (the events of the run, the final event type)."""
    import aiohttp

    client_id = uuid.uuid4().hex

    async def watch():
        events = []
        url = f"http://127.0.0.1:{server.port}/ws?clientId={client_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as socket:
            prompt_id = await asyncio.to_thread(server.queue_prompt, graph, client_id)
            async for message in socket:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(message.data)
                if event["type"] == "selfforcing.live":
                    events.append(event["data"])
                    if event["data"]["kind"] == "block":
                        await asyncio.to_thread(on_block, event["data"], prompt_id)
                if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    return events, event["type"], prompt_id
    return asyncio.run(asyncio.wait_for(watch(), 300))


def test_live_switch_stop_and_keep_recording_and_prompt_log(server):
    answers = {}

    def steer(event, prompt_id):
        target = {"prompt_id": prompt_id, "node_id": SAMPLER}
        if event["block"] == 0:
            answers["empty"] = post(server, "/selfforcing/live/prompt", {**target, "text": "  "})
            answers["unknown"] = post(server, "/selfforcing/live/prompt", {**target, "text": "no such embedding"})
            answers["switch"] = post(server, "/selfforcing/live/prompt", {**target, "text": "dog"})
        if event.get("switched") and "stop" not in answers:
            answers["stop"] = post(server, "/selfforcing/live/stop", target)
            answers["stop twice"] = post(server, "/selfforcing/live/stop", target)
            answers["after stop"] = post(server, "/selfforcing/live/prompt", {**target, "text": "cat"})

    events, outcome, prompt_id = run_live(server, live_graph(), steer)
    assert outcome == "execution_success"
    assert answers["empty"][0] == 400 and "empty" in answers["empty"][1]["error"]
    assert answers["unknown"][0] == 400 and "no CLIP is connected" in answers["unknown"][1]["error"]
    assert answers["switch"] == (200, {**answers["switch"][1], "accepted": "dog"})
    assert answers["stop"][0] == 200
    assert answers["stop twice"][0] == 409 and "already pressed" in answers["stop twice"][1]["error"]
    assert answers["after stop"][0] == 409 and "stopping" in answers["after stop"][1]["error"]

    blocks = [event for event in events if event["kind"] == "block"]
    assert [event["kind"] for event in events] == ["start", *["block"] * len(blocks), "end"]
    assert events[-1]["reason"] == "stopped" and [b["block"] for b in blocks] == list(range(len(blocks)))
    switch_block = next(b["block"] for b in blocks if b["switched"])
    # Sent right after block 0 arrived: taken at block 1 or later (block 1 may already have been computing).
    assert switch_block >= 1 and blocks[switch_block]["switched"] == "dog"
    shown_frames = sum(len(b["frames"]) for b in blocks)
    assert shown_frames == 9 + 12 * (len(blocks) - 1) and blocks[1]["first_frame"] == 9

    entry = server.wait(prompt_id)
    live = entry["outputs"][SAMPLER]["selfforcing_live"][0]
    switch_frame = 9 + 12 * (switch_block - 1)
    assert f"live switch at frame {switch_frame} (block {switch_block}): dog" in live["info"]
    assert f"stopped after block {len(blocks)}" in live["info"]
    log = json.loads((server.output_dir / live["prompt_log"]).read_text())
    switch, stop = log["events"]
    assert (switch["kind"], switch["text"], switch["block"], switch["frame"]) == ("switch", "dog", switch_block, switch_frame)
    assert switch["requested_at"] <= switch["applied_at"] and stop["kind"] == "stop"
    assert log["frames"] == shown_frames and log["ending"] == "stopped"
    # the same log beside the file Save Video wrote, once the prompt has run
    assert saved_log(saved_video(server, entry)) == {**log, "video": saved_video(server, entry).name}
    saved = video_frames(saved_video(server, entry))
    recorded = video_frames(server.output_dir / "self_forcing" / log["record"])
    assert len(saved) == len(recorded) == shown_frames
    assert max(abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(saved, recorded)) < 8  # both h264 of the same frames

    # The server takes the next prompt, and the finished run no longer takes live text.
    assert post(server, "/selfforcing/live/prompt", {"prompt_id": prompt_id, "node_id": SAMPLER, "text": "dog"})[0] == 409
    assert len(video_frames(saved_video(server, server.run(live_graph(length=13, record=False), timeout=300)))) == 13


def saved_log(video, timeout=10):
    """The prompt log beside a saved video (``name_00001_.prompt_log.json``), written once the prompt has run."""
    path = video.with_suffix(".prompt_log.json")
    deadline = time.monotonic() + timeout
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    return json.loads(path.read_text())


def test_cancel_keeps_the_recording_of_the_finished_blocks_and_their_prompt_log(server):
    """The host's Cancel discards the outputs (nothing is saved), but the recording and the prompt
    log keep every finished block."""
    def steer(event, prompt_id):
        if event["block"] == 0:
            post(server, "/selfforcing/live/prompt", {"prompt_id": prompt_id, "node_id": SAMPLER, "text": "dog"})
        if event.get("switched"):
            server.interrupt()

    before = set((server.output_dir / "self_forcing").glob("*"))
    events, outcome, prompt_id = run_live(server, live_graph(), steer)
    assert outcome == "execution_interrupted" and events[-1]["reason"] == "cancelled"
    blocks = events[-1]["blocks"]
    new = set((server.output_dir / "self_forcing").glob("*")) - before
    log_path = next(path for path in new if path.name.endswith("_prompt_log.json"))
    log = json.loads(log_path.read_text())
    assert log["ending"] == "cancelled" and log["frames"] == 9 + 12 * (blocks - 1)
    assert [(e["kind"], e["text"]) for e in log["events"]] == [("switch", "dog")]
    assert len(video_frames(server.output_dir / "self_forcing" / log["record"])) == log["frames"]
    assert not [path for path in new if path.name.startswith("live_") and path.suffix == ".mp4"
                and not path.name.endswith("_record.mp4")]  # Save Video did not run


def test_live_requests_to_nothing_running_are_refused_clearly(server):
    status, answer = post(server, "/selfforcing/live/prompt", {"prompt_id": "nope", "node_id": "4", "text": "dog"})
    assert status == 409 and "is not running a Self-Forcing sampler" in answer["error"]
    status, answer = post(server, "/selfforcing/live/stop", {"prompt_id": "nope", "node_id": "4"})
    assert status == 409 and "is not running" in answer["error"]
    status, answer = post(server, "/selfforcing/live/stop", {"text": "dog"})
    assert status == 400 and "prompt_id" in answer["error"]


def test_length_zero_without_a_window_is_refused_before_running(server):
    graph = live_graph()
    graph[SAMPLER]["inputs"]["kv_window_frames"] = 0
    with pytest.raises(PromptValidationError, match="needs a rolling KV window"):
        server.queue_prompt(graph)
