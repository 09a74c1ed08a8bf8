"""Self-Forcing Keyframe Sampler (start image, end image, keyframes between) and Self-Forcing Keyframe."""
from comfy_api.latest import io

from ..selfforcing_core.keyframes import FIT_MODES, METHODS, generate_keyframed_video
from ..selfforcing_core.runtime_options import scale_unmerged_loras
from .common import CATEGORY, StreamingDecoder, block_reporter
from .sampler import (cache_inputs, check_memory, check_sampler_inputs, live_inputs, live_run, sampler_inputs,
                      sampler_output, sampler_outputs, sampling_arguments, total_blocks)

KeyframeList = io.Custom("SELFFORCING_KEYFRAMES")


def first_image(image):
    """ComfyUI IMAGE [N, H, W, 3] -> its first image as [1, 3, H, W]."""
    return image[:1].permute(0, 3, 1, 2).float()


class SelfForcingKeyframe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingKeyframe",
            display_name="Self-Forcing Keyframe",
            category=CATEGORY,
            description="An image the video should pass through at a chosen frame. Chain several.",
            inputs=[
                io.Image.Input("image", tooltip="The keyframe (first image of the batch); fitted to the video size."),
                io.Int.Input("frame", default=40, min=0, max=100000,
                             tooltip="Video frame where the image should appear (0-based; 4 video frames share "
                                     "one latent frame)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="1 = that frame is the keyframe; lower values only pull towards it; 0 = off."),
                KeyframeList.Input("keyframes", optional=True, tooltip="Earlier keyframes."),
            ],
            outputs=[KeyframeList.Output(display_name="keyframes", tooltip="For the keyframe sampler's keyframes input.")],
        )

    @classmethod
    def execute(cls, image, frame, strength, keyframes=None):
        return io.NodeOutput(sorted([*(keyframes or []), (frame, image, strength)], key=lambda k: k[0]))


class SelfForcingKeyframeSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingKeyframeSampler",
            display_name="Self-Forcing Keyframe Sampler",
            category=CATEGORY,
            description="The streaming sampler steered by images: a start image (image-to-video), an end image "
                        "and keyframes between, each at a chosen frame.",
            inputs=sampler_inputs() + [
                io.Image.Input("start_image", optional=True,
                               tooltip="First frame. Encoded as a still first block (the clip opens on 9 still "
                                       "frames), which the rest of the video continues from."),
                io.Image.Input("end_image", optional=True, tooltip="Last frame of the video."),
                io.Float.Input("end_strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="1 = the last frame is the end image; lower values only pull towards it."),
                KeyframeList.Input("keyframes", optional=True, tooltip="Images between (Self-Forcing Keyframe)."),
                StreamingDecoder.Input("encoder", optional=True,
                                       tooltip="Encodes the images (Load Streaming Decoder with encoder weights: "
                                               "Wan VAE, or TAEHV for speed). Default: the decoder."),
                io.Combo.Input("method", options=list(METHODS), default="guidance",
                               tooltip="guidance: blend each step's prediction towards the keyframe, ramping up "
                                       "over the frames before it. anchor: also show the keyframe to earlier "
                                       "blocks through the KV cache at its future position."),
                io.Int.Input("ramp_frames", default=5, min=0, max=30,
                             tooltip="Latent frames (4 video frames each) before a keyframe that are pulled "
                                     "towards it with rising strength (guidance). 5 = its block and the one before."),
                io.Combo.Input("image_fit", options=list(FIT_MODES), default="crop",
                               tooltip="Images of another size: crop (scale and centre-crop, keeps the aspect), "
                                       "resize (stretch) or reject (error)."),
            ] + live_inputs() + cache_inputs(),
            outputs=sampler_outputs(),
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None, length=None, steps=None, kv_window_frames=None,
                        sink_frames=None, method=None, image_fit=None, later_block_steps=None):
        if length == 0:
            return "length 0 (until Stop) is for the streaming sampler; the keyframe sampler needs 4n + 1 frames"
        return check_sampler_inputs(cls, width, height, length, steps, kv_window_frames, sink_frames,
                                    method=method, image_fit=image_fit, later_block_steps=later_block_steps)

    @classmethod
    def execute(cls, start_image=None, end_image=None, end_strength=1.0, keyframes=None, encoder=None,
                method="guidance", ramp_frames=5, image_fit="crop", clip=None, record=False, lora_strength=1.0,
                **inputs):
        arguments, ran = sampling_arguments(**inputs)
        check_memory(arguments)
        lora = scale_unmerged_loras(inputs["model"], lora_strength)
        images = [(frame, first_image(image), strength) for frame, image, strength in keyframes or []]
        if end_image is not None:
            images.append((inputs["length"] - 1, first_image(end_image), end_strength))
        encoder = encoder or inputs.get("decoder")
        with live_run(clip, record, inputs["width"], inputs["height"], inputs["length"]) as run:
            video = generate_keyframed_video(
                **arguments, encode=encoder.encode_video if encoder is not None else None,
                start_image=None if start_image is None else first_image(start_image), keyframe_images=images,
                fit=image_fit, method=method, ramp_frames=ramp_frames, live=run.live_for(arguments["settings"]),
                callback=run.on_block(block_reporter(total_blocks(arguments))))
        return sampler_output(video, ran, run, lora)


NODES = [SelfForcingKeyframeSampler, SelfForcingKeyframe]
