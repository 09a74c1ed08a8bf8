"""The self-rollout DMD training loop on a user's clips: optimisers, schedule, EMA, checkpoints.

One ``Trainer`` owns a frozen base generator with three LoRA adapters (see ``dmd.py``). Each
``train_step``: a generator update every ``dfake_gen_update_ratio`` steps (first, as the official
trainer does), then one critic update, then (if ``real_lora_weight`` > 0) one update of the
teacher's clip adapter. All randomness of step s comes from a generator seeded with
``(seed, s)``, and every random tensor is drawn for the *global* batch and then sliced to this
rank, so a run is reproducible across resumes and equal for any number of processes.

Data parallel (``world_size`` > 1, torch.distributed initialised): each rank takes its slice of
the global batch and adapter gradients are averaged with ``all_reduce`` before clipping (what
DDP does; DDP's one-module-one-forward wrapper does not fit adapter switching on one model).
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from . import dmd
from .atomic import save_torch
from .lora import DEFAULT_TARGETS, active_adapter, adapter_parameters, inject_lora, remove_lora, save_lora
from .model import CausalWanModel
from .rollout import NoiseSource
from .schedule import DEFAULT_STEPS, FlowMatchSchedule

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters; defaults follow the paper's DMD config where it applies to LoRA training."""

    steps: int = 600
    batch_size: int = 1  # global batch (split across processes)
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: alpha = rank (scale 1)
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    generator_lr: float = 1e-4  # LoRA learning rates (the paper's full fine-tune used 2e-6 / 4e-7)
    critic_lr: float = 1e-4
    real_lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    max_grad_norm: float = 10.0
    dfake_gen_update_ratio: int = 5  # critic updates per generator update
    guidance_scale: float = 3.0  # teacher CFG in the cond + g (cond - uncond) form
    real_lora_weight: float = 1.0  # strength of the teacher's clip adapter; 0 = plain distillation
    timestep_shift: float = 5.0
    min_timestep: float = 20.0
    max_timestep: float = 980.0
    denoising_steps: tuple[int, ...] = DEFAULT_STEPS
    frames_per_block: int = 3
    ema_decay: float = 0.99
    ema_start_step: int = 200
    gradient_checkpointing: bool = True
    seed: int = 0
    save_every: int = 50

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)


@dataclass
class ClipBatchSource:
    """What the trainer samples from: clip latents [N, F, C, h, w], per-window prompt embeddings
    (list of [L, text_dim]) and the negative prompt's embedding [L, text_dim]."""

    latents: torch.Tensor
    prompts: list
    negative: torch.Tensor
    names: list = field(default_factory=list)


def stack_prompts(prompts: list) -> torch.Tensor:
    """Zero-pad prompt embeddings [L_i, D] to a common length (the model pads with zeros too). -> [B, L, D]."""
    length = max(p.shape[0] for p in prompts)
    return torch.stack([torch.nn.functional.pad(p, (0, 0, 0, length - p.shape[0])) for p in prompts])


def world() -> tuple[int, int]:
    """(rank, world_size) of the running torch.distributed group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Self-rollout DMD fine-tuning of ``model`` (frozen) through three LoRA adapters."""

    def __init__(self, model: CausalWanModel, data: ClipBatchSource, cfg: TrainConfig):
        self.cfg, self.data, self.model = cfg, data, model
        self.rank, self.world_size = world()
        if cfg.batch_size % self.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {self.world_size} processes")
        frames = data.latents.shape[1]
        if frames % cfg.frames_per_block:
            raise ValueError(f"clip windows have {frames} latent frames, not a multiple of the block "
                             f"size {cfg.frames_per_block}")
        if data.latents.shape[2] != model.cfg.in_dim:
            raise ValueError(f"clip latents have {data.latents.shape[2]} channels, the model expects {model.cfg.in_dim}")
        self.device = model.patch_embedding.weight.device
        self.schedule = FlowMatchSchedule(cfg.timestep_shift)
        self.timesteps = self.schedule.warp(cfg.denoising_steps)
        for module in model.modules():  # weights made under torch.inference_mode (as in ComfyUI) cannot
            for name, p in module._parameters.items():  # take part in autograd: re-create them as normal tensors
                if p is not None and p.is_inference():
                    module._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
        model.requires_grad_(False)
        self.params, self.optimizers = {}, {}
        lrs = {dmd.GENERATOR: cfg.generator_lr, dmd.FAKE: cfg.critic_lr, dmd.REAL: cfg.real_lr}
        adapters = [dmd.GENERATOR, dmd.FAKE] + ([dmd.REAL] if cfg.real_lora_weight else [])
        init = torch.Generator().manual_seed(cfg.seed)  # same adapter initialisation in every process
        for name in adapters:
            inject_lora(model, name, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, init)
            self.params[name] = adapter_parameters(model, name)
            for p in self.params[name].values():
                p.requires_grad_(True)
            self.optimizers[name] = torch.optim.AdamW(self.params[name].values(), lr=lrs[name], betas=cfg.betas,
                                                      weight_decay=cfg.weight_decay)
        if cfg.gradient_checkpointing:
            dmd.enable_gradient_checkpointing(model)
        self.step = 0
        self.ema: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []

    # ----------------------------------------------------------------------------------- sampling
    def _rank_slice(self, x: torch.Tensor) -> torch.Tensor:
        local = self.cfg.batch_size // self.world_size
        return x[self.rank * local:(self.rank + 1) * local].to(self.device)

    def _draw_rollout(self, rng: torch.Generator):
        """Prompts, noise and exit step of one rollout (global draw, local slice)."""
        cfg, (frames, channels, h, w) = self.cfg, self.data.latents.shape[1:]
        index = torch.randint(len(self.data.prompts), (cfg.batch_size,), generator=rng)
        num_blocks, steps = frames // cfg.frames_per_block, len(self.timesteps)
        exit_step = int(torch.randint(steps, (1,), generator=rng))
        initial = torch.randn(cfg.batch_size, frames, channels, h, w, generator=rng)
        renoise = torch.randn(num_blocks, max(steps - 1, 1), cfg.batch_size, cfg.frames_per_block, channels, h, w,
                              generator=rng)
        noise = NoiseSource(initial=self._rank_slice(initial), renoise=renoise[:, :, self._rank_slice_range()])
        prompt = self._rank_slice(stack_prompts([self.data.prompts[i] for i in index.tolist()]))
        return prompt, noise, exit_step, num_blocks

    def _rank_slice_range(self) -> slice:
        local = self.cfg.batch_size // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    def _draw_noising(self, rng: torch.Generator, shape):
        """DMD timesteps [B] and Gaussian noise [B, F, C, h, w] (global draw, local slice)."""
        cfg = self.cfg
        t = dmd.dmd_timesteps(cfg.batch_size, rng, cfg.timestep_shift, cfg.min_timestep, cfg.max_timestep)
        noise = torch.randn(cfg.batch_size, *shape, generator=rng)
        return self._rank_slice(t), self._rank_slice(noise)

    def _rollout(self, prompt, noise, exit_step, num_blocks) -> torch.Tensor:
        shape = tuple(self.data.latents.shape[2:])
        with active_adapter(self.model, dmd.GENERATOR):
            return dmd.rollout_with_exit(self.model, prompt, noise, num_blocks, shape, self.schedule, self.timesteps,
                                         exit_step, self.cfg.frames_per_block, prompt.shape[0])

    def _negative(self, batch: int) -> torch.Tensor:
        return self.data.negative.to(self.device)[None].expand(batch, -1, -1)

    # ----------------------------------------------------------------------------------- updates
    def _update(self, adapter: str, loss: torch.Tensor) -> float:
        optimizer = self.optimizers[adapter]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.params[adapter].values())
        if self.world_size > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world_size
            for p, chunk in zip(params, flat.split([p.numel() for p in params])):
                p.grad = chunk.view_as(p)
        torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        optimizer.step()
        value = loss.detach().double().reshape(1)
        if self.world_size > 1:
            dist.all_reduce(value)
            value /= self.world_size
        return float(value)

    def generator_step(self, rng: torch.Generator) -> float:
        cfg = self.cfg
        prompt, noise, exit_step, num_blocks = self._draw_rollout(rng)
        x = self._rollout(prompt, noise, exit_step, num_blocks)
        t, eps = self._draw_noising(rng, x.shape[1:])
        x0_real, x0_fake = dmd.critic_and_real_inputs(self.model, self.schedule, x, eps, t, prompt,
                                                      self._negative(x.shape[0]), cfg.guidance_scale,
                                                      cfg.real_lora_weight)
        loss = self._update(dmd.GENERATOR, dmd.dmd_generator_loss(x, x0_real, x0_fake))
        self._update_ema()
        return loss

    def critic_step(self, rng: torch.Generator) -> float:
        prompt, noise, exit_step, num_blocks = self._draw_rollout(rng)
        with torch.no_grad():
            x = self._rollout(prompt, noise, exit_step, num_blocks)
        t, eps = self._draw_noising(rng, x.shape[1:])
        with active_adapter(self.model, dmd.FAKE):  # backward inside: checkpointed blocks recompute with it
            return self._update(dmd.FAKE, dmd.flow_matching_loss(self.model, self.schedule, x, eps, t, prompt))

    def real_step(self, rng: torch.Generator) -> float:
        index = torch.randint(len(self.data.prompts), (self.cfg.batch_size,), generator=rng)
        clips = self._rank_slice(self.data.latents[index])
        prompt = self._rank_slice(stack_prompts([self.data.prompts[i] for i in index.tolist()]))
        t, eps = self._draw_noising(rng, clips.shape[1:])
        with active_adapter(self.model, dmd.REAL):
            return self._update(dmd.REAL, dmd.flow_matching_loss(self.model, self.schedule, clips.float(), eps, t,
                                                                 prompt))

    def train_step(self) -> dict:
        """One iteration; returns and records ``{"step", "generator", "critic", "real"}`` losses (None if skipped)."""
        rng = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        self.model.train()
        record = {"step": self.step, "generator": None, "critic": None, "real": None}
        if self.step % self.cfg.dfake_gen_update_ratio == 0:
            record["generator"] = self.generator_step(rng)
        record["critic"] = self.critic_step(rng)
        if self.cfg.real_lora_weight:
            record["real"] = self.real_step(rng)
        self.step += 1
        self.history.append(record)
        return record

    def _update_ema(self):
        if self.step < self.cfg.ema_start_step:
            return
        live = self.params[dmd.GENERATOR]
        if self.ema is None:
            self.ema = {name: p.detach().float().cpu().clone() for name, p in live.items()}
            return
        for name, p in live.items():
            self.ema[name].lerp_(p.detach().float().cpu(), 1 - self.cfg.ema_decay)

    # ----------------------------------------------------------------------------------- run / save
    def run(self, steps: int | None = None, checkpoint_dir=None, between_steps=None) -> list[dict]:
        """Train until ``steps`` (default cfg.steps) iterations are done.

        Saves a checkpoint into ``checkpoint_dir`` every ``save_every`` steps and at the end.
        ``between_steps(record)`` is called after each step (progress, interruption); if it raises,
        a checkpoint of the finished steps is saved before the exception propagates.
        """
        total = self.cfg.steps if steps is None else steps
        while self.step < total:
            record = self.train_step()
            if checkpoint_dir and (self.step % self.cfg.save_every == 0 or self.step == total):
                self.save_checkpoint(checkpoint_dir)
            if between_steps is not None:
                try:
                    between_steps(record)
                except BaseException:
                    if checkpoint_dir:
                        self.save_checkpoint(checkpoint_dir)
                    raise
        return self.history

    def close(self):
        """Give the model back as it came: adapters removed, checkpointing off, eval mode."""
        remove_lora(self.model)
        dmd.disable_gradient_checkpointing(self.model)
        self.model.eval()

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "config": json.dumps(dataclasses.asdict(self.cfg)),
            "adapters": {name: {k: p.detach().cpu().clone() for k, p in params.items()}
                         for name, params in self.params.items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "ema": self.ema,
            "history": self.history,
        }

    def load_state_dict(self, state: dict):
        saved = json.loads(state["config"])
        ours = json.loads(json.dumps(dataclasses.asdict(self.cfg)))
        changed = sorted(k for k in ours if k not in ("steps", "save_every") and saved.get(k) != ours[k])
        if changed:
            raise ValueError(f"the checkpoint was trained with different options {changed}; resume with the same "
                             "settings or start a new run in another folder")
        with torch.no_grad():
            for name, params in self.params.items():
                for key, p in params.items():
                    p.copy_(state["adapters"][name][key])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        self.step, self.ema, self.history = state["step"], state["ema"], list(state["history"])

    def save_checkpoint(self, folder):
        """Write ``folder/checkpoint.pt`` atomically (rank 0 only)."""
        if self.rank == 0:
            save_torch(self.state_dict(), os.path.join(folder, CHECKPOINT_NAME))

    def resume(self, folder) -> bool:
        """Load ``folder/checkpoint.pt`` if it exists; returns whether it did."""
        path = os.path.join(folder, CHECKPOINT_NAME)
        if not os.path.isfile(path):
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True

    def save_generator_lora(self, path, use_ema: bool = True):
        """Save the generator adapter (its EMA when there is one) as a LoRA file, atomically."""
        params = self.ema if use_ema and self.ema is not None else None
        metadata = {"format": "self-forcing-lora/1", "steps": str(self.step), "ema": str(params is not None),
                    "rank": str(self.cfg.lora_rank)}
        save_lora(self.model, dmd.GENERATOR, path, params=params, metadata=metadata)


def loss_curve_image(history: list[dict], width: int = 640, height: int = 360) -> torch.Tensor:
    """Plot the recorded losses, each curve scaled to its own range (labelled with min/max).

    Returns an RGB image [height, width, 3] float in [0, 1] (ComfyUI IMAGE layout without batch).
    """
    from PIL import Image, ImageDraw
    colours = {"generator": (220, 60, 60), "critic": (60, 120, 220), "real": (40, 160, 80)}
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    last_step = max([r["step"] for r in history] + [1])
    for row, (name, colour) in enumerate(colours.items()):
        points = [(r["step"], r[name]) for r in history if r.get(name) is not None and math.isfinite(r[name])]
        if not points:
            continue
        low, high = min(v for _, v in points), max(v for _, v in points)
        span = (high - low) or 1.0
        xy = [(10 + (width - 20) * s / last_step, height - 10 - (height - 40) * (v - low) / span) for s, v in points]
        draw.line(xy if len(xy) > 1 else xy * 2, fill=colour, width=2)
        draw.text((10, 4 + 10 * row), f"{name}: {low:.4g} .. {high:.4g} (last {points[-1][1]:.4g})", fill=colour)
    return torch.from_numpy(np.array(image)).float() / 255
