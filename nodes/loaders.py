"""Load Self-Forcing Model, Self-Forcing Speed & Memory Options, Self-Forcing LoRA, Load Streaming Decoder."""
import dataclasses
import logging

import folder_paths
import torch
from comfy_api.latest import io

from ..selfforcing_core.families import AUTO_FAMILY, FAMILY_CHOICES, loader_family
from ..selfforcing_core.fp8 import FP8_FORMATS, GRANULARITIES
from ..selfforcing_core.codec_loading import load_codec
from ..selfforcing_core.runtime_options import RuntimeOptions, load_with_options
from .common import (CATEGORY, LoraList, RuntimeOptionsType, SelfForcingModel, StreamingDecoder, check_inputs,
                     compute_device, file_options, resolve_file)

DECODER_FOLDERS = ("vae_approx", "vae")
LORA_MODES = {"merge": False, "unmerged": True}  # choice -> load_with_options(unmerged=...)
DECODER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class LoadSelfForcingModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingModelLoader",
            display_name="Load Self-Forcing Model",
            category=CATEGORY,
            description="Loads a causal Wan2.1 generator (Self Forcing checkpoint or compatible) for the "
                        "Self-Forcing samplers. Reports the configuration it read off the weights.",
            inputs=[
                io.Combo.Input("model_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="A file in models/diffusion_models: an official training .pt such as "
                                       "self_forcing_dmd.pt (the entry its family prefers: generator_ema, "
                                       "generator for Causal Forcing chunk-wise and LongLive; see family) or a "
                                       ".safetensors in the Self Forcing, Wan2.1, ComfyUI or diffusers key layout."),
                io.Combo.Input("weight_dtype", options=["auto", "bf16", "fp16", "fp32"], default="auto",
                               tooltip="Precision of the weights. auto: bf16 on GPUs and on CPUs with bf16 "
                                       "matrix instructions (AMX, AVX512-BF16; 1.3-1.5x faster than fp32 there, half the memory), "
                                       "else the file's precision. info says what was chosen."),
                io.Combo.Input("device", options=["default", "cpu"], default="default",
                               tooltip="default: the device ComfyUI runs models on; cpu: keep it on the CPU."),
                io.Combo.Input("fp8", options=["off", *FP8_FORMATS], default="off", optional=True,
                               tooltip="Store the transformer's linear weights in 8 bits (about half the memory "
                                       "of bf16). e4m3fn is the more accurate format. Uses FP8 matrix "
                                       "multiplication on GPUs that have it (RTX 40xx, H100), else dequantises "
                                       "layer by layer. FP8 checkpoints load either way."),
                LoraList.Input("loras", optional=True,
                               tooltip="LoRAs to merge into the weights, from Self-Forcing LoRA nodes."),
                RuntimeOptionsType.Input("options", optional=True,
                                         tooltip="torch.compile, block offload and FP8 scale granularity "
                                                 "(Self-Forcing Speed & Memory Options)."),
                io.Combo.Input("lora_mode", options=list(LORA_MODES), default="merge", optional=True,
                               tooltip="merge: LoRAs are added into the weights (fastest per block; a strength "
                                       "change re-loads the model). unmerged: one LoRA (e.g. LongLive's "
                                       "lora.pt) is kept beside the weights; the sampler's lora_strength then "
                                       "changes it without a re-load, at 1.25-1.4x the time per block for a "
                                       "rank-256 LoRA (README)."),
                io.Combo.Input("family", options=list(FAMILY_CHOICES), default=AUTO_FAMILY, optional=True,
                               tooltip="The checkpoint family this model runs as: the samplers' steps preset "
                                       "'the model's family (loader)' applies it (block plan, steps, KV window "
                                       "and sink, cache rules; the samplers' inputs still change them), and it "
                                       "picks the entry of a training .pt. auto: the family the file name names "
                                       "(longlive_base.pt: LongLive), Self Forcing if it names none; the weights "
                                       "cannot tell families apart. info says which family and from where."),
            ],
            outputs=[SelfForcingModel.Output(display_name="model", tooltip="The causal generator, for the Self-Forcing samplers."),
                     io.String.Output(display_name="info", tooltip="What was loaded: configuration, dtype and "
                                                                   "what each option did.")],
        )

    @classmethod
    def validate_inputs(cls, model_name=None, weight_dtype=None, device=None, fp8=None, lora_mode=None, family=None):
        return check_inputs(cls, dict(weight_dtype=weight_dtype, device=device, fp8=fp8, lora_mode=lora_mode,
                                      family=family),
                            model_name=lambda: model_name is None or resolve_file(f"diffusion_models/{model_name}",
                                                                                     ("diffusion_models",)))

    @classmethod
    def execute(cls, model_name, weight_dtype, device, fp8="off", loras=None, options=None, lora_mode="merge",
                family=AUTO_FAMILY):
        target = torch.device("cpu") if device == "cpu" else compute_device()
        options = dataclasses.replace(options or RuntimeOptions(), fp8=fp8)
        family, origin = loader_family(family, model_name)  # its checkpoint_keys pick the entry of a training .pt
        model, report = load_with_options(folder_paths.get_full_path_or_raise("diffusion_models", model_name),
                                          options, dtype=weight_dtype, device=target, loras=loras or [],
                                          unmerged=LORA_MODES[lora_mode], checkpoint_keys=family.checkpoint_keys)
        cfg, model.family, model.family_origin = model.cfg, family, origin
        entry = (f", entry {model.checkpoint_entry!r} (the family prefers {' over '.join(family.checkpoint_keys)})"
                 if model.checkpoint_entry else "")
        info = "\n".join([f"{model_name}: layout {model.layout}{entry}, {cfg.num_layers} layers, dim {cfg.dim}, "
                          f"{cfg.num_heads} heads, ffn {cfg.ffn_dim}, text {cfg.text_dim}, "
                          f"{model.dtype}, on {target}", f"family: {origin}, for the samplers' steps "
                          f"'the model's family (loader)'", family.describe(), *report])
        logging.info("Self-Forcing model loaded:\n%s", info)
        return io.NodeOutput(model, info)


class SelfForcingRuntimeOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingRuntimeOptions",
            display_name="Self-Forcing Speed & Memory Options",
            category=CATEGORY,
            description="Optional speed and memory settings for Load Self-Forcing Model.",
            inputs=[
                io.Boolean.Input("torch_compile", default=False,
                                 tooltip="torch.compile the transformer blocks: faster after a slow first block (on "
                                         "GPUs; about 1.3x on the CPU, README); falls back to normal execution "
                                         "with a warning if unavailable."),
                io.Int.Input("offload_blocks", default=0, min=0, max=64,
                             tooltip="Transformer blocks (of 30) kept in CPU memory and copied to the GPU for "
                                     "each call: less VRAM, slower."),
                io.Combo.Input("fp8_granularity", options=list(GRANULARITIES), default="tensor",
                               tooltip="FP8 scales: one per weight (tensor) or one per output row (channel, "
                                       "slightly more accurate)."),
            ],
            outputs=[RuntimeOptionsType.Output(display_name="options", tooltip="For Load Self-Forcing Model.")],
        )

    @classmethod
    def validate_inputs(cls, fp8_granularity=None):
        return check_inputs(cls, dict(fp8_granularity=fp8_granularity))

    @classmethod
    def execute(cls, torch_compile, offload_blocks, fp8_granularity):
        return io.NodeOutput(RuntimeOptions(compile=torch_compile, offload_blocks=offload_blocks,
                                            fp8_granularity=fp8_granularity))


class SelfForcingLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingLora",
            display_name="Self-Forcing LoRA",
            category=CATEGORY,
            description="Adds a LoRA (e.g. one trained by the Self-Forcing Trainer) to the list the model "
                        "loader merges. Chain several to stack them.",
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file in models/loras."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="Multiplier of the LoRA's effect (0 = off)."),
                LoraList.Input("loras", optional=True, tooltip="LoRAs chosen before this one."),
            ],
            outputs=[LoraList.Output(display_name="loras", tooltip="The LoRA list, for Load Self-Forcing Model.")],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None):
        return check_inputs(cls, {},
                            lora_name=lambda: lora_name is None or resolve_file(f"loras/{lora_name}", ("loras",)))

    @classmethod
    def execute(cls, lora_name, strength, loras=None):
        return io.NodeOutput([*(loras or []), (folder_paths.get_full_path_or_raise("loras", lora_name), strength)])


class LoadStreamingDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingDecoderLoader",
            display_name="Load Streaming Decoder",
            category=CATEGORY,
            description="Loads a decoder that turns each generated block into frames while the next block "
                        "is generated: TAEHV (fast, taew2_1 / lighttaew2_1 in models/vae_approx) or the "
                        "Wan 2.1 VAE (full quality, models/vae).",
            inputs=[
                io.Combo.Input("decoder_name", options=file_options(*DECODER_FOLDERS),
                               tooltip="vae_approx/taew2_1.safetensors for live previews at high speed, "
                                       "vae/wan_2.1_vae.safetensors for final quality."),
                io.Combo.Input("dtype", options=list(DECODER_DTYPES), default="fp32",
                               tooltip="Decoder precision; fp16/bf16 halve its memory on GPUs."),
            ],
            outputs=[StreamingDecoder.Output(display_name="decoder", tooltip="For the samplers and Streaming Decode.")],
        )

    @classmethod
    def validate_inputs(cls, decoder_name=None, dtype=None):
        return check_inputs(cls, dict(dtype=dtype),
                            decoder_name=lambda: decoder_name is None or resolve_file(decoder_name, DECODER_FOLDERS))

    @classmethod
    def execute(cls, decoder_name, dtype):
        codec = load_codec(resolve_file(decoder_name, DECODER_FOLDERS), dtype=DECODER_DTYPES[dtype], device=compute_device())
        return io.NodeOutput(codec)


NODES = [LoadSelfForcingModel, SelfForcingRuntimeOptions, SelfForcingLora, LoadStreamingDecoder]
