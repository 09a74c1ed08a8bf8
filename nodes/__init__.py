"""ComfyUI side of the pack (V3 node API): thin nodes over `selfforcing_core`.

Each module here lists its node classes in `NODES`; `NODE_MODULES` collects the modules.
"""
from comfy_api.latest import ComfyExtension, io

from . import keyframes, loaders, prompt_embeddings, sampler, trainer

NODE_MODULES = [loaders, sampler, keyframes, prompt_embeddings, trainer]


class SelfForcingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for module in NODE_MODULES for node in module.NODES]


async def comfy_entrypoint() -> SelfForcingExtension:
    """Called by ComfyUI when it loads the pack."""
    return SelfForcingExtension()
