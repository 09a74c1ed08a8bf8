"""How much device memory a generation needs: weights + KV caches + activations.

The KV window (frames kept in the self-attention cache) is the main dial: at 480x832 each cached
latent frame costs 2 (k, v) x 30 layers x 1560 tokens x 1536 channels x 2 bytes = 288 MB in bf16.
Weights are counted from the model built on the meta device (exact for a given config, FP8 and
offload included). Activations are the peak of the transient tensors of one block call in
inference (no gradients), assuming a memory-efficient attention kernel (flash / SDPA efficient):
the larger of the q/k normalisation phase and the FFN phase (two [tokens, ffn_dim] tensors).
The text encoder is not included. A streaming decoder's activations (one block decoded at a
time) are traced: its decode of one block runs on fake tensors, which carry shapes but no memory,
and the peak of the bytes its tensors hold at once is counted (``traced_peak_bytes``); this equals
the allocator's peak on the CPU.

The guards (``check_generation_fits``, ``check_encoding_fits``) compare these needs with the free
memory before anything is allocated, so an impossible request is refused with both figures
instead of growing the process until the OS kills it.
"""
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import SelfForcingError
from .fp8 import FP8Linear, fp8_layers
from .model import CausalWanModel, WanConfig
from .units import latent_size, video_frames_for


@dataclass
class MemoryEstimate:
    """Device bytes of one generation."""

    weights: int
    kv_cache: int  # self-attention keys/values of every layer
    cross_cache: int  # projected prompt keys/values of every layer
    activations: int  # peak transient tensors of one block call
    offloaded_weights: int = 0  # kept in CPU memory by block offload (not counted in total)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.cross_cache + self.activations

    def __str__(self):
        gib = 2 ** 30
        return (f"{self.total / gib:.2f} GiB (weights {self.weights / gib:.2f}, KV cache {self.kv_cache / gib:.2f}, "
                f"text cache {self.cross_cache / gib:.2f}, activations {self.activations / gib:.2f})")


def weight_bytes(cfg: WanConfig, dtype: torch.dtype = torch.bfloat16, fp8: str = "off",
                 fp8_granularity: str = "tensor", offload_blocks: int = 0) -> tuple[int, int]:
    """(device bytes, offloaded CPU bytes) of the transformer weights.

    With fp8 on, block linear weights take 1 byte each plus a float32 scale per tensor or per
    output channel; all other tensors (biases included) take ``dtype``.
    """
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    device_bytes = offloaded = 0
    for name, tensor in model.named_parameters():
        quantised = fp8 != "off" and name.startswith("blocks.") and name.endswith(".weight") and tensor.ndim == 2
        scales = (tensor.shape[0] if fp8_granularity == "channel" else 1) * 4 if quantised else 0
        size = tensor.numel() * (1 if quantised else itemsize) + scales
        if name.startswith("blocks.") and int(name.split(".")[1]) < offload_blocks:
            offloaded += size
        else:
            device_bytes += size
    return device_bytes, offloaded


def activation_bytes(cfg: WanConfig, tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak transient bytes of one block call on ``tokens`` query tokens (batch included).

    Normalisation phase (RMSNorm of k, the peak of attention; RoPE in float32 needs less): residual,
    modulated input, rotated q, k's projection and the weighted result (dtype), k's square and
    normalised form (float32), and below float32 k's float32 copy and the cast back; FFN phase:
    residual, modulated input and output (dtype), the float32 modulation temporary, the hidden
    layer before and after GELU. (The RoPE cos/sin tables are kept per grid, not transient.)
    """
    itemsize = torch.tensor([], dtype=dtype).element_size()
    norm_phase = tokens * cfg.dim * (5 * itemsize + 2 * 4 + (4 + itemsize if itemsize < 4 else 0))
    ffn_phase = tokens * (cfg.dim * (3 * itemsize + 4) + 2 * cfg.ffn_dim * itemsize)
    return max(norm_phase, ffn_phase)


def estimate_memory(cfg: WanConfig, height: int = 480, width: int = 832, kv_window_frames: int | None = None,
                    num_frames: int = 21, dtype: torch.dtype = torch.bfloat16, fp8: str = "off",
                    fp8_granularity: str = "tensor", frames_per_block: int = 3, batch_size: int = 1,
                    offload_blocks: int = 0) -> MemoryEstimate:
    """Device memory of generating ``num_frames`` latent frames at ``height`` x ``width`` pixels.

    kv_window_frames: rolling cache size in latent frames (sink included), or None for a global
    cache holding all ``num_frames``. dtype: compute / cache dtype.
    """
    latent_h, latent_w = latent_size(width, height)
    frame_seqlen = (latent_h // cfg.patch_size[1]) * (latent_w // cfg.patch_size[2])
    cache_frames = kv_window_frames or num_frames
    itemsize = torch.tensor([], dtype=dtype).element_size()
    weights, offloaded = weight_bytes(cfg, dtype, fp8, fp8_granularity, offload_blocks)
    per_token = 2 * cfg.num_layers * batch_size * cfg.dim * itemsize  # k and v of every layer
    return MemoryEstimate(
        weights=weights,
        kv_cache=per_token * cache_frames * frame_seqlen,
        cross_cache=per_token * cfg.text_len,
        activations=activation_bytes(cfg, batch_size * frames_per_block * frame_seqlen, dtype),
        offloaded_weights=offloaded,
    )


def estimate_for_model(model: CausalWanModel, height: int, width: int, kv_window_frames: int | None,
                       num_frames: int, batch_size: int = 1, frames_per_block: int = 3) -> MemoryEstimate:
    """``estimate_memory`` for a loaded model: its dtype, FP8 format and offloaded blocks read off it."""
    quantised = [layer for layer in fp8_layers(model).values() if isinstance(layer, FP8Linear)]
    fp8 = str(quantised[0].weight.dtype).removeprefix("torch.float8_") if quantised else "off"
    return estimate_memory(model.cfg, height, width, kv_window_frames, num_frames,
                           dtype=model.dtype, fp8=fp8,
                           fp8_granularity=quantised[0].granularity if quantised else "tensor",
                           frames_per_block=frames_per_block, batch_size=batch_size,
                           offload_blocks=sum(block.offload is not None for block in model.blocks))


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that ops create and that are still referenced (views and
    in-place results add nothing; a tensor's bytes are released when it is garbage)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _release(self, nbytes: int):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:
            return out
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in inputs:
                nbytes = tensor.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._release, nbytes)
        return out


def traced_peak_bytes(fn: Callable[[Callable[..., torch.Tensor]], object]) -> int:
    """Peak bytes of the tensors ``fn`` holds at once, traced without allocating: ``fn(new)`` runs
    on fake tensors, and ``new(shape, device, dtype)`` makes its (fake) inputs; real parameters of
    the modules it calls are read as fakes."""
    with FakeTensorMode(allow_non_fake_inputs=True), _LiveTensorBytes() as counter:
        fn(lambda shape, device, dtype: torch.empty(shape, device=device, dtype=dtype))
    return counter.peak


def decoder_activation_bytes(decoder, latent_frames: int, latent_h: int, latent_w: int, batch_size: int = 1) -> int:
    """Peak bytes of a streaming decoder (``codec.StreamingCodec``) decoding one block of
    ``latent_frames`` latent frames at latent_h x latent_w (the first block of a clip, which
    has no carried state but otherwise the same shapes), on the decoder's device."""
    weight = next(decoder.parameters())

    def decode_block(new):
        decoder.stream().decode(new((batch_size, latent_frames, decoder.latent_channels, latent_h, latent_w),
                                    weight.device, weight.dtype))
    return traced_peak_bytes(decode_block)


class MemoryGuardError(SelfForcingError):
    """A request that cannot fit the free memory, refused before anything is allocated; ``need``
    and ``free`` in bytes."""

    def __init__(self, message: str, need: int, free: int):
        super().__init__(message)
        self.need, self.free = need, free


def available_memory(device: str | torch.device) -> int | None:
    """Bytes a new allocation can still take: free CUDA memory (plus what torch's caching allocator
    holds unused) on a GPU; available RAM on the CPU (psutil, else /proc/meminfo; None if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits(need: int, device: str | torch.device, what: str, fix: str) -> None:
    """Raise MemoryGuardError with the estimate and the free memory unless ``need`` bytes fit ``device``."""
    free = available_memory(device)
    if free is not None and need > free:
        gib = 2 ** 30
        raise MemoryGuardError(f"{what} needs about {need / gib:.1f} GiB on {torch.device(device)} but only "
                               f"{free / gib:.1f} GiB is free; {fix}", need, free)


def frame_bytes(video_frames: int, height: int, width: int, batch_size: int = 1) -> int:
    """Float32 RGB frames as the samplers hand them to ComfyUI (kept in host memory)."""
    return batch_size * video_frames * 3 * height * width * 4


def check_generation_fits(model: CausalWanModel, height: int, width: int, kv_window_frames: int | None,
                          num_frames: int, decoder=None, batch_size: int = 1, frames_per_block: int = 3,
                          call_frames: int | None = None) -> None:
    """Refuse a generation of ``num_frames`` latent frames that cannot fit, before it allocates.

    Needs beyond the loaded weights: KV and text caches and the activations of one model call
    over ``call_frames`` latent frames (default: a block; Rolling Forcing: its window of blocks)
    on the model's device (``estimate_for_model``); with a ``decoder``, its activations for one
    block (``decoder_activation_bytes``) on its device, and the decoded float32 frames, twice
    (the blocks and the joined clip), in host memory. Needs on the same device add up (on the
    CPU all of them come out of the same RAM).
    """
    latent_h, latent_w = latent_size(width, height)
    estimate = estimate_for_model(model, height, width, kv_window_frames, num_frames, batch_size,
                                  call_frames or frames_per_block)
    needs = {model.device: estimate.total - estimate.weights}
    if decoder is not None:
        decoder_device = next(decoder.parameters()).device
        decoding = decoder_activation_bytes(decoder, frames_per_block, latent_h, latent_w, batch_size)
        needs[decoder_device] = needs.get(decoder_device, 0) + decoding
        frames = 2 * frame_bytes(video_frames_for(num_frames), height, width, batch_size)
        needs[torch.device("cpu")] = needs.get(torch.device("cpu"), 0) + frames
    fix = ("lower width, height or length, or set kv_window_frames (e.g. 21) so the cache stops growing"
           if kv_window_frames is None else "lower width, height or length, or the KV window")
    for device, need in needs.items():
        check_fits(need, device, "this video" if device == model.device else "decoding this video", fix)


def check_encoding_fits(video_frames: int, height: int, width: int, device: str | torch.device,
                        dtype: torch.dtype = torch.float32) -> None:
    """Refuse encoding a clip of ``video_frames`` frames at height x width that cannot fit: at least
    the float32 frames plus two full-resolution 64-channel feature maps (the first layers of both
    encoders) on ``device``."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    need = frame_bytes(video_frames, height, width) + 2 * video_frames * height * width * 64 * itemsize
    check_fits(need, device, f"encoding {video_frames} frames at {width}x{height}",
               "lower the training width, height or length")


def check_training_fits(model: CausalWanModel, height: int, width: int, num_frames: int, batch_size: int) -> None:
    """Refuse training on windows of ``num_frames`` latent frames that cannot fit: at least what the
    rollout of one batch needs at inference (caches and activations; training adds gradients)."""
    estimate = estimate_for_model(model, height, width, None, num_frames, batch_size)
    check_fits(estimate.total - estimate.weights, model.device,
               f"training on {batch_size} x {num_frames} latent frames at {width}x{height}",
               "lower the batch size, or the training width, height or length of the clips")
