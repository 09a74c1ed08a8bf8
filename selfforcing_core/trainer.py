"""The self-rollout DMD training loop on a user's clips: optimisers, schedule, EMA, checkpoints.

One ``Trainer`` owns a frozen base generator with three LoRA adapters (see ``dmd.py``), or, with
``finetune="full"``, trains the generator's own weights while the critic and teacher adapters
sit on a frozen copy of the base (they must keep the original weights).

Memory of full fine-tuning per parameter, for weights of w bytes: generator w, frozen copy w,
gradient w, two AdamW moments 2w (gradients and moments take the weight dtype, so load fp32
weights for it; CUDA still computes in bf16 autocast), plus a float32 EMA (4 bytes) on the CPU:
5w + 4 bytes, 34 GB for the 1.42e9 parameters of the 1.3B model in fp32, before activations.
Under FSDP the generator, its gradients and moments are split across processes; the frozen copy
and the EMA are whole in every process.

Each ``train_step``: a generator update every ``dfake_gen_update_ratio`` steps (first, as the
official trainer does), then one critic update, then (if ``real_lora_weight`` > 0) one update of
the teacher's clip adapter. All randomness of step s comes from a generator seeded with
``(seed, s)``, and every random tensor is drawn for the *global* batch and then sliced to this
rank, so a run is reproducible across resumes and equal for any number of processes.

Data parallel (``world_size`` > 1, torch.distributed initialised): each rank takes its slice of
the global batch and adapter gradients are averaged with ``all_reduce`` before clipping (what
DDP does; DDP's one-module-one-forward wrapper does not fit adapter switching on one model).
A fully fine-tuned generator is sharded with FSDP (``fully_shard`` per transformer block and at
the root; it reduce-scatters the averaged gradients itself); checkpoints and saved weights are
gathered whole, so a run resumes on any number of processes.
"""
import copy
import dataclasses
import json
import os
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import fully_shard

from . import dmd
from .atomic import save_safetensors, save_torch
from .clips import ClipBatchSource
from .distributed import average_gradients, copy_whole, gathered, mean_over_processes, shard_like, world
from .fp8 import FP8Linear
from .lora import DEFAULT_TARGETS, active_adapter, adapter_parameters, inject_lora, remove_lora, save_lora
from .model import CausalWanModel
from .rollout import NoiseSource
from .schedule import DEFAULT_STEPS, FlowMatchSchedule

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters; defaults follow the paper's DMD config where it applies to LoRA training."""

    steps: int = 600
    finetune: str = "lora"  # "lora": generator adapter on the frozen base; "full": the generator's own weights
    batch_size: int = 1  # global batch (split across processes)
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: alpha = rank (scale 1)
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    generator_lr: float = 1e-4  # LoRA learning rates (the paper's full fine-tune: generator 2e-6)
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


def stack_prompts(prompts: list) -> torch.Tensor:
    """Zero-pad prompt embeddings [L_i, D] to a common length (the model pads with zeros too). -> [B, L, D]."""
    length = max(p.shape[0] for p in prompts)
    return torch.stack([torch.nn.functional.pad(p, (0, 0, 0, length - p.shape[0])) for p in prompts])


class Trainer:
    """Self-rollout DMD fine-tuning of ``model`` through LoRA adapters (``finetune="full"``: its own weights)."""

    def __init__(self, model: CausalWanModel, data: ClipBatchSource, cfg: TrainConfig):
        self.cfg, self.data = cfg, data
        self.rank, self.world_size = world()
        if cfg.batch_size % self.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {self.world_size} processes")
        frames = data.latents.shape[1]
        if frames % cfg.frames_per_block:
            raise ValueError(f"clip windows have {frames} latent frames, not a multiple of the block "
                             f"size {cfg.frames_per_block}")
        if data.latents.shape[2] != model.cfg.in_dim:
            raise ValueError(f"clip latents have {data.latents.shape[2]} channels, the model expects {model.cfg.in_dim}")
        if cfg.finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {cfg.finetune!r}")
        if cfg.finetune == "full" and any(isinstance(m, FP8Linear) for m in model.modules()):
            raise ValueError("full fine-tuning trains every weight, but this model keeps its block linears in FP8; "
                             "load it with fp8 off (fp32 weights for training), or train a LoRA")
        if cfg.finetune == "full" and model.dtype != torch.float32:
            raise ValueError(f"full fine-tuning keeps the trained weights as the optimizer's fp32 master copy, but "
                             f"this model's weights are {model.dtype}; load it with dtype fp32 (CUDA still computes "
                             "in bf16 under autocast), or train a LoRA (its adapters are fp32 on any base)")
        self.device = model.device
        self.schedule = FlowMatchSchedule(cfg.timestep_shift)
        self.timesteps = self.schedule.warp(cfg.denoising_steps)
        for module in model.modules():  # weights made under torch.inference_mode (as in ComfyUI) cannot
            for name, p in module._parameters.items():  # take part in autograd: re-create them as normal tensors
                if p is not None and p.is_inference():
                    module._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
        model.requires_grad_(False)
        full = cfg.finetune == "full"
        self.generator = model  # the rollout network; critic and teacher run on self.scores
        self.scores = copy.deepcopy(model) if full else model
        adapters = ([] if full else [dmd.GENERATOR]) + [dmd.FAKE] + ([dmd.REAL] if cfg.real_lora_weight else [])
        init = torch.Generator().manual_seed(cfg.seed)  # same adapter initialisation in every process
        for name in adapters:
            inject_lora(self._network(name), name, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, init)
        if cfg.gradient_checkpointing:
            for network in self.networks:
                dmd.enable_gradient_checkpointing(network)
        self.sharded = full and self.world_size > 1
        if self.sharded:
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        self.params = {dmd.GENERATOR: dict(model.named_parameters())} if full else {}
        self.params.update({name: adapter_parameters(self._network(name), name) for name in adapters})
        lrs = {dmd.GENERATOR: cfg.generator_lr, dmd.FAKE: cfg.critic_lr, dmd.REAL: cfg.real_lr}
        self.optimizers = {}
        for name, params in self.params.items():
            for p in params.values():
                p.requires_grad_(True)
            self.optimizers[name] = torch.optim.AdamW(params.values(), lr=lrs[name], betas=cfg.betas,
                                                      weight_decay=cfg.weight_decay)
        self.step = 0
        self.ema: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []

    @property
    def networks(self) -> list[CausalWanModel]:
        """The distinct models: the generator, and the frozen copy the scores run on with ``finetune="full"``."""
        return [self.generator] if self.scores is self.generator else [self.generator, self.scores]

    def _network(self, adapter: str) -> CausalWanModel:
        return self.generator if adapter == dmd.GENERATOR else self.scores

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
        """The generator's rollout (the caller activates the generator adapter)."""
        shape = tuple(self.data.latents.shape[2:])
        return dmd.rollout_with_exit(self.generator, prompt, noise, num_blocks, shape, self.schedule, self.timesteps,
                                     exit_step, self.cfg.frames_per_block, prompt.shape[0])

    def _negative(self, batch: int) -> torch.Tensor:
        return self.data.negative.to(self.device)[None].expand(batch, -1, -1)

    # ----------------------------------------------------------------------------------- updates
    def _update(self, adapter: str, loss: torch.Tensor) -> float:
        optimizer = self.optimizers[adapter]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.params[adapter].values())
        if self.world_size > 1 and not (self.sharded and adapter == dmd.GENERATOR):  # FSDP averages its own
            average_gradients(params, self.world_size)
        torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        optimizer.step()
        return mean_over_processes(loss, self.world_size)

    def generator_step(self, rng: torch.Generator) -> float:
        cfg = self.cfg
        prompt, noise, exit_step, num_blocks = self._draw_rollout(rng)
        with active_adapter(self.generator, dmd.GENERATOR):  # backward inside: checkpointed exit steps recompute
            x = self._rollout(prompt, noise, exit_step, num_blocks)
            t, eps = self._draw_noising(rng, x.shape[1:])
            x0_real, x0_fake = dmd.critic_and_real_inputs(self.scores, self.schedule, x, eps, t, prompt,
                                                          self._negative(x.shape[0]), cfg.guidance_scale,
                                                          cfg.real_lora_weight)
            loss = self._update(dmd.GENERATOR, dmd.dmd_generator_loss(x, x0_real, x0_fake))
        self._update_ema()
        return loss

    def critic_step(self, rng: torch.Generator) -> float:
        prompt, noise, exit_step, num_blocks = self._draw_rollout(rng)
        with torch.no_grad(), active_adapter(self.generator, dmd.GENERATOR):
            x = self._rollout(prompt, noise, exit_step, num_blocks)
        t, eps = self._draw_noising(rng, x.shape[1:])
        with active_adapter(self.scores, dmd.FAKE):  # backward inside: checkpointed blocks recompute with it
            return self._update(dmd.FAKE, dmd.flow_matching_loss(self.scores, self.schedule, x, eps, t, prompt))

    def real_step(self, rng: torch.Generator) -> float:
        index = torch.randint(len(self.data.prompts), (self.cfg.batch_size,), generator=rng)
        clips = self._rank_slice(self.data.latents[index])
        prompt = self._rank_slice(stack_prompts([self.data.prompts[i] for i in index.tolist()]))
        t, eps = self._draw_noising(rng, clips.shape[1:])
        with active_adapter(self.scores, dmd.REAL):
            return self._update(dmd.REAL, dmd.flow_matching_loss(self.scores, self.schedule, clips.float(), eps, t,
                                                                 prompt))

    def train_step(self) -> dict:
        """One iteration; returns and records ``{"step", "generator", "critic", "real"}`` losses (None if skipped)."""
        rng = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        for network in self.networks:
            network.train()
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
        live = {name: gathered(p.detach()).float().cpu() for name, p in self.params[dmd.GENERATOR].items()}
        if self.ema is None:
            self.ema = {name: p.clone() for name, p in live.items()}
            return
        for name, p in live.items():
            self.ema[name].lerp_(p, 1 - self.cfg.ema_decay)

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
        """Give the model back: adapters removed, checkpointing off, eval mode, no gradients (its
        weights are the trained ones with ``finetune="full"``; unchanged with LoRA)."""
        for network in self.networks:
            remove_lora(network)
            dmd.disable_gradient_checkpointing(network)
            network.eval().requires_grad_(False)

    def state_dict(self) -> dict:
        """Everything a resume needs, gathered whole (a collective under FSDP: every process calls it)."""
        optimizers = {}
        for name, opt in self.optimizers.items():
            state = opt.state_dict()
            state["state"] = {i: {k: gathered(v).cpu() for k, v in s.items()} for i, s in state["state"].items()}
            optimizers[name] = state
        return {
            "step": self.step,
            "config": json.dumps(dataclasses.asdict(self.cfg)),
            "parameters": {name: {k: gathered(p.detach()).cpu().clone() for k, p in params.items()}
                           for name, params in self.params.items()},
            "optimizers": optimizers,
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
                    copy_whole(p, state["parameters"][name][key])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            for p in self.params[name].values():  # moments of FSDP parameters back to this process's shard
                opt.state[p] = {key: shard_like(p, value) for key, value in opt.state[p].items()}
        self.step, self.ema, self.history = state["step"], state["ema"], list(state["history"])

    def save_checkpoint(self, folder):
        """Write ``folder/checkpoint.pt`` atomically (gathered by every process, written by rank 0)."""
        state = self.state_dict()
        if self.rank == 0:
            save_torch(state, os.path.join(folder, CHECKPOINT_NAME))

    def resume(self, folder) -> bool:
        """Load ``folder/checkpoint.pt`` if it exists; returns whether it did."""
        path = os.path.join(folder, CHECKPOINT_NAME)
        if not os.path.isfile(path):
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True

    def save_generator(self, path, use_ema: bool = True):
        """Save the generator (its EMA when there is one), atomically, by rank 0 (every process calls it):
        the adapter as a LoRA file, or with ``finetune="full"`` all weights in the Wan layout
        (``checkpoint.load_generator`` reads it)."""
        params = self.params[dmd.GENERATOR]
        ema = self.ema if use_ema else None
        metadata = {"format": f"self-forcing-{self.cfg.finetune}/1", "steps": str(self.step),
                    "ema": str(ema is not None)}
        if self.cfg.finetune == "lora":
            if self.rank == 0:
                save_lora(self.generator, dmd.GENERATOR, path, params=ema,
                          metadata=dict(metadata, rank=str(self.cfg.lora_rank)))
            return
        weights = {name: (ema[name] if ema else gathered(p.detach())).to(p.dtype).cpu().contiguous()
                   for name, p in params.items()}
        if self.rank == 0:
            save_safetensors(weights, path, metadata)

