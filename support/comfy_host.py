"""Test glue for the real ComfyUI host: skip without one, one server per test session.

The server itself is ``support/comfy_server.py`` (shared with the main-job script).
"""
import asyncio
import json
import struct
import uuid

import torch

from selfforcing_core.model import CausalWanModel
from selfforcing_core.prompt_embeddings import save_prompt_embeddings
from support.comfy_paths import REPO_ROOT, comfyui_root
from support.comfy_server import ComfyServer, PACK_NAME, PromptExecutionError, PromptValidationError  # noqa: F401
from support.decoder_weights import taehv_state_dict
from support.tiny import HOST_TINY

SETUP_ERROR_FILE = REPO_ROOT / ".host" / "setup-error.txt"


def find_host_or_skip():
    """The host root (comfy_paths.comfyui_root); skips the test, saying why, when there is none."""
    import pytest

    root = comfyui_root()
    if root is None:
        reason = SETUP_ERROR_FILE.read_text().strip() if SETUP_ERROR_FILE.is_file() else "not set up"
        pytest.skip(f"NO COMFYUI HOST ({reason}): run `.venv/bin/python scripts/setup_host.py` "
                    "or set COMFYUI_PATH to a ComfyUI >= 0.3.75 folder")
    return root


def session_server():
    """Generator behind the session-wide `comfy_server` fixture: skip without a host, fail loudly
    when the server or the pack does not come up."""
    server = ComfyServer(find_host_or_skip()).start()
    print(f"\nComfyUI server up in {server.start_seconds:.1f} s on port {server.port}")
    try:
        yield server
    finally:
        server.stop()


def write_tiny_generator(server, name="sf_tiny.safetensors", config=HOST_TINY, prefix="model.diffusion_model."):
    """A random generator of ``config`` (seed 0) in the server's diffusion_models, keys under ``prefix``."""
    torch.manual_seed(0)
    state_dict = CausalWanModel(config).state_dict()
    server.write_safetensors("diffusion_models", name, {prefix + key: value for key, value in state_dict.items()})


def write_tiny_prompts(server, names=("cat", "dog"), text_dim=HOST_TINY.text_dim):
    """Random prompt embeddings [1, 12, text_dim] (seeds 1, 2, ...) saved as ``<name>.safetensors``."""
    for seed, name in enumerate(names, start=1):
        context = torch.randn(1, 12, text_dim, generator=torch.Generator().manual_seed(seed))
        save_prompt_embeddings(server.model_dir("prompt_embeddings") / f"{name}.safetensors",
                               [(context, {"pooled_output": None})])


def write_tiny_lora(server, name="longlive_lora.pt", config=HOST_TINY):
    """A random rank-4 LoRA (seed 0) of the tiny generator in LongLive's ``lora.pt`` layout (PEFT names
    under ``generator_lora``) in the server's loras."""
    generator = torch.Generator().manual_seed(0)
    lora = {f"base_model.model.blocks.{block}.{module}.lora_{part}.weight": torch.randn(shape, generator=generator) * 0.1
            for block in range(config.num_layers) for module in ("self_attn.q", "ffn.2")
            for part, shape in (("A", (4, config.dim)), ("B", (config.dim, 4)))}
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 0}, server.model_dir("loras") / name)


def write_tiny_models(server, config=HOST_TINY):
    """The tiny generator ``sf_tiny.safetensors``, TAEHV under its real name and the prompts cat / dog."""
    write_tiny_generator(server, config=config)
    server.write_safetensors("vae_approx", "taew2_1.safetensors", taehv_state_dict())
    write_tiny_prompts(server, text_dim=config.text_dim)


def run_watching(server, graph, node, on_progress=None):
    """POST /prompt as a browser tab would and follow the websocket until the run ends.

    on_progress(value) is called for each progress event of ``node``. Returns (the final event type:
    execution_success / _error / _interrupted, [(value, max)] of ``node``, preview images received,
    prompt id).
    """
    import aiohttp
    client_id = uuid.uuid4().hex

    async def watch():
        progress, previews = [], 0
        url = f"http://127.0.0.1:{server.port}/ws?clientId={client_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as socket:
            prompt_id = await asyncio.to_thread(server.queue_prompt, graph, client_id)
            async for message in socket:
                if message.type == aiohttp.WSMsgType.BINARY:  # BinaryEventTypes.PREVIEW_IMAGE = 1 (JPEG bytes)
                    previews += struct.unpack(">I", message.data[:4])[0] == 1
                    continue
                event = json.loads(message.data)
                if event["type"] == "progress" and event["data"]["node"] == node:
                    progress.append((event["data"]["value"], event["data"]["max"]))
                    if on_progress is not None:
                        await asyncio.to_thread(on_progress, progress[-1][0])
                if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    return event["type"], progress, previews, prompt_id
    return asyncio.run(asyncio.wait_for(watch(), 300))


def sampler_graph(width=64, height=48, length=25, decoder="vae_approx/taew2_1.safetensors", model="sf_tiny.safetensors",
                  seed=3, window=0, sink=0, extra=None):
    """API-format prompt: prompt embeddings -> model -> sampler (+ decoder) -> CreateVideo -> SaveVideo."""
    graph = {
        "1": {"class_type": "SelfForcingModelLoader",
              "inputs": {"model_name": model, "weight_dtype": "fp32", "device": "default"}},
        "2": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": "cat.safetensors"}},
        "4": {"class_type": "SelfForcingStreamingSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "width": width, "height": height,
                         "length": length, "seed": seed, "steps": "4 steps, shift 5 (paper)",
                         "kv_window_frames": window, "sink_frames": sink}},
        "5": {"class_type": "CreateVideo", "inputs": {"images": ["4", 1], "fps": 16.0}},
        "6": {"class_type": "SaveVideo", "inputs": {"video": ["5", 0], "filename_prefix": "sf/e2e",
                                                   "format": "mp4", "codec": "h264"}},
    }
    if decoder:
        graph["3"] = {"class_type": "SelfForcingDecoderLoader", "inputs": {"decoder_name": decoder, "dtype": "fp32"}}
        graph["4"]["inputs"]["decoder"] = ["3", 0]
    graph.update(extra or {})
    return graph


def saved_video(server, entry):
    """Path of the video the graph's SaveVideo node ("6") wrote."""
    result = entry["outputs"]["6"]["images"][0]
    return server.output_dir / result["subfolder"] / result["filename"]
