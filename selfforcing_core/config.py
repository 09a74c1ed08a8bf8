"""``WanConfig``: the hyper-parameters of a Wan2.1 DiT, read off its state dict or an official JSON config."""
import math
from dataclasses import dataclass, fields


@dataclass
class WanConfig:
    """Hyper-parameters of a Wan2.1 DiT; ``from_state_dict`` reads them off the weights."""

    dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int  # not stored in checkpoints: dim // 128 in every released Wan2.1 model
    in_dim: int = 16  # latent channels
    out_dim: int = 16
    text_dim: int = 4096  # umT5-XXL width
    text_len: int = 512  # prompts are zero-padded to this many rows; all rows are attended
    freq_dim: int = 256  # width of the sinusoidal timestep features
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True  # affine LayerNorm (norm3) before cross-attention
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_state_dict(cls, state_dict: dict, head_dim: int | None = 128, num_heads: int | None = None,
                        text_len: int = 512) -> "WanConfig":
        """Infer the config from canonical (original Wan2.1) parameter names.

        Head layout cannot be read off the weights: give ``num_heads`` or ``head_dim`` (default 128,
        as in every released Wan2.1 model).
        """
        patch = state_dict["patch_embedding.weight"]
        dim, in_dim, *patch_size = patch.shape
        num_layers = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
        if num_heads is None:
            if dim % head_dim:
                raise ValueError(f"hidden width {dim} is not a multiple of head_dim {head_dim}; "
                                 "give num_heads explicitly")
            num_heads = dim // head_dim
        if dim % num_heads:
            raise ValueError(f"hidden width {dim} is not divisible by num_heads {num_heads}")
        return cls(
            dim=dim,
            ffn_dim=state_dict["blocks.0.ffn.0.weight"].shape[0],
            num_layers=num_layers,
            num_heads=num_heads,
            in_dim=in_dim,
            out_dim=state_dict["head.head.weight"].shape[0] // math.prod(patch_size),
            text_dim=state_dict["text_embedding.0.weight"].shape[1],
            text_len=text_len,
            freq_dim=state_dict["time_embedding.0.weight"].shape[1],
            patch_size=tuple(patch_size),
            qk_norm="blocks.0.self_attn.norm_q.weight" in state_dict,
            cross_attn_norm="blocks.0.norm3.weight" in state_dict,
        )

    @classmethod
    def from_json(cls, values: dict) -> "WanConfig":
        """Build from a JSON dict in the official naming (extra keys such as model_type are ignored)."""
        known = {f.name for f in fields(cls)}
        kwargs = {key: value for key, value in values.items() if key in known}
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return cls(**kwargs)


WAN_T2V_1P3B = WanConfig(dim=1536, ffn_dim=8960, num_layers=30, num_heads=12)  # Self Forcing's base model
