"""The shared workflows' prompts with the tiny test models swapped in (the real models are gigabytes).

The generator file name is pointed at the tiny generator (``sf_tiny.safetensors``, see
``support.comfy_host.write_tiny_models``); the decoder and VAE files exist under their real names
(tiny weights in the real layouts); each umT5 branch (CLIPLoader + CLIP Text Encode) becomes Load
Prompt Embeddings of a tiny embedding file, because no umT5 small enough for a test loads in the
host (its config is fixed at the XXL size), and optional CLIP inputs (caption encoding) are left
open; video sizes shrink to 64x48 and frame counts in proportion; training runs 2 steps on two
tiny clips.
"""
TINY_FILES = {"self_forcing_dmd.pt": "sf_tiny.safetensors", "causal_forcing_framewise.pt": "sf_tiny.safetensors",
              "longlive_base.pt": "sf_tiny.safetensors"}  # its LoRA: ``support.comfy_host.write_tiny_lora``
TINY_PROMPTS = ["cat.safetensors", "dog.safetensors"]
TINY_WIDTH, TINY_HEIGHT = 64, 48
TINY_TRAINING = {"SelfForcingTrainingClips": {"width": 32, "height": 32, "length": 9},
                 "SelfForcingTrainer": {"steps": 2, "lora_rank": 4, "save_every": 1}}


def tiny_length(length: int) -> int:
    """Pixel frames (4n + 1) of the tiny run: 25 for a clip up to 81 frames, else 37."""
    return 25 if length <= 81 else 37


def swap_in_tiny_models(prompt: dict) -> dict:
    """The frontend's API prompt with tiny models, prompt embeddings and sizes (see module docstring);
    returns {SaveVideo node id: expected frame count}."""
    encoders = sorted(node_id for node_id, node in prompt.items() if node["class_type"] == "CLIPTextEncode")
    for index, node_id in enumerate(encoders):
        prompt[node_id] = {"class_type": "SelfForcingLoadPromptEmbeddings",
                           "inputs": {"embeddings": TINY_PROMPTS[index % len(TINY_PROMPTS)]}}
    text_encoders = [node_id for node_id, node in prompt.items() if node["class_type"] == "CLIPLoader"]
    for node_id in text_encoders:
        del prompt[node_id]
    for node in prompt.values():  # e.g. the training clips' optional caption encoder
        for name in [n for n, value in node["inputs"].items() if isinstance(value, list) and value[0] in text_encoders]:
            del node["inputs"][name]
    lengths = {}
    for node_id, node in prompt.items():
        inputs = node["inputs"]
        for name, value in inputs.items():
            if isinstance(value, str) and value in TINY_FILES:
                inputs[name] = TINY_FILES[value]
        inputs.update(TINY_TRAINING.get(node["class_type"], {}))
        if node["class_type"].startswith("SelfForcing") and "seed" in inputs and "width" in inputs:
            scale = (tiny_length(inputs["length"]) - 1) / (inputs["length"] - 1)
            inputs.update(width=TINY_WIDTH, height=TINY_HEIGHT, length=tiny_length(inputs["length"]))
            lengths[node_id] = inputs["length"]
            if inputs.get("kv_window_frames"):
                inputs["kv_window_frames"] = 6
            for switch in schedule_nodes(prompt, inputs.get("prompt_schedule")):
                switch["start_frame"] = 1 + round((switch["start_frame"] - 1) * scale)
    return {node_id: lengths[source_sampler(prompt, node_id)]
            for node_id, node in prompt.items() if node["class_type"] == "SaveVideo"}


def schedule_nodes(prompt, link):
    """Inputs of every Prompt Schedule node chained into a sampler's prompt_schedule link."""
    while link:
        inputs = prompt[link[0]]["inputs"]
        yield inputs
        link = inputs.get("prompt_schedule")


def source_sampler(prompt, node_id):
    """The sampler a SaveVideo's frames come from (following the first link of each node upstream)."""
    while "width" not in prompt[node_id]["inputs"]:
        node_id = next(v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list))
    return node_id
