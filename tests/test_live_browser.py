"""The live player (web/live_player.js) in the host's real frontend, in headless Chromium.

The "Live stream" workflow is opened through the frontend's file-open path, the tiny models are
swapped in (support.tiny_workflows; live text names a saved prompt embedding since no umT5
small enough for a test loads), the length stays 0 (until Stop) and the page queues it as
its own tab does. The player must grow block by block, a prompt typed into it must take over at
a block boundary after it was typed, and Stop must keep every frame.
"""
import json
import time

import pytest

from support.files import video_frames
from support.frontend import FIT_VIEW_JS, Frontend, chromium_or_skip
from support.live_player import LIVE_WORKFLOW, PLAYER_JS, QUEUE_JS
from support.tiny_workflows import swap_in_tiny_models

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def frontend(server):
    chromium_or_skip()
    with Frontend(server) as opened:
        yield opened


def sampler_id(prompt):
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == "SelfForcingStreamingSampler")


def open_live_workflow(frontend):
    report = frontend.open_workflow(LIVE_WORKFLOW.read_text(), LIVE_WORKFLOW.name)
    assert report["unregistered"] == [] and report["errors"] == [] and report["dialogs"] == [], report
    frontend.page.evaluate(FIT_VIEW_JS)  # zoom to fit: the player's prompt box is on screen
    prompt = frontend.graph_to_prompt()
    swap_in_tiny_models(prompt)
    node = sampler_id(prompt)
    prompt[node]["inputs"].update(length=0, seed=int(time.time()) % 100000)  # until Stop; a new seed each run
    return prompt, node


def player(frontend, node):
    return frontend.page.evaluate(PLAYER_JS, node)


def wait_player(frontend, node, condition: str, timeout_ms=240_000):
    frontend.page.wait_for_function(f"(id) => {{ const p = app.graph.getNodeById(Number(id)).selfForcingLive; "
                                    f"return {condition}; }}", arg=node, timeout=timeout_ms)
    return player(frontend, node)


def test_the_player_streams_takes_a_typed_prompt_and_stop_keeps_every_frame(frontend, server):
    prompt, node = open_live_workflow(frontend)
    assert "queue the workflow" in player(frontend, node)["stats"]
    prompt_id = frontend.page.evaluate(QUEUE_JS, prompt)

    running = wait_player(frontend, node, f"p.promptId === '{prompt_id}' && p.blocks >= 3 && p.shown > 0")
    assert not running["ended"] and "blocks" in running["stats"] and "first frame" in running["stats"]

    box = frontend.page.locator(".selfforcing-live-prompt")
    box.fill("dog")
    typed = player(frontend, node)
    box.press("Enter")
    switched = wait_player(frontend, node, "p.switches.length > 0")
    assert "takes over at the next block" in switched["message"]
    switch = switched["switches"][0]
    assert switch["text"] == "dog" and switch["block"] >= typed["blocks"]  # a block that was not done yet

    frontend.page.locator(".selfforcing-live-stop").click()
    ended = wait_player(frontend, node, "p.ended && p.queue.length === 0 && p.shown === p.received")
    assert "Stopping after the current block" in ended["message"]
    frontend.page.locator(".selfforcing-live-stop").click()  # Stop twice: a clear answer, nothing breaks
    frontend.page.wait_for_function("() => document.querySelector('.selfforcing-live-message').textContent"
                                    ".includes('is not running')")

    entry = server.wait(prompt_id, timeout=300)
    live = entry["outputs"][node]["selfforcing_live"][0]
    assert f"live switch at frame {switch['frame']} (block {switch['block']}): dog" in live["info"]
    log = json.loads((server.output_dir / live["prompt_log"]).read_text())
    logged = next(event for event in log["events"] if event["kind"] == "switch")
    assert (logged["block"], logged["frame"]) == (switch["block"], switch["frame"])
    assert logged["requested_at"] >= typed["now"] - 1e-3 and logged["applied_at"] >= logged["requested_at"]
    save = next(node_id for node_id, n in prompt.items() if n["class_type"] == "SaveVideo")
    saved = entry["outputs"][save]["images"][0]
    saved_frames = video_frames(server.output_dir / saved["subfolder"] / saved["filename"])
    recorded = video_frames(server.output_dir / "self_forcing" / log["record"])
    assert len(saved_frames) == len(recorded) == ended["received"] == ended["shown"] == log["frames"]
    assert ended["received"] == 9 + 12 * (ended["blocks"] - 1)
    # The frame count grew block by block while the prompt ran: 9 frames, then 12 per block.
    arrivals = ended["arrivals"]
    assert [a["block"] for a in arrivals] == list(range(ended["blocks"]))
    assert [a["received"] for a in arrivals] == [9 + 12 * a["block"] for a in arrivals]
    assert all(a["at"] < b["at"] for a, b in zip(arrivals, arrivals[1:]))

    # The server takes the next prompt, and the player shows only the new run.
    prompt[node]["inputs"].update(length=13, seed=prompt[node]["inputs"]["seed"] + 1)
    next_id = frontend.page.evaluate(QUEUE_JS, prompt)
    again = wait_player(frontend, node, f"p.promptId === '{next_id}' && p.ended && p.shown === p.received")
    assert again["received"] == 13 and again["switches"] == [] and again["blocks"] == 2
    server.wait(next_id, timeout=300)


def test_the_player_refuses_text_and_stop_when_nothing_runs_in_its_node(frontend):
    _, node = open_live_workflow(frontend)
    box = frontend.page.locator(".selfforcing-live-prompt")
    box.fill("dog")
    box.press("Enter")
    assert "queue the workflow first" in player(frontend, node)["message"]
