"""Saved workflows keep widget values by position: our nodes' inputs must keep their order.

`node_input_order.json` pins, per node of this pack, its inputs as /object_info lists them
(required, then optional; "name TYPE", "+control" where the node asks for a control widget after
the value). Reordering, renaming, retyping or removing an input shifts the values of every saved
workflow, so it fails here; adding a node, or an input at the end, means extending the file on
purpose. The shared workflows must match the pinned widget counts too.
"""
import json
from pathlib import Path

import pytest

from support.comfy_host import PACK_NAME

TESTS = Path(__file__).resolve().parent
PINNED = json.loads((TESTS / "node_input_order.json").read_text())
WORKFLOW_FILES = sorted((TESTS.parent / "workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def input_listing(node_info: dict) -> list[str]:
    """["name TYPE", ...] in the order the frontend creates the node's inputs and widgets."""
    listing = []
    for section in ("required", "optional"):
        for name in node_info["input_order"].get(section, []):
            kind, options = (node_info["input"][section][name] + [{}])[:2]
            kind = "COMBO" if isinstance(kind, list) else kind
            listing.append(f"{name} {kind}" + (" +control" if options.get("control_after_generate") else ""))
    return listing


def widget_count(listing: list[str]) -> int:
    """Values a saved workflow holds for a node: one per widget input, two where a control follows
    (asked for, or added by the frontend to every INT named seed / noise_seed)."""
    entries = [entry.split() for entry in listing]
    return sum(kind in WIDGET_TYPES for _, kind, *_ in entries) + sum(
        "+control" in rest or (kind == "INT" and name in ("seed", "noise_seed")) for name, kind, *rest in entries)


@pytest.fixture(scope="module")
def our_nodes(comfy_server):
    return {name: info for name, info in comfy_server.object_info().items()
            if info.get("python_module", "").endswith(PACK_NAME)}


@pytest.mark.host
def test_every_node_of_the_pack_keeps_its_pinned_input_order(our_nodes):
    actual = {name: input_listing(info) for name, info in our_nodes.items()}
    assert set(actual) >= set(PINNED), f"pinned nodes the host no longer lists: {sorted(set(PINNED) - set(actual))}"
    unpinned = sorted(set(actual) - set(PINNED))
    assert not unpinned, ("new nodes: add them to tests/node_input_order.json:\n"
                          + json.dumps({name: actual[name] for name in unpinned}, indent=2))
    for name, pinned in PINNED.items():
        assert actual[name][:len(pinned)] == pinned, (
            f"{name}: inputs changed order/name/type; saved workflows would load wrong values.\n"
            f"pinned {pinned}\nnow    {actual[name]}")


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda path: path.stem)
def test_shared_workflow_widget_values_match_the_pinned_inputs(path):
    for node in json.loads(path.read_text())["nodes"]:
        if node["type"] in PINNED:
            assert len(node["widgets_values"]) == widget_count(PINNED[node["type"]]), (
                f"{path.name}: node {node['id']} ({node['type']}) has {node['widgets_values']}; "
                "regenerate with `python -m workflows.generate`")
