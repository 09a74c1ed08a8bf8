"""Self-Forcing Streaming Sampler, Self-Forcing Prompt Schedule and Streaming Decode."""
import logging

from dataclasses import replace

from comfy_api.latest import io
from comfy_execution.utils import get_executing_context

from ..selfforcing_core.families import FAMILIES, sampler_family
from ..selfforcing_core.generate import check_video_fits, generate_video
from ..selfforcing_core.kv_cache import CacheRules, check_window
from ..selfforcing_core.latents import comfy_to_generator
from ..selfforcing_core.runtime_options import scale_unmerged_loras
from ..selfforcing_core.rollout import PromptSwitch, blocks_covering, max_latent_frames
from ..selfforcing_core.schedule import DEFAULT_STEPS
from ..selfforcing_core.units import latent_frame_of, latent_frames_for, latent_size, pixel_size, video_frames_for
from .common import (CATEGORY, CacheRulesType, PromptSchedule, SelfForcingModel, StreamingDecoder, block_reporter,
                     check_inputs, prompt_tensor, to_image, to_latent)
from .live import LiveRun

# Preset label -> checkpoint family: the two Self Forcing step presets first (labels kept for saved
# workflows), then every other family by name (LongLive, Reward Forcing, Custom among them).
MODEL_FAMILY = "the model's family (loader)"  # the loader's family input (by default the file name's)
PRESETS = {
    MODEL_FAMILY: None,
    "4 steps, shift 5 (paper)": FAMILIES["self_forcing"],
    "4 steps, shift 8 (official demo)": replace(FAMILIES["self_forcing"], name="Self Forcing, shift 8 (official demo)",
                                                shift=8.0),
    **{family.name: family for key, family in FAMILIES.items() if key != "self_forcing"},
}
DEFAULT_PRESET = MODEL_FAMILY
LATER_BLOCK_STEPS = {"preset": None, "4": DEFAULT_STEPS, "2": (1000, 500), "1": (1000,)}
# Cache-rule choices of the Cache Rules node -> ``CacheRules`` fields ("preset": the family's).
ROPE_CHOICES = {"preset": {}, "absolute": {"rope": "absolute"}, "relative": {"rope": "relative"}}
SINK_PROTECTION_CHOICES = {"preset": {}, "on": {"protect_sink": True}, "off": {"protect_sink": False}}
PROMPT_SWITCH_CHOICES = {
    "preset": {},
    "replay cached frames": {"switch_recache": "replay"},
    "re-cache window, keep sink": {"switch_recache": "window", "global_sink": True},
    "re-cache window, re-write sink": {"switch_recache": "window", "global_sink": False},
    "no re-cache": {"switch_recache": "none"},
}
# A Prompt Schedule switch's own re-cache: the sampler's Cache Rules choice, or one for this switch alone.
SWITCH_RECACHE_CHOICES = {"cache rules (sampler)": {},
                          **{label: rule for label, rule in PROMPT_SWITCH_CHOICES.items() if label != "preset"}}
MAX_LENGTH = video_frames_for(max_latent_frames(CacheRules(), None))  # the last frame the RoPE table can place


def sampler_inputs():
    """Inputs shared by the streaming and keyframe samplers, in their saved-workflow order."""
    return [
        SelfForcingModel.Input("model", tooltip="From Load Self-Forcing Model."),
        io.Conditioning.Input("positive", tooltip="The prompt, encoded by CLIP Text Encode with the umT5 text "
                              "encoder (CLIPLoader type wan) or loaded by Load Prompt Embeddings. No negative "
                              "prompt: the model is distilled and runs without CFG."),
        io.Int.Input("width", default=832, min=16, max=4096, step=16,
                     tooltip="Video width in pixels, a multiple of 16 (the model was trained at 832x480)."),
        io.Int.Input("height", default=480, min=16, max=4096, step=16,
                     tooltip="Video height in pixels, a multiple of 16."),
        io.Int.Input("length", default=81, min=0, max=MAX_LENGTH,
                     tooltip="Video frames, 4n + 1 (81 = 5 s at 16 fps), or 0: until Stop is pressed in the node "
                             "(needs a KV window). Generated in blocks of 12 frames; longer than 81 needs a KV "
                             f"window. At most {MAX_LENGTH}: the model places frames by absolute position."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="All noise comes from this seed (same result on any device)."),
        io.Combo.Input("steps", options=list(PRESETS), default=DEFAULT_PRESET,
                       tooltip="Preset of the checkpoint family: block plan, step lists, sampler and KV cache "
                               "rules. The model's family: the one chosen in Load Self-Forcing Model (its "
                               "family input; by default the file name's, Self Forcing if the name names none); "
                               "a preset named here wins over it, and info says which ran. Self Forcing: 4 steps "
                               "with shift 5 as trained (the official demo used shift 8). Causal Forcing "
                               "frame-wise: 1 latent frame per block (lowest latency), its first block in 4 "
                               "steps, later ones in 4, 2 or 1. Rolling Forcing: a 5-block window "
                               "denoised jointly; a block appears when it leaves the window. LongLive: window 12 "
                               "with sink 3, block-relativistic RoPE (no length limit), one-call re-cache on prompt "
                               "switches. Reward Forcing: window 9 with sink 3. Custom: Self Forcing's sampling with "
                               "every cache setting yours. Pick the preset of the loaded checkpoint; the window, "
                               "sink and Cache Rules inputs change it."),
        io.Int.Input("kv_window_frames", default=0, min=0, max=1023,
                     tooltip="Rolling KV cache size in latent frames, sink included (0 = the preset's: LongLive "
                             "12 with sink 3, Reward Forcing 9 with sink 3, the others keep every frame). Set it "
                             "(e.g. 21) for videos longer than 81 frames; memory then stays flat for any length."),
        io.Int.Input("sink_frames", default=0, min=0, max=1022,
                     tooltip="Latent frames at the start that never leave the rolling cache (attention "
                             "sink); e.g. 3 keeps the first block as an anchor in long videos. Applies with "
                             "kv_window_frames set (with 0, the preset's window and sink apply)."),
        PromptSchedule.Input("prompt_schedule", optional=True,
                             tooltip="Later prompts with the frame at which each takes over (Self-Forcing "
                                     "Prompt Schedule); the cache is re-encoded so the scene continues."),
        StreamingDecoder.Input("decoder", optional=True,
                               tooltip="Decode each block while the next one is generated (Load Streaming "
                                       "Decoder); also gives live previews."),
        io.Int.Input("frames_per_block", default=0, min=0, max=21, optional=True,
                     tooltip="Override: latent frames per block (0 = the preset's; 1 = frame-wise, 3 = chunk-wise). "
                             "Only a checkpoint trained for it gives good video."),
        io.Combo.Input("later_block_steps", options=list(LATER_BLOCK_STEPS), default="preset", optional=True,
                       tooltip="Override: denoising steps of every block after the first (the first keeps the "
                               "preset's list). Causal Forcing++ frame-wise checkpoints take 2 or 1."),
    ]


def live_inputs():
    """Inputs of both samplers for live use, after all others (saved workflows keep values by position)."""
    return [
        io.Clip.Input("clip", optional=True,
                      tooltip="Text encoder (umT5, CLIPLoader type wan) for prompts typed into the node's player "
                              "while it runs; they take over at the next block. Without it, typed text names a "
                              "saved prompt embedding."),
        io.Boolean.Input("record", default=False, optional=True,
                         tooltip="Append every block to output/self_forcing/live_NNNNN_record.mp4 as it is made, "
                                 "so a crash or Cancel keeps what was generated."),
    ]


def cache_inputs():
    """The optional cache-rules bundle and unmerged-LoRA strength of both samplers, after the live inputs."""
    return [CacheRulesType.Input("cache_rules", optional=True,
                                 tooltip="RoPE mode, sink protection and what a prompt switch re-encodes, over the "
                                         "preset's (Self-Forcing Cache Rules)."),
            io.Float.Input("lora_strength", default=1.0, min=-4.0, max=4.0, step=0.05, optional=True,
                           tooltip="Multiplies the strength of the model's unmerged LoRA (Load Self-Forcing Model "
                                   "with lora_mode unmerged, e.g. LongLive's LoRA): changing it here needs no "
                                   "re-load of the model. No effect on merged LoRAs.")]


def sampler_outputs():
    return [io.Latent.Output(display_name="latent", tooltip="Wan 2.1 LATENT (raw VAE space): VAE Decode works on it."),
            io.Image.Output(display_name="images", tooltip="Decoded frames (one black frame without a decoder)."),
            io.String.Output(display_name="info", tooltip="Speed of this run and the estimated device memory "
                                                          "(weights, KV cache, activations).")]


def sampling_arguments(model, positive, width, height, length, seed, steps, kv_window_frames, sink_frames,
                       prompt_schedule=None, decoder=None, frames_per_block=0, later_block_steps="preset",
                       cache_rules=None):
    """Node inputs -> (keyword arguments of ``generate_video``, the lines of ``info`` saying what runs:
    the family and its settings, where the family came from, the prompt switches' rules); units are
    converted here, at the boundary. The steps preset (or the loader's family) comes first;
    kv_window_frames 0 keeps its window and sink; ``cache_rules`` (Cache Rules node) changes its
    ``CacheRules`` fields."""
    latent_hw = latent_size(width, height)
    window = {"kv_window_frames": kv_window_frames, "sink_frames": sink_frames} if kv_window_frames else {}
    preset, origin = sampler_family(PRESETS[steps], model.family, model.family_origin)
    family = preset.overridden(frames_per_block or None, LATER_BLOCK_STEPS[later_block_steps], **window,
                               **(cache_rules or {}))
    switches = [PromptSwitch(family.block_of(latent_frame_of(frame)), prompt_tensor(cond, "scheduled"),
                             SWITCH_RECACHE_CHOICES[recache]) for frame, cond, recache in prompt_schedule or []]
    settings = family.settings(prompt_switches=switches)
    ran = "\n".join(part for part in (family.describe(), origin, family.describe_switches(switches)) if part)
    return dict(model=model, prompt=prompt_tensor(positive), latent_frames=latent_frames_for(length) if length else 0,
                latent_hw=latent_hw, seed=seed, settings=settings, decoder=decoder), ran


def total_blocks(arguments: dict) -> int:
    """Blocks the run will generate (for the progress bar)."""
    settings = arguments["settings"]
    return blocks_covering(arguments["latent_frames"], settings.frames_per_block, settings.first_block_frames)


def check_memory(arguments: dict) -> None:
    """Refuse, before allocating, a generation (``sampling_arguments``) that cannot fit."""
    check_video_fits(arguments["model"], arguments["latent_frames"], arguments["latent_hw"],
                     settings=arguments["settings"], decoder=arguments["decoder"],
                     batch_size=arguments["prompt"].shape[0])


def check_sizes(width=None, height=None, length=None, kv_window_frames=None):
    """Raise a ValueError for pixel sizes the generator cannot make (None: linked from another
    node, checked when the node runs); length 0 (until Stop) needs a rolling window
    (``kv_window_frames``: the window that runs, the preset's included)."""
    if width is not None and height is not None:
        latent_size(width, height)
    if length == 0 and kv_window_frames == 0:
        raise ValueError("length 0 runs until Stop and needs a rolling KV window: set kv_window_frames (e.g. 21) "
                         "or pick a preset with a window (LongLive)")
    if length:
        latent_frames_for(length)


def check_sampler_inputs(node_cls, width=None, height=None, length=None, steps=None, kv_window_frames=None,
                         sink_frames=None, **combos) -> bool | str:
    """validate_inputs of both samplers: sizes, the window that runs (set, or the preset's) against
    its sink, and the combos. The loaded model's family is not known here: with that preset and no
    window set, the run checks its window (``generate_video``, before any compute)."""
    preset = PRESETS.get(steps)
    window, sink = kv_window_frames, sink_frames or 0
    if not kv_window_frames and preset is not None:
        window, sink = preset.kv_window_frames or 0, preset.sink_frames
    elif not kv_window_frames and steps == MODEL_FAMILY:
        window = None
    return check_inputs(node_cls, dict(width=width, height=height, length=length, steps=steps,
                                       kv_window_frames=kv_window_frames, sink_frames=sink_frames, **combos),
                        width=lambda: check_sizes(width, height, length, window),
                        kv_window_frames=lambda: check_window(window, sink))


def sampler_output(video, ran: str, run: LiveRun, lora: str = ""):
    """LATENT, IMAGE and info outputs; without a decoder the IMAGE is one black frame of the video's
    size; ``info`` opens with what ran (``ran`` of ``sampling_arguments``: family, block plan, step
    lists, cache, switches; the unmerged LoRA), then live switches and the stop; the prompt log's
    name is shown in the node."""
    frames = video.frames
    if frames is None:
        frames = video.latents.new_zeros(1, 1, 3, *pixel_size(video.latents.shape[-2:]))
    prompt_log = run.write_prompt_log(frames.shape[1] if video.frames is not None else 0)
    info = "\n".join(part for part in (ran, lora, video.report, run.summary(),
                                       prompt_log and f"prompt log: {prompt_log}") if part)
    logging.info("Self-Forcing sampler: %s", info)
    return io.NodeOutput(to_latent(video.latents), to_image(frames), info,
                         ui={"selfforcing_live": [{"info": info, "prompt_log": prompt_log}]})


def live_run(clip, record: bool, width: int, height: int, length: int) -> LiveRun:
    """The live side (steering, player frames, recording) of the sampler node running now."""
    context = get_executing_context()
    return LiveRun(context.prompt_id, context.node_id, clip, record, (width, height), length)


class SelfForcingStreamingSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingStreamingSampler",
            display_name="Self-Forcing Streaming Sampler",
            category=CATEGORY,
            description="Generates video block by block (3 latent frames, 4 steps each) with a KV cache; "
                        "each block is decoded and previewed while the next one is generated.",
            inputs=sampler_inputs() + live_inputs() + cache_inputs(),
            outputs=sampler_outputs(),
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None, length=None, steps=None, kv_window_frames=None,
                        sink_frames=None, later_block_steps=None):
        return check_sampler_inputs(cls, width, height, length, steps, kv_window_frames, sink_frames,
                                    later_block_steps=later_block_steps)

    @classmethod
    def execute(cls, clip=None, record=False, lora_strength=1.0, **inputs):
        arguments, ran = sampling_arguments(**inputs)
        check_memory(arguments)
        lora = scale_unmerged_loras(inputs["model"], lora_strength)
        with live_run(clip, record, inputs["width"], inputs["height"], inputs["length"]) as run:
            video = generate_video(**arguments, live=run.live_for(arguments["settings"]),
                                   callback=run.on_block(block_reporter(total_blocks(arguments))))
        return sampler_output(video, ran, run, lora)


class SelfForcingCacheRules(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingCacheRules",
            display_name="Self-Forcing Cache Rules",
            category=CATEGORY,
            description="How the samplers' KV cache places, protects and re-encodes frames, over the steps "
                        "preset's rules (LongLive's are block-relativistic RoPE, sink protection and a one-call "
                        "window re-cache that keeps the sink). The sampler's info states what ran.",
            inputs=[
                io.Combo.Input("rope", options=list(ROPE_CHOICES), default="preset",
                               tooltip="absolute: a frame sits at its frame index (Self Forcing; at most 4093 "
                                       "video frames). relative: block-relativistic RoPE (LongLive's infinite "
                                       "attention): every cached frame sits at its slot in the window, so a "
                                       "stream with a KV window never leaves the trained positions and has no "
                                       "length limit."),
                io.Combo.Input("sink_protection", options=list(SINK_PROTECTION_CHOICES), default="preset",
                               tooltip="on (LongLive): the denoising steps of a block never write the sink slots, "
                                       "so the sink keeps the first frames' keys. Matters when the sink is longer "
                                       "than a block or after a re-cache."),
                io.Combo.Input("prompt_switch", options=list(PROMPT_SWITCH_CHOICES), default="preset",
                               tooltip="What a prompt switch (schedule or typed live) re-encodes under the new "
                                       "prompt. replay cached frames (Self Forcing): every cached frame, block by "
                                       "block. re-cache window (LongLive): one call over the last window of "
                                       "frames, the sink keeping the first prompt (keep sink) or re-written "
                                       "(re-write sink). no re-cache: the cached frames keep the old prompt; "
                                       "cheapest, the scene changes more slowly."),
            ],
            outputs=[CacheRulesType.Output(display_name="cache_rules", tooltip="For the samplers' cache_rules input.")],
        )

    @classmethod
    def validate_inputs(cls, rope=None, sink_protection=None, prompt_switch=None):
        return check_inputs(cls, dict(rope=rope, sink_protection=sink_protection, prompt_switch=prompt_switch))

    @classmethod
    def execute(cls, rope, sink_protection, prompt_switch):
        return io.NodeOutput({**ROPE_CHOICES[rope], **SINK_PROTECTION_CHOICES[sink_protection],
                              **PROMPT_SWITCH_CHOICES[prompt_switch]})


class SelfForcingPromptSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingPromptSchedule",
            display_name="Self-Forcing Prompt Schedule",
            category=CATEGORY,
            description="Switches to another prompt from a chosen frame on. Chain several for a storyboard.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The prompt that takes over."),
                io.Int.Input("start_frame", default=40, min=1, max=100000,
                             tooltip="Video frame from which this prompt applies; rounded down to the "
                                     "start of its 12-frame block."),
                PromptSchedule.Input("prompt_schedule", optional=True, tooltip="Earlier switches."),
                io.Combo.Input("prompt_switch", options=list(SWITCH_RECACHE_CHOICES), default="cache rules (sampler)",
                               optional=True,
                               tooltip="What this switch re-encodes under its prompt: the sampler's Cache Rules "
                                       "choice, or one for this switch alone (e.g. no re-cache for a gentle "
                                       "change, re-cache window for a scene cut). See Self-Forcing Cache Rules."),
            ],
            outputs=[PromptSchedule.Output(display_name="prompt_schedule", tooltip="For the sampler's prompt_schedule input.")],
        )

    @classmethod
    def validate_inputs(cls, prompt_switch=None):
        return check_inputs(cls, dict(prompt_switch=prompt_switch))

    @classmethod
    def execute(cls, conditioning, start_frame, prompt_schedule=None, prompt_switch="cache rules (sampler)"):
        switch = (start_frame, conditioning, prompt_switch)
        return io.NodeOutput(sorted([*(prompt_schedule or []), switch], key=lambda s: s[0]))


class StreamingDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingStreamingDecode",
            display_name="Streaming Decode",
            category=CATEGORY,
            description="Decodes a Wan 2.1 LATENT to frames with a Self-Forcing streaming decoder, block by block.",
            inputs=[
                StreamingDecoder.Input("decoder", tooltip="From Load Streaming Decoder."),
                io.Latent.Input("latent", tooltip="A Wan 2.1 LATENT, e.g. from the Self-Forcing sampler."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="Decoded frames in [0, 1].")],
        )

    @classmethod
    def execute(cls, decoder, latent):
        return io.NodeOutput(to_image(decoder.decode_video(comfy_to_generator(latent["samples"]))))


NODES = [SelfForcingStreamingSampler, SelfForcingPromptSchedule, SelfForcingCacheRules, StreamingDecode]
