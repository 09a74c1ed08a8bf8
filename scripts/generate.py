"""Run the default text-to-video workflow headless in the real ComfyUI host and write an mp4.

    bash scripts/generate.sh [--prompt "..."] [--download] [--length 81] [--seed 0]

The graph is the one of workflows/text_to_video_streaming.json: umT5 text encode -> Self-Forcing
Streaming Sampler with TAEHV decoding each block -> CreateVideo -> SaveVideo. Model files are
read from the host's models folder (``.host/ComfyUI/models`` or ``$COMFYUI_PATH/models``, or
``--models``). Without them it stops and lists what to download and where it goes;
``--download`` fetches them (several GB) when the machine is online. ``--embeddings NAME``
uses a prompt-embedding file from models/prompt_embeddings instead of the multi-GB umT5 text encoder.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from support.comfy_server import REPO_ROOT, ComfyServer

MODEL_FILES = [  # (models subfolder, file name, source)
    ("diffusion_models", "self_forcing_dmd.pt",
     "https://huggingface.co/gdhe17/Self-Forcing/resolve/main/checkpoints/self_forcing_dmd.pt"),
    ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
     "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/text_encoders/"
     "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    ("vae_approx", "taew2_1.safetensors", "https://github.com/madebyollin/taehv/raw/main/safetensors/taew2_1.safetensors"),
]
DEFAULT_PROMPT = ("A red fox trots through fresh snow in a quiet pine forest at dawn, soft golden light, "
                  "breath visible in the cold air, the camera follows at the fox's height.")


def host_root() -> Path:
    root = Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".host" / "ComfyUI")
    if not (root / "main.py").is_file():
        sys.exit(f"no ComfyUI host at {root}: run scripts/setup.sh or set COMFYUI_PATH")
    return root


def download(url: str, target: Path):
    """Fetch ``url`` to ``target`` through a temporary file in the same folder (no partial files)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url}\n  -> {target}")
    with urllib.request.urlopen(url, timeout=60) as response, \
            tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as part:
        shutil.copyfileobj(response, part, length=16 << 20)
    os.replace(part.name, target)


def ensure_models(models: Path, fetch: bool, need_text_encoder: bool):
    needed = [entry for entry in MODEL_FILES if need_text_encoder or entry[0] != "text_encoders"]
    missing = [(folder, name, url) for folder, name, url in needed if not (models / folder / name).is_file()]
    if missing and not fetch:
        lines = [f"  {models / folder / name}\n      from {url}" for folder, name, url in missing]
        sys.exit("These model files are missing (run again with --download when online, or put them there):\n"
                 + "\n".join(lines))
    for folder, name, url in missing:
        download(url, models / folder / name)


def workflow(prompt: str = DEFAULT_PROMPT, embeddings: str | None = None, width: int = 832, height: int = 480,
             length: int = 81, seed: int = 0) -> dict:
    """API-format prompt of workflows/text_to_video_streaming.json (node "2" gives the CONDITIONING);
    with the defaults it is that workflow exactly (a browser test checks this)."""
    if embeddings:
        text = {"2": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": embeddings}}}
    else:
        text = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": MODEL_FILES[1][1], "type": "wan", "device": "default"}},
                "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 0]}}}
    return {
        **text,
        "3": {"class_type": "SelfForcingModelLoader",
              "inputs": {"model_name": MODEL_FILES[0][1], "weight_dtype": "auto", "device": "default",
                         "fp8": "off", "lora_mode": "merge", "family": "auto (from file name)"}},
        "4": {"class_type": "SelfForcingDecoderLoader",
              "inputs": {"decoder_name": f"vae_approx/{MODEL_FILES[2][1]}", "dtype": "fp32"}},
        "5": {"class_type": "SelfForcingStreamingSampler",
              "inputs": {"model": ["3", 0], "positive": ["2", 0], "decoder": ["4", 0], "width": width,
                         "height": height, "length": length, "seed": seed, "steps": "4 steps, shift 5 (paper)",
                         "kv_window_frames": 0 if length <= 81 else 21, "sink_frames": 0 if length <= 81 else 3,
                         "frames_per_block": 0, "later_block_steps": "preset",
                         "record": False, "lora_strength": 1.0}},
        "6": {"class_type": "CreateVideo", "inputs": {"images": ["5", 1], "fps": 16.0}},
        "7": {"class_type": "SaveVideo", "inputs": {"video": ["6", 0], "filename_prefix": "self_forcing/text_to_video",
                                                   "format": "mp4", "codec": "h264"}},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--length", type=int, default=81, help="video frames, 4n + 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embeddings", help="a file in models/prompt_embeddings to use instead of --prompt")
    parser.add_argument("--download", action="store_true", help="fetch missing model files from the hub")
    parser.add_argument("--models", type=Path, help="models folder (default: the host's)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "output")
    args = parser.parse_args()

    root = host_root()
    models = (args.models or root / "models").resolve()
    ensure_models(models, args.download, need_text_encoder=not args.embeddings)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        print("No CUDA device: the 1.3B model runs on the CPU in fp32 (this takes a long time).")
    with tempfile.TemporaryDirectory() as scratch:
        paths = Path(scratch) / "extra_model_paths.yaml"
        folders = "".join(f"    {f}: {f}\n" for f in ("diffusion_models", "text_encoders", "vae", "vae_approx",
                                                          "loras", "prompt_embeddings"))
        paths.write_text(f"self_forcing:\n    base_path: {models}\n{folders}")
        server = ComfyServer(root, cpu=not cuda, extra_args=["--extra-model-paths-config", str(paths),
                                                            "--output-directory", str(args.output.resolve())])
        server.start()
        try:
            started = time.monotonic()
            graph = workflow(args.prompt, args.embeddings, args.width, args.height, args.length, args.seed)
            entry = server.run(graph, timeout=24 * 3600)
            result = entry["outputs"]["7"]["images"][0]
            video = args.output / result["subfolder"] / result["filename"]
            print(f"wrote {video} in {time.monotonic() - started:.0f} s")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
