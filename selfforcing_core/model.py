"""The causal Wan2.1 DiT of Self Forcing: one module, three attention modes from the same weights.

* ``cached``: one block of latent frames at a time, reading and writing a ``KVCache`` (inference
  and self-rollout).
* ``block_causal``: a whole sequence at once; a token sees its own block and earlier blocks
  (optionally only the last ``window_frames`` frames). Equal to the cached mode by construction.
* ``bidirectional``: every token sees every token (the teacher and critic of DMD training).

Tensors: latents [B, F, C, H, W] (frames before channels, the layout of every caller; the
patch embedding sees Wan's [B, C, F, H, W] inside ``forward``), timesteps [B, F] (one per latent
frame), prompt embeddings [B, L <= text_len, text_dim]. Parameter names equal the
original Wan2.1 / ComfyUI names, so those state dicts load unchanged. All linear layers (``nn.Linear``
on ``linear.py``'s kernel) are plain attributes and can be swapped (FP8, LoRA) without touching this file.
"""
import math
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .config import WanConfig
from .kv_cache import CacheRules, KVCache
from .linear import Linear

ROPE_MAX_FRAMES = 1024  # length of the RoPE tables: positions 0..1023 per axis


def sinusoidal_embedding(t: torch.Tensor, width: int) -> torch.Tensor:
    """Timestep features [cos | sin], computed in float64 on the CPU. t: [N] -> [N, width] float64 (CPU)."""
    half = width // 2
    frequencies = torch.pow(10000, -torch.arange(half, dtype=torch.float64) / half)
    angles = torch.outer(t.detach().to("cpu").to(torch.float64), frequencies)  # cast on the CPU, never on the device
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_tables(head_dim: int) -> list[torch.Tensor]:
    """RoPE angles for (time, height, width): each [ROPE_MAX_FRAMES, pairs_axis] float64 (CPU).

    The head's head_dim/2 channel pairs split as time gets ``pairs - 2*(head_dim//6)``, height and
    width ``head_dim//6`` each (128 -> 22/21/21); each axis has its own frequency base width.
    """
    axis_widths = [head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)]
    tables = []
    for width in axis_widths:
        inverse = 1.0 / torch.pow(10000, torch.arange(0, width, 2, dtype=torch.float64, device="cpu") / width)
        tables.append(torch.outer(torch.arange(ROPE_MAX_FRAMES, dtype=torch.float64, device="cpu"), inverse))
    return tables


def grid_positions(frames, h: int, w: int) -> torch.Tensor:
    """(frame, row, column) of every token of a frame-major grid. frames: F frame positions -> [F*h*w, 3] long."""
    frames = torch.as_tensor(list(frames), dtype=torch.long)
    return torch.stack(torch.meshgrid(frames, torch.arange(h), torch.arange(w), indexing="ij"), dim=-1).reshape(-1, 3)


class RopeTable:
    """cos/sin of the 3D RoPE angles, built in float64 on the CPU and handed to the device in the
    compute dtype (devices without float64, such as MPS, never see it).

    ``cos_sin(positions)`` serves any per-token (frame, row, column) positions; a position may be
    negative (rotation backwards, e.g. to move cached keys to another frame). ``for_grid`` serves
    a frame-major token grid and keeps the last few results, so the layers and the repeated calls
    of a block (denoising steps, clean-context pass) share one table.
    """

    MEMO_SIZE = 8

    def __init__(self, head_dim: int):
        self.axis_angles = rope_tables(head_dim)
        self.memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, positions: torch.Tensor, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [N, 3] integer (frame, row, column) -> (cos, signed sin), each [N, 1, head_dim] in
        ``dtype`` on ``device``, laid out for ``apply_rope`` (pair i: cos_i, cos_i and -sin_i, +sin_i)."""
        positions = positions.to("cpu", torch.long)
        sign = positions.sign().double()
        try:
            angles = torch.cat([table[positions[:, axis].abs()] * sign[:, axis, None]  # angle(-p) = -angle(p)
                                for axis, table in enumerate(self.axis_angles)], dim=1)
        except IndexError:
            raise ValueError(f"a RoPE position is beyond the table ({ROPE_MAX_FRAMES} positions per axis); "
                             "the model cannot place frames that far") from None
        cos = angles.cos().repeat_interleave(2, dim=1)
        sin = torch.stack([-angles.sin(), angles.sin()], dim=-1).flatten(1)
        return tuple(table[:, None].to(dtype).to(device) for table in (cos, sin))

    @torch.compiler.disable  # a table lookup: eager under torch.compile (no guards on the memo's keys)
    def for_grid(self, frames, h: int, w: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos_sin`` of the frame-major grid of frame positions ``frames`` x h x w (remembered)."""
        key = (tuple(frames), h, w, torch.device(device), dtype)
        if max(key[0]) >= ROPE_MAX_FRAMES:
            raise ValueError(f"latent frame {max(key[0])} is beyond the RoPE table ({ROPE_MAX_FRAMES} frames); "
                             "the model cannot place frames that far")
        if key not in self.memo:
            if len(self.memo) >= self.MEMO_SIZE:
                del self.memo[next(iter(self.memo))]
            self.memo[key] = self.cos_sin(grid_positions(frames, h, w), device, dtype)
        return self.memo[key]


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of q or k by their positions' angles.

    x: [B, N, heads, head_dim]; rope: (cos, signed sin) [N, 1, head_dim] from ``RopeTable``.
    Computed in the tables' dtype (float32, or float64 for a float64 model); returns x's dtype.
    """
    cos, sin = rope
    wide = x.to(torch.promote_types(x.dtype, cos.dtype))
    swapped = wide.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    return swapped.mul_(sin).addcmul_(wide, cos).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, scale 1/sqrt(head_dim). q: [B, Lq, n, d]; k, v: [B, Lk, n, d] -> [B, Lq, n*d]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype),
                                         v.transpose(1, 2).to(q.dtype), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last axis, normalised in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (affine parameters too) and cast back."""

    def forward(self, x):
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class Projections(nn.Module):
    """q, k, v, o projections with RMSNorm on q and k over the full hidden width (before the head split)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()


class SelfAttention(Projections):
    def forward(self, x, grid, start_frame, rope, layer, kv_cache: KVCache | None, mask):
        """rope: (the model's ``RopeTable``, (cos, sin) of x's tokens at the positions the cache gives them)."""
        heads = (*x.shape[:2], self.num_heads, self.head_dim)
        frame_tokens = grid[1] * grid[2]
        table, call_rope = rope

        def rotate(t, first_position):  # for the cache: t [B, n * frame_tokens, heads, head_dim]
            frames = range(first_position, first_position + t.shape[1] // frame_tokens)
            return apply_rope(t, table.for_grid(frames, *grid[1:], t.device, torch.promote_types(t.dtype, torch.float32)))

        q = apply_rope(self.norm_q(self.q(x)).view(heads), call_rope)
        k = self.norm_k(self.k(x)).view(heads)
        if kv_cache is None or kv_cache.rules.rope == "absolute":
            k = apply_rope(k, call_rope)  # before v exists: a lower peak
        v = self.v(x).view(heads)
        if kv_cache is not None:
            k, v = kv_cache.store(layer, k, v, rotate)
        return self.o(attention(q, k, v, mask))


class CrossAttention(Projections):
    def project_context(self, context):
        """Text keys/values: context [B, text_len, dim] -> two [B, text_len, heads, head_dim]."""
        heads = (*context.shape[:2], self.num_heads, self.head_dim)
        return self.norm_k(self.k(context)).view(heads), self.v(context).view(heads)

    def forward(self, x, context, layer, kv_cache: KVCache | None):
        if kv_cache is None or torch.is_grad_enabled():
            k, v = self.project_context(context())
        else:
            k, v = kv_cache.cross(layer, lambda: self.project_context(context()))
        q = self.norm_q(self.q(x)).view(*x.shape[:2], self.num_heads, self.head_dim)
        return self.o(attention(q, k, v))


FORWARD_WRAPPERS = ("compile", "checkpoint")  # kinds of Block.forward_wrappers, innermost first


class Block(nn.Module):
    """Transformer block with per-frame modulation: self-attn, cross-attn (no gate), FFN.

    ``forward_wrappers`` is the one way to change how a block runs: ``wrap_forward(kind, wrapper)``
    installs ``wrapper(inner, *args)`` for a kind of ``FORWARD_WRAPPERS`` (``compile.py``: the
    compiled forward; ``dmd.py``: gradient checkpointing); kinds compose in that order around
    ``plain_forward`` and each is removed on its own. ``offload`` is set by ``offload.py``.
    """

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.forward_wrappers: dict[str, Callable] = {}
        self.offload = None  # offload.BlockOffload while the block's weights live in CPU memory
        self.norm1 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    def wrap_forward(self, kind: str, wrapper: Callable | None):
        """Install ``wrapper(inner, *args)`` as the block's ``kind`` wrapper (None removes it)."""
        if kind not in FORWARD_WRAPPERS:
            raise ValueError(f"unknown forward wrapper {kind!r}: use one of {FORWARD_WRAPPERS}")
        if wrapper is None:
            self.forward_wrappers.pop(kind, None)
        else:
            self.forward_wrappers[kind] = wrapper

    def forward(self, *args):
        run = self.plain_forward
        for kind in FORWARD_WRAPPERS:
            if kind in self.forward_wrappers:
                run = partial(self.forward_wrappers[kind], run)
        return run(*args)

    def plain_forward(self, x, e0, context, grid, start_frame, rope, layer, kv_cache, mask):
        """x: [B, F*hw, dim]; e0: [B, F, 6, dim] float32; rope: see ``SelfAttention.forward``."""
        frames = grid[0]
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float()[:, None] + e0).chunk(6, dim=2)

        def modulate(h, shift, scale):  # h * (1 + scale) + shift; h: [B, F*hw, dim]; shift/scale: [B, F, 1, dim]
            return torch.addcmul(shift, h.unflatten(1, (frames, -1)), 1 + scale).flatten(1, 2).type_as(x)

        def add_gated(x, y, gate):  # x + y * gate
            return torch.addcmul(x.unflatten(1, (frames, -1)), y.unflatten(1, (frames, -1)), gate).flatten(1, 2).type_as(x)

        y = self.self_attn(modulate(self.norm1(x), shift1, scale1), grid, start_frame, rope, layer, kv_cache, mask)
        x = add_gated(x, y, gate1)
        x = x + self.cross_attn(self.norm3(x), context, layer, kv_cache)
        return add_gated(x, self.ffn(modulate(self.norm2(x), shift2, scale2)), gate2)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e, frames):
        """x: [B, F*hw, dim]; e: [B, F, dim] time embedding -> [B, F, hw, out_dim * patch volume]."""
        shift, scale = (self.modulation.float()[:, None] + e.float()[:, :, None]).chunk(2, dim=2)
        return self.head((self.norm(x).unflatten(1, (frames, -1)) * (1 + scale) + shift).type_as(x))


class CausalWanModel(nn.Module):
    """Wan2.1 DiT with block-causal attention, a KV cache and per-frame timestep modulation.

    ``layout`` names the checkpoint layout the weights came from and ``checkpoint_entry`` the entry
    of an official training dict they were read from, if any (``checkpoint.load_generator``);
    ``compile_state`` is the ``compile.CompileState`` shared by compiled blocks (None: eager).
    """

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        self.layout: str | None = None
        self.checkpoint_entry: str | None = None
        self.compile_state = None
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = RopeTable(cfg.head_dim)  # plain attribute, not a buffer: not in state dicts

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (of the non-FP8 weights; FP8 layers compute in it too)."""
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        """Compute device (offloaded blocks are streamed to it per call)."""
        return self.patch_embedding.weight.device

    def frame_seqlen(self, latent_h: int, latent_w: int) -> int:
        """Tokens per latent frame (1560 for a 60x104 latent of the 1.3B model)."""
        _, ph, pw = self.cfg.patch_size
        return (latent_h // ph) * (latent_w // pw)

    def new_kv_cache(self, latent_h: int, latent_w: int, capacity_frames: int, sink_frames: int = 0,
                     rolling: bool = False, batch_size: int = 1, dtype=None, device=None,
                     rules: CacheRules = CacheRules()) -> KVCache:
        """A cache sized for this model at a latent resolution (see ``KVCache``)."""
        return KVCache(self.cfg.num_layers, self.frame_seqlen(latent_h, latent_w), self.cfg.num_heads,
                       self.cfg.head_dim, capacity_frames, sink_frames, rolling, batch_size,
                       dtype or self.dtype, device or self.device, rules)

    def embed_text(self, prompt: torch.Tensor) -> torch.Tensor:
        """Zero-pad (or truncate) prompt embeddings to text_len rows and embed. [B, L, text_dim] -> [B, text_len, dim]."""
        cfg = self.cfg
        if prompt.ndim != 3 or prompt.shape[-1] != cfg.text_dim:
            raise ValueError(f"prompt embeddings must be [batch, tokens, {cfg.text_dim}] (umT5 output), "
                             f"got {tuple(prompt.shape)}")
        prompt = prompt[:, :cfg.text_len]
        prompt = F.pad(prompt, (0, 0, 0, cfg.text_len - prompt.shape[1]))
        return self.text_embedding(prompt.to(self.text_embedding[0].weight.dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor, *,
                kv_cache: KVCache | None = None, start_frame: int = 0, mode: str = "cached",
                frames_per_block: int = 3, window_frames: int | None = None) -> torch.Tensor:
        """Predict the flow ``noise - x0``.

        x: [B, F, C, H, W] (any float dtype; computed in ``self.dtype``); t: [B, F] or [B] (float timesteps, 0..1000); prompt: [B, L, text_dim].
        mode: ``cached`` (needs ``kv_cache``; x holds the frames starting at ``start_frame``),
        ``block_causal`` (x is the whole sequence from frame ``start_frame``; blocks of
        ``frames_per_block``; optional ``window_frames``) or ``bidirectional``.
        Returns [B, F, C_out, H, W] in ``self.dtype``.
        """
        cfg = self.cfg
        if x.ndim != 5 or x.shape[2] != cfg.in_dim:
            raise ValueError(f"expected latents [B, F, {cfg.in_dim}, H, W] (frames before channels), "
                             f"got {tuple(x.shape)}")
        batch, frames, _, height, width = x.shape
        _, ph, pw = cfg.patch_size
        if height % ph or width % pw:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {ph}x{pw}")
        t = t.reshape(batch, -1).expand(batch, frames) if t.numel() in (batch, batch * frames) else t
        if t.shape != (batch, frames):
            raise ValueError(f"timesteps must be [B] or [B, F] = [{batch}, {frames}], got {tuple(t.shape)}")

        tokens = self.patch_embedding(x.to(self.dtype).transpose(1, 2))
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, F*h*w, dim], frame-major

        with torch.autocast(x.device.type, enabled=False):
            features = sinusoidal_embedding(t.reshape(-1), cfg.freq_dim).to(tokens.dtype).to(tokens.device)
            e = self.time_embedding(features)  # [B*F, dim]
            e0 = self.time_projection(e).float().view(batch, frames, 6, cfg.dim)
        e = e.view(batch, frames, cfg.dim)

        cached_context = []

        def context():  # embedded prompt, computed at most once per call and only when needed
            if not cached_context:
                cached_context.append(self.embed_text(prompt))
            return cached_context[0]

        mask = None
        if mode == "cached":
            if kv_cache is None:
                raise ValueError("mode 'cached' needs a kv_cache (see CausalWanModel.new_kv_cache)")
            kv_cache.begin_call(start_frame, frames)
        elif mode == "block_causal":
            mask = block_causal_mask(frames, grid[1] * grid[2], frames_per_block, window_frames, x.device)
            kv_cache = None
        elif mode == "bidirectional":
            kv_cache = None
        else:
            raise ValueError(f"unknown attention mode {mode!r}: use cached, block_causal or bidirectional")

        # the cache places the call's frames (absolute or block-relativistic positions)
        position = start_frame if kv_cache is None else kv_cache.plan.position
        rope = (self.rope, self.rope.for_grid(range(position, position + grid[0]), *grid[1:], tokens.device,
                                              torch.promote_types(tokens.dtype, torch.float32)))
        for layer, block in enumerate(self.blocks):
            tokens = block(tokens, e0, context, grid, start_frame, rope, layer, kv_cache, mask)

        out = self.head(tokens, e, frames)  # [B, F, h*w, out_dim * pt*ph*pw]
        return self.unpatchify(out, grid)

    def unpatchify(self, out: torch.Tensor, grid) -> torch.Tensor:
        """[B, F, h*w, pt*ph*pw*C] (channel fastest) -> [B, F*pt, C, h*ph, w*pw]."""
        _, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        return rearrange(out, "b f (h w) (pt ph pw c) -> b (f pt) c (h ph) (w pw)", h=h, w=w, pt=pt, ph=ph, pw=pw)


def block_causal_mask(frames: int, frame_seqlen: int, frames_per_block: int, window_frames: int | None,
                      device) -> torch.Tensor:
    """Boolean [L, L] mask (True = may attend): own block and earlier blocks, optionally only the
    last ``window_frames`` frames ending at the end of the query's block."""
    frame = torch.arange(frames, device=device)
    block_end = (frame // frames_per_block + 1) * frames_per_block  # exclusive end frame of each frame's block
    allowed = frame[None, :] < block_end[:, None]
    if window_frames is not None:
        allowed &= frame[None, :] >= block_end[:, None] - window_frames
    return allowed.repeat_interleave(frame_seqlen, 0).repeat_interleave(frame_seqlen, 1)
