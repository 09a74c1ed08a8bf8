"""ComfyUI entry point of the Self-Forcing node pack (V3 API: ``comfy_entrypoint``).

Only ComfyUI imports this file. The core library (``selfforcing_core``) never imports ComfyUI.
"""
WEB_DIRECTORY = "./web"  # the live player and the renames of saved workflows, loaded by the host's frontend

try:
    from .nodes import comfy_entrypoint  # noqa: F401
except ModuleNotFoundError as error:  # imported outside a ComfyUI host (e.g. by tooling)
    if not (error.name or "").startswith(("comfy", "folder_paths")):
        raise
