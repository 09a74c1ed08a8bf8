"""Small files for tests and workflows: a GIF clip, a parity fixture root's model, and a video reader."""
import json

import av
import numpy as np
import torch
from safetensors.torch import save_file

from selfforcing_core.model import CausalWanModel, WanConfig


def write_gif(path, frames=9, size=32):
    """A GIF of ``frames`` flat colours (each frame a different one) of size x size pixels."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("gif", rate=8)
        stream.width, stream.height, stream.pix_fmt = size, size, "rgb8"
        for i in range(frames):
            image = np.full((size, size, 3), (25 * i, 120, 200 - 20 * i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_frames(path) -> list:
    """Every frame of a video file as an RGB uint8 array [H, W, 3]."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def write_model_root(root, cfg: WanConfig) -> CausalWanModel:
    """A fixture root's ``weights.safetensors`` and ``model_config.json`` for a random model."""
    torch.manual_seed(0)
    model = CausalWanModel(cfg)
    root.mkdir()
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(root / "weights.safetensors"))
    model_json = {"model_type": "t2v", "patch_size": list(cfg.patch_size), "text_len": cfg.text_len,
                  "in_dim": cfg.in_dim, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim,
                  "text_dim": cfg.text_dim, "out_dim": cfg.out_dim, "num_heads": cfg.num_heads,
                  "num_layers": cfg.num_layers, "qk_norm": cfg.qk_norm, "cross_attn_norm": cfg.cross_attn_norm,
                  "eps": cfg.eps}
    (root / "model_config.json").write_text(json.dumps({"model": model_json}))
    return model
