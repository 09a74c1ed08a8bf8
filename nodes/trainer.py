"""Self-Forcing Training Videos and Self-Forcing Trainer: fine-tune the generator on your own videos.

The training data travels as ``training_videos`` (type SELFFORCING_TRAINING_VIDEOS), a name apart
from the text encoder input ``clip``; workflows saved with the former names (``clips``,
SELFFORCING_TRAINING_CLIPS) are renamed as they open (web/renamed_inputs.js).

Clips are read only from the ``selfforcing_clips`` folders: ComfyUI's input folder, then any
folder the server's owner adds under that name in ``extra_model_paths.yaml``. Their encoded
cache goes to the host's system-user folder ``user/__self_forcing_clip_cache/``, which no HTTP
endpoint serves (unlike input / output / temp). A run's resumable ``checkpoint.pt`` lives in
``output/self_forcing_training/<lora_name>/``; the finished LoRA goes to the host's ``loras``
folder as ``<lora_name>_00001_.safetensors`` (the counter of ComfyUI's save nodes: an existing
file is never replaced).
"""
import hashlib
import logging
import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..selfforcing_core.clips import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, prepare_clips
from ..selfforcing_core.loss_curves import draw_loss_curves, format_losses, loss_curve_image
from ..selfforcing_core.memory import check_encoding_fits, check_training_fits
from ..selfforcing_core.trainer import CHECKPOINT_NAME, Trainer, TrainConfig
from ..selfforcing_core.units import latent_size, pixel_size, video_frames_for, whole_block_latent_frames
from .common import CATEGORY, SelfForcingModel, StreamingDecoder, check_inputs, prompt_tensor, register_folder, save_path

TrainingVideos = io.Custom("SELFFORCING_TRAINING_VIDEOS")
CLIPS_FOLDER = "selfforcing_clips"
TRAINING_FOLDER = "self_forcing_training"
CLIP_CACHE_FOLDER = "self_forcing_clip_cache"
PREVIEW_EVERY = 5  # steps between loss-curve previews on the progress bar
log = logging.getLogger(__name__)
register_folder(CLIPS_FOLDER, folder_paths.get_input_directory(), VIDEO_EXTENSIONS | IMAGE_EXTENSIONS | {".txt"})


def clip_folder(name: str) -> str:
    """Full path of the clip folder ``name``, relative to a ``selfforcing_clips`` folder (the input
    folder first). Only folders the host lists under those roots count, so the answer never says
    whether a path elsewhere exists."""
    wanted = os.path.normpath(name.strip() or ".")
    for root in folder_paths.get_folder_paths(CLIPS_FOLDER):
        files, _ = folder_paths.recursive_search(root, excluded_dir_names=[".git"])
        folders = {"."}
        for file in folder_paths.filter_files_extensions(files, folder_paths.folder_names_and_paths[CLIPS_FOLDER][1]):
            parent = os.path.dirname(file)
            while parent:
                folders.add(os.path.normpath(parent))
                parent = os.path.dirname(parent)
        if wanted in folders:
            return os.path.join(root, wanted)
    extra = len(folder_paths.get_folder_paths(CLIPS_FOLDER)) - 1
    raise ValueError(f"folder '{name}' is not a clip folder inside ComfyUI's input folder"
                     f"{f' or the {extra} selfforcing_clips folder(s) of extra_model_paths.yaml' if extra else ''}; "
                     "put the clips into input/<name>/ and give that name (other folders: the server's owner "
                     "adds them as selfforcing_clips in extra_model_paths.yaml)")


def run_folder(lora_name: str) -> str:
    """The run folder of ``lora_name`` inside output/self_forcing_training (never outside)."""
    root = os.path.join(folder_paths.get_output_directory(), TRAINING_FOLDER)
    folder, name, _ = save_path(lora_name, root, "lora_name")
    return os.path.join(folder, name)


def lora_target(lora_name: str) -> tuple[str, str]:
    """(full path, name relative to models/loras) of the next free ``<lora_name>_NNNNN_.safetensors``."""
    root = folder_paths.get_folder_paths("loras")[0]
    folder, name, counter = save_path(lora_name, root, "lora_name")
    path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")
    return path, os.path.relpath(path, root)


def check_run(lora_name: str, resume: bool) -> None:
    """Raise a ValueError unless a run of ``lora_name`` may start: its paths stay inside ComfyUI's
    folders, and a fresh start (resume off) would not destroy another run's checkpoint."""
    lora_target(lora_name)
    checkpoint = os.path.join(run_folder(lora_name), CHECKPOINT_NAME)
    if not resume and os.path.isfile(checkpoint):
        raise ValueError(f"lora_name '{lora_name}' already has a run with a checkpoint; turn resume on to continue "
                         "it, or choose another lora_name for a new run")


class SelfForcingTrainingClips(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingTrainingClips",
            display_name="Self-Forcing Training Videos",
            category=CATEGORY,
            description="Reads a folder of clips (mp4/webm/gif or folders of images), cuts them into windows, "
                        "encodes each window once and caches the latents for the Self-Forcing Trainer.",
            inputs=[
                io.String.Input("folder", tooltip="Folder with the clips, inside ComfyUI's input folder (e.g. "
                                "'my_clips' for input/my_clips) or a selfforcing_clips folder the server's owner "
                                "configured. A caption walk.txt beside walk.mp4 is used for that clip."),
                StreamingDecoder.Input("encoder", tooltip="A Wan 2.1 VAE or TAEHV with encoder, from Load "
                                       "Streaming Decoder; it turns the clips into latents."),
                io.Conditioning.Input("prompt", tooltip="Prompt for clips without a caption file."),
                io.Conditioning.Input("negative", tooltip="Negative prompt of the teacher's guidance "
                                      "(the standard Wan negative prompt is the usual choice)."),
                io.Int.Input("width", default=832, min=16, max=2048, step=16, tooltip="Training width (multiple of 16)."),
                io.Int.Input("height", default=480, min=16, max=2048, step=16, tooltip="Training height (multiple of 16)."),
                io.Int.Input("length", default=81, min=9, max=1017, step=12,
                             tooltip="Video frames per training window; 1 + 4*(latent frames), latent frames a "
                                     "multiple of 3 (9, 21, 33, ... 81 = the paper's 21 latent frames)."),
                io.Clip.Input("clip", optional=True, tooltip="Text encoder (umT5) for the caption files; without "
                              "it every clip uses the prompt."),
            ],
            outputs=[TrainingVideos.Output(display_name="training_videos",
                                           tooltip="Encoded video windows for the trainer.")],
        )

    @classmethod
    def validate_inputs(cls, folder=None, width=None, height=None, length=None):
        return check_inputs(cls, dict(width=width, height=height, length=length),
                            folder=lambda: folder is None or clip_folder(folder),
                            width=lambda: None in (width, height) or latent_size(width, height),
                            length=lambda: length is None or whole_block_latent_frames(length))

    @classmethod
    def execute(cls, folder, encoder, prompt, negative, width, height, length, clip=None):
        latent_frames = whole_block_latent_frames(length)
        path = clip_folder(folder)
        check_encoding_fits(video_frames_for(latent_frames), height, width, next(encoder.parameters()).device)
        cache = os.path.join(folder_paths.get_system_user_directory(CLIP_CACHE_FOLDER),
                             hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16])

        def embed_caption(text):
            return prompt_tensor(clip.encode_from_tokens_scheduled(clip.tokenize(text)), "caption")[0]
        data = prepare_clips(path, cache, encoder.encode_video, width=width, height=height,
                             latent_frames=latent_frames, negative=prompt_tensor(negative, "negative")[0],
                             prompt=prompt_tensor(prompt)[0], embed_caption=embed_caption if clip else None,
                             encoder_name=type(encoder).__name__)
        return io.NodeOutput(data, ui={"text": [f"{len(data.names)} windows of {latent_frames} latent frames"]})


class SelfForcingTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingTrainer",
            display_name="Self-Forcing Trainer",
            category=CATEGORY,
            description="Self-rollout DMD fine-tuning with LoRA: the generator rolls out clips block by block "
                        "as at inference and is pulled toward a teacher that has learned your clips. Saves a "
                        "LoRA for Self-Forcing LoRA; cancel to stop with a resumable checkpoint.",
            is_output_node=True,
            inputs=[
                SelfForcingModel.Input("model", tooltip="The generator from Load Self-Forcing Model (left unchanged)."),
                TrainingVideos.Input("training_videos", tooltip="From Self-Forcing Training Videos."),
                io.String.Input("lora_name", default="my_self_forcing_lora",
                                tooltip="Name of the run (its folder in output/self_forcing_training) and of the "
                                        "LoRA saved in models/loras as <name>_00001_.safetensors (the counter "
                                        "grows; existing files are never replaced). Subfolders allowed."),
                io.Int.Input("steps", default=600, min=1, max=100000, tooltip="Training iterations (the paper: 600)."),
                io.Float.Input("generator_lr", default=1e-4, min=0.0, max=1.0, step=1e-6,
                               tooltip="Learning rate of the generator LoRA."),
                io.Float.Input("critic_lr", default=1e-4, min=0.0, max=1.0, step=1e-6,
                               tooltip="Learning rate of the critic (fake score) LoRA."),
                io.Int.Input("lora_rank", default=16, min=1, max=256, tooltip="Rank of every LoRA."),
                io.Float.Input("real_lora_weight", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="Strength of the teacher's (real score's) LoRA that learns your videos; "
                                       "0 = plain distillation (no pull toward them)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Clips per iteration."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="Seed of all training randomness."),
                io.Int.Input("save_every", default=50, min=1, max=100000, tooltip="Checkpoint interval in steps."),
                io.Boolean.Input("resume", default=True, tooltip="Continue from the run folder's checkpoint if "
                                 "there is one (same settings needed). Off: a new run, refused while the run "
                                 "folder holds a checkpoint (pick another lora_name)."),
                io.Float.Input("real_lr", default=1e-4, min=0.0, max=1.0, step=1e-6, optional=True,
                               tooltip="Learning rate of the teacher's (real score's) LoRA."),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The saved LoRA's name in models/loras."),
                     io.Image.Output(display_name="loss_curves", tooltip="Generator, critic and clip losses.")],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None, resume=None):
        return check_inputs(cls, {}, lora_name=lambda: lora_name is None or check_run(lora_name, resume is not False))

    @classmethod
    def execute(cls, model, training_videos, lora_name, steps, generator_lr, critic_lr, lora_rank, real_lora_weight,
                batch_size, seed, save_every, resume, real_lr=1e-4):
        with torch.inference_mode(False), torch.enable_grad():  # the host runs nodes under inference mode
            return cls.train(model, training_videos, lora_name, steps, generator_lr, critic_lr, real_lr, lora_rank,
                             real_lora_weight, batch_size, seed, save_every, resume)

    @classmethod
    def train(cls, model, training_videos, lora_name, steps, generator_lr, critic_lr, real_lr, lora_rank, real_lora_weight,
              batch_size, seed, save_every, resume):
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lora_rank=lora_rank, generator_lr=generator_lr,
                          critic_lr=critic_lr, real_lr=real_lr, real_lora_weight=real_lora_weight, seed=seed,
                          save_every=save_every)
        check_run(lora_name, resume)
        _, frames, _, *latent_hw = training_videos.latents.shape
        check_training_fits(model, *pixel_size(latent_hw), frames, batch_size)
        run_dir = run_folder(lora_name)
        trainer = Trainer(model, training_videos, cfg)
        try:
            if resume and trainer.resume(run_dir):
                log.info("Self-Forcing Trainer: resumed %s at step %d", run_dir, trainer.step)
            progress = comfy.utils.ProgressBar(steps)

            def between_steps(record):
                done = record["step"] + 1
                show = done % PREVIEW_EVERY == 0 or done == steps  # the loss curves as the progress preview
                progress.update_absolute(done, steps, ("JPEG", draw_loss_curves(trainer.history), 512) if show else None)
                log.info("Self-Forcing Trainer step %d/%d: %s", done, steps, format_losses([record]))
                comfy.model_management.throw_exception_if_processing_interrupted()
            trainer.run(checkpoint_dir=run_dir, between_steps=between_steps)
            lora_path, saved_name = lora_target(lora_name)
            trainer.save_generator(lora_path)
            curves = loss_curve_image(trainer.history)[None]
        finally:
            trainer.close()
        summary = f"saved loras/{saved_name} after {trainer.step} steps; last losses: {format_losses(trainer.history)}"
        return io.NodeOutput(saved_name, curves, ui={"text": [summary]})


NODES = [SelfForcingTrainingClips, SelfForcingTrainer]
