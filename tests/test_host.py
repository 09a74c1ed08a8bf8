"""The real ComfyUI host: it starts, imports this pack cleanly and lists our nodes properly."""
import re

import pytest

from support.comfy_host import PACK_NAME
from support.comfy_paths import REPO_ROOT

pytestmark = pytest.mark.host


def declared_node_ids():
    """node_id strings declared in nodes/*.py."""
    return {node_id for path in (REPO_ROOT / "nodes").glob("*.py")
            for node_id in re.findall(r'node_id="([^"]+)"', path.read_text())}


def pack_nodes(object_info):
    return {name: info for name, info in object_info.items()
            if info["python_module"] == f"custom_nodes.{PACK_NAME}"}


def test_server_imports_the_pack_and_every_host_module(comfy_server):
    log = comfy_server.log()
    assert re.search(rf"\d+\.\d seconds: \S+/custom_nodes/{PACK_NAME}$", log, re.MULTILINE), log[-3000:]
    assert comfy_server.import_failures() == []


def test_every_declared_node_is_registered_through_comfy_entrypoint(comfy_server):
    registered = pack_nodes(comfy_server.object_info())
    assert declared_node_ids() and set(registered) == declared_node_ids()


def test_pack_nodes_have_category_description_and_tooltips(comfy_server):
    for name, info in pack_nodes(comfy_server.object_info()).items():
        assert info["category"] == "Self-Forcing", name
        assert info["display_name"] and info["description"], name
        for section in ("required", "optional"):
            for input_name, (_, options) in info["input"].get(section, {}).items():
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert all(info["output_tooltips"]), f"{name} has an output without a tooltip"


def test_host_meets_the_pack_minimum_version(comfy_api_import):
    import comfyui_version
    minimum = re.search(r'requires-comfyui = ">=([\d.]+)"', (REPO_ROOT / "pyproject.toml").read_text())[1]
    version = tuple(int(part) for part in comfyui_version.__version__.split(".")[:3])
    assert version >= tuple(int(part) for part in minimum.split(".")), comfyui_version.__version__
