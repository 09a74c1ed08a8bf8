"""The shared workflows (workflows/*.json) in the host's own frontend, in headless Chromium.

Each file is opened through the frontend's file-open path and must show no missing node, no node
in error and no dialog or alert; the frontend turns it into a prompt (app.graphToPrompt), the
tiny test models are swapped in, the prompt runs through POST /prompt and its videos are checked.

The tiny models are swapped in by ``support.tiny_workflows``.
A train-then-sample workflow runs twice: as saved (training; sampling nodes muted), then with
the training nodes muted and the rest unmuted, as its note tells the user.

Screenshots of the opened workflows go to $SF_SCREENSHOT_DIR (default: a temporary folder);
`workflows/generate.py` makes the thumbnails the same way.
"""
import json
import os
from pathlib import Path

import pytest

from support.files import video_frames, write_gif
from support.frontend import Frontend, chromium_or_skip, write_example_images
from support.tiny_workflows import TINY_HEIGHT, TINY_TRAINING, TINY_WIDTH, swap_in_tiny_models

pytestmark = pytest.mark.host

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.json"))
TRAINING_NODES = set(TINY_TRAINING)
MUTED = 2
# Second stage of a two-stage workflow (train, then sample): what the note tells the user to do.
NEXT_STAGE_JS = f"""() => app.graph._nodes.forEach((node) => {{
  node.mode = {sorted(TRAINING_NODES)}.includes(node.type) ? {MUTED} : node.mode === {MUTED} ? 0 : node.mode;
}})"""


@pytest.fixture(scope="module")
def frontend(server):
    chromium_or_skip()
    with Frontend(server) as opened:
        yield opened


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory):
    folder = Path(os.environ.get("SF_SCREENSHOT_DIR") or tmp_path_factory.mktemp("workflow-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nworkflow screenshots in {folder}")
    return folder


def test_there_are_workflows_to_check():
    assert len(WORKFLOW_FILES) >= 5, f"expected the shared workflows in {WORKFLOWS}"


def test_a_workflow_with_a_node_the_host_lacks_is_reported(frontend):
    workflow = json.loads((WORKFLOWS / "text_to_video_streaming.json").read_text())
    sampler = next(node for node in workflow["nodes"] if node["type"] == "SelfForcingStreamingSampler")
    sampler["type"] = "SelfForcingRenamedSampler"
    report = frontend.open_workflow(json.dumps(workflow), "renamed.json")
    assert report["unregistered"] == ["SelfForcingRenamedSampler"]
    assert any("SelfForcingRenamedSampler" in dialog for dialog in report["dialogs"])


def test_a_workflow_saved_with_the_former_training_input_names_opens_with_todays(frontend):
    """Saved before the trainer's `clips` input (type SELFFORCING_TRAINING_CLIPS) became
    `training_videos` (web/renamed_inputs.js): it opens linked and queues the prompt of today's file."""
    text = (WORKFLOWS / "finetune_then_sample.json").read_text()
    former = text.replace('"training_videos"', '"clips"').replace("SELFFORCING_TRAINING_VIDEOS", "SELFFORCING_TRAINING_CLIPS")
    assert former.count('"clips"') >= 2
    prompts = []
    for name, saved in (("today.json", text), ("former.json", former)):
        report = frontend.open_workflow(saved, name)
        assert report["errors"] == [] and report["dialogs"] == [] and report["alerts"] == [], report
        prompts.append(frontend.graph_to_prompt())
    assert prompts[1] == prompts[0]
    trainer = next(node for node in prompts[1].values() if node["class_type"] == "SelfForcingTrainer")
    assert isinstance(trainer["inputs"]["training_videos"], list) and "clips" not in trainer["inputs"]


def run_and_check_videos(server, prompt):
    """Swap in the tiny models, run, and check every saved video's frame count and size."""
    expected_frames = swap_in_tiny_models(prompt)
    entry = server.run(prompt, timeout=300)
    for node_id, frames in expected_frames.items():
        saved = entry["outputs"][node_id]["images"][0]
        video = video_frames(server.output_dir / saved["subfolder"] / saved["filename"])
        assert len(video) == frames and video[0].shape == (TINY_HEIGHT, TINY_WIDTH, 3)
    return expected_frames


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda path: path.stem)
def test_workflow_opens_in_the_frontend_and_runs(path, frontend, server, screenshot_dir):
    write_example_images(server.base_dir / "input", path.read_text())
    clips = server.base_dir / "input" / "self_forcing_clips"
    clips.mkdir(parents=True, exist_ok=True)
    for index in range(2):
        write_gif(clips / f"clip{index}.gif")
    report = frontend.open_workflow(path.read_text(), path.name)
    assert report["node_types"], f"{path.name} opened no nodes"
    assert report["unregistered"] == [], f"node types the host does not know: {report['unregistered']}"
    assert report["errors"] == [], f"nodes in error: {report['errors']}"
    assert report["dialogs"] == [] and report["alerts"] == [], f"the frontend complained: {report}"
    frontend.screenshot(screenshot_dir / f"{path.stem}.jpg")

    prompt = frontend.graph_to_prompt()
    if TRAINING_NODES & {node["class_type"] for node in prompt.values()}:
        lora_name = next(n["inputs"]["lora_name"] for n in prompt.values() if n["class_type"] == "SelfForcingTrainer")
        run_and_check_videos(server, prompt)
        assert (server.model_dir("loras") / f"{lora_name}_00001_.safetensors").is_file()
        frontend.page.evaluate(NEXT_STAGE_JS)
        prompt = frontend.graph_to_prompt()
    assert run_and_check_videos(server, prompt), f"{path.name} saves no video"


def canonical(prompt: dict) -> dict:
    """class_type -> inputs, links written as (source class_type, output slot): ids do not matter."""
    kinds = {node_id: node["class_type"] for node_id, node in prompt.items()}
    return {node["class_type"]: {name: (kinds[value[0]], value[1]) if isinstance(value, list) else value
                                 for name, value in node["inputs"].items()}
            for node in prompt.values()}


def test_main_job_script_runs_exactly_the_shared_text_to_video_workflow(frontend):
    """scripts/generate.py builds its graph in code; it must stay the workflow users download."""
    from scripts import generate

    path = next(p for p in WORKFLOW_FILES if p.stem == "text_to_video_streaming")
    frontend.open_workflow(path.read_text(), path.name)
    assert canonical(frontend.graph_to_prompt()) == canonical(generate.workflow())
