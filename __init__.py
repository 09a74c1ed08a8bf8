"""ComfyUI entry point of the Self-Forcing node pack (V3 API: ``comfy_entrypoint``).

Only ComfyUI imports this file. The core library (``selfforcing_core``) never imports ComfyUI.
"""
try:
    from .nodes import comfy_entrypoint  # noqa: F401
except ImportError as error:  # imported outside a ComfyUI host (e.g. by tooling)
    if "comfy" not in str(error):
        raise
