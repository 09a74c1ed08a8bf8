"""What a remote API user can do to a real ComfyUI server through POST /prompt: every widget's
limits hold, names stay inside ComfyUI's folders, memory is checked before allocating."""
import pytest
import torch

from support.comfy_host import PACK_NAME, PromptValidationError

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def server(comfy_server):
    """The session server with a file in each model folder, so every file choice has a valid value."""
    for folder in ("diffusion_models", "loras", "vae_approx", "vae", "prompt_embeddings"):
        comfy_server.write_safetensors(folder, "placeholder.safetensors", {"x": torch.zeros(1)})
    return comfy_server


def pack_nodes(server):
    """{node class: object_info entry} of every node of this pack, read from GET /object_info."""
    return {name: node for name, node in server.object_info().items() if PACK_NAME in node["python_module"]}


def widget_defaults(node):
    """Every widget input of a node at its default (combos: the default or first option)."""
    values = {}
    for name, spec in node["input"].get("required", {}).items():
        options = spec[1] if len(spec) > 1 else {}
        if spec[0] in ("INT", "FLOAT", "BOOLEAN", "STRING"):
            values[name] = options.get("default", 0 if spec[0] != "STRING" else "")
        elif spec[0] == "COMBO":
            values[name] = options.get("default", (options.get("options") or ["none.safetensors"])[0])
    return values


def out_of_range_values(node):
    """(input, bad value) for every widget: below its min, above its max, not one of its choices."""
    for category in ("required", "optional"):
        for name, spec in node["input"].get(category, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            if spec[0] in ("INT", "FLOAT"):
                if "min" in options:
                    yield name, options["min"] - 1
                if "max" in options:
                    yield name, options["max"] + 1
            elif spec[0] == "COMBO":
                yield name, "no such choice"


def single_node_graph(node_class, node, inputs):
    graph = {"1": {"class_type": node_class, "inputs": inputs}}
    if not node["output_node"]:
        graph["2"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}
    return graph


def test_every_widget_of_every_node_refuses_out_of_range_values_naming_that_input(server):
    """Out-of-range values for every INT / FLOAT / COMBO widget of every node of the pack (read from
    the server, so new inputs are covered too): POST /prompt is refused with errors that name that
    input, and no error blames another input."""
    failures, checked = [], 0
    for node_class, node in pack_nodes(server).items():
        for name, value in out_of_range_values(node):
            checked += 1
            inputs = {**widget_defaults(node), name: value}
            try:
                server.queue_prompt(single_node_graph(node_class, node, inputs))
            except PromptValidationError as refused:
                errors = [e for e in refused.response["node_errors"].get("1", {}).get("errors", [])
                          if e["type"] != "required_input_missing"]
                if not errors or not all(name in e["details"] for e in errors):
                    failures.append(f"{node_class}.{name}={value!r}: {[e['details'] for e in errors]}")
                continue
            failures.append(f"{node_class}.{name}={value!r}: accepted")
    assert checked > 40
    assert not failures, "\n".join(failures)
