"""Regenerate the shared workflows (`*.json`, UI format) and their `.jpg` thumbnails.

    .venv/bin/python -m workflows.generate [NAME ...]     (from the repository root)

Starts the real ComfyUI host with this pack (support/comfy_server.py), builds every graph below in
its own frontend inside headless Chromium (nodes made by LiteGraph, widgets set by name, saved
the way the frontend's Export does), then opens each saved file through the frontend's
file-open path and screenshots it as the thumbnail. Run it after changing a node's inputs.
A workflow whose nodes the host does not list is skipped with a message.
"""
import sys
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parent

SELF_FORCING = "https://huggingface.co/gdhe17/Self-Forcing"
WAN_REPACKAGED = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged"
TAEHV = "https://github.com/madebyollin/taehv"
CAUSAL_FORCING = "https://huggingface.co/zhuhz22/Causal-Forcing"
LONGLIVE = "https://huggingface.co/Efficient-Large-Model/LongLive-1.3B"
DOWNLOADS = {
    "generator": f"models/diffusion_models/self_forcing_dmd.pt\n  <- {SELF_FORCING}  (file checkpoints/self_forcing_dmd.pt)",
    "text_encoder": f"models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors\n  <- {WAN_REPACKAGED}  "
                    "(split_files/text_encoders/)",
    "taehv": f"models/vae_approx/taew2_1.safetensors (or taew2_1.pth)\n  <- {TAEHV}",
    "causal_forcing_framewise": f"models/diffusion_models/causal_forcing_framewise.pt\n  <- {CAUSAL_FORCING}  "
                                "(file framewise/causal_forcing.pt, renamed)",
    "wan_vae": f"models/vae/wan_2.1_vae.safetensors\n  <- {WAN_REPACKAGED}  (split_files/vae/)",
    "longlive": f"models/diffusion_models/longlive_base.pt\n  <- {LONGLIVE}  (file models/longlive_base.pt)",
    "longlive_lora": f"models/loras/longlive_lora.pt\n  <- {LONGLIVE}  (file models/lora.pt, renamed)",
}
MUTED = 2  # LiteGraph node mode "never": left out of the prompt until unmuted (Ctrl+M)
WAN_NEGATIVE = ("garish colors, overexposed, static, blurry details, subtitles, style, artwork, painting, still "
                "picture, overall grey, worst quality, low quality, JPEG artifacts, ugly, mutilated, extra fingers, "
                "poorly drawn hands, poorly drawn face, deformed, disfigured, malformed limbs, fused fingers, "
                "motionless scene, cluttered background, three legs, many people in the background, walking backwards")
NOTE_COLOR = ("#432", "#653")
PROMPTS = [
    "A red fox trots through fresh snow in a quiet pine forest at dawn, soft golden light, "
    "breath visible in the cold air, the camera follows at the fox's height.",
    "The fox stops at the edge of a frozen lake and looks across the ice as the sun rises over the "
    "mountains, mist drifting over the shore.",
    "Snow starts to fall; the fox curls up under a fallen tree, the camera slowly pulls back to show "
    "the whole snowy valley.",
]

# A one-minute story in six scenes of 10 s (160 frames at 16 fps) each.
STORY = [
    *PROMPTS,
    "Night falls over the snowy valley; the fox wakes and walks out under a sky full of stars, the "
    "snow glowing blue in the moonlight.",
    "The northern lights ripple green and violet above the pines; the fox sits on a ridge and watches "
    "them, the camera circling slowly around it.",
    "Dawn again: the fox trots back through the pine forest along its own tracks, soft golden light, "
    "the camera following at its height.",
]
STORY_SCENE_FRAMES = 160


def note(text, downloads):
    """The host's Note node: what the workflow does and which files go where."""
    files = "\n".join(f"- {DOWNLOADS[name]}" for name in downloads)
    return {"key": "note", "type": "Note", "column": 0, "title": "Read me: models to download",
            "size": [460, 360], "color": NOTE_COLOR,
            "widgets": {"text": f"{text}\n\nModel files (into your ComfyUI folder):\n{files}\n\n"
                                "Refresh the browser (or press R) after adding files."}}


def text_encoder():
    return [{"key": "clip", "type": "CLIPLoader", "column": 1,
             "widgets": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"}}]


def prompt(key, text, column=2):
    return {"key": key, "type": "CLIPTextEncode", "column": column, "title": f"Prompt ({key})",
            "size": [420, 160], "widgets": {"text": text}}


def model_loader(model_name="self_forcing_dmd.pt", lora_mode="merge"):
    return {"key": "model", "type": "SelfForcingModelLoader", "column": 1,
            "widgets": {"model_name": model_name, "weight_dtype": "auto", "device": "default", "fp8": "off",
                        "lora_mode": lora_mode}}


def taehv_loader():
    return {"key": "decoder", "type": "SelfForcingDecoderLoader", "column": 1,
            "widgets": {"decoder_name": "vae_approx/taew2_1.safetensors", "dtype": "fp32"}}


def sampler(length=81, kv_window_frames=0, sink_frames=0, steps="4 steps, shift 5 (paper)", record=False):
    return {"key": "sampler", "type": "SelfForcingStreamingSampler", "column": 3,
            "widgets": {"width": 832, "height": 480, "length": length, "seed": 0, "control_after_generate": "fixed",
                        "steps": steps, "kv_window_frames": kv_window_frames, "sink_frames": sink_frames,
                        "record": record}}


def video_out(prefix):
    return [{"key": "video", "type": "CreateVideo", "column": 4, "widgets": {"fps": 16.0}},
            {"key": "save", "type": "SaveVideo", "column": 4,
             "widgets": {"filename_prefix": f"self_forcing/{prefix}", "format": "mp4", "codec": "h264"}}]


SAMPLER_LINKS = [["clip", "CLIP", "positive", "clip"], ["model", "model", "sampler", "model"],
                 ["positive", "CONDITIONING", "sampler", "positive"]]
VIDEO_LINKS = [["video", "VIDEO", "save", "video"]]
# sampler with a decoder, its frames saved as a video
DECODED_VIDEO_LINKS = [*SAMPLER_LINKS, ["decoder", "decoder", "sampler", "decoder"],
                       ["sampler", "images", "video", "images"], *VIDEO_LINKS]

SPECS = {
    "text_to_video_streaming": {
        "nodes": [note("Text to video, streaming: the umT5 prompt drives the causal generator block by "
                       "block (12 frames each); TAEHV decodes every block while the next one is generated "
                       "and shows it as a live preview.", ["generator", "text_encoder", "taehv"]),
                  *text_encoder(), model_loader(), taehv_loader(), prompt("positive", PROMPTS[0]), sampler(),
                  *video_out("text_to_video")],
        "links": DECODED_VIDEO_LINKS,
    },
    "framewise_low_latency": {
        "nodes": [note("Frame-wise, low latency (Causal Forcing): every block is ONE latent frame (4 video "
                       "frames), so the first frames appear after one block instead of three, and each is decoded "
                       "and previewed as soon as it exists. The first block takes 4 steps; the 2- and 1-step "
                       "presets (Causal Forcing++ checkpoints) run later blocks in fewer steps. Needs a frame-wise "
                       "checkpoint: the Self Forcing one is chunk-wise and gives poor video here.",
                       ["causal_forcing_framewise", "text_encoder", "taehv"]),
                  *text_encoder(), model_loader("causal_forcing_framewise.pt"), taehv_loader(),
                  prompt("positive", PROMPTS[0]), sampler(steps="Causal Forcing frame-wise, 4 steps"),
                  *video_out("framewise")],
        "links": DECODED_VIDEO_LINKS,
    },
    "live_stream": {
        "nodes": [note("Live stream: queue it and watch the video play in the sampler node as it is generated. "
                       "Type a new prompt into the box under the player and press Enter: it takes over at the "
                       "next block (12 frames) and the scene carries on. Length 0 runs until you press Stop, "
                       "which ends the stream after the current block and keeps everything: Save Video writes "
                       "every frame. record appends each block to output/self_forcing/live_NNNNN_record.mp4 as "
                       "it is made; live_NNNNN_prompt_log.json beside it lists every switch with its frame. "
                       "The host's Cancel discards the run (the recording keeps what was made).",
                       ["generator", "text_encoder", "taehv"]),
                  *text_encoder(), model_loader(), taehv_loader(), prompt("positive", PROMPTS[0]),
                  {**sampler(length=0, kv_window_frames=21, sink_frames=3, record=True), "size": [420, 760]},
                  *video_out("live")],
        "links": [*SAMPLER_LINKS, ["clip", "CLIP", "sampler", "clip"], ["decoder", "decoder", "sampler", "decoder"],
                  ["sampler", "images", "video", "images"], *VIDEO_LINKS],
    },
    "long_video_prompt_schedule": {
        "nodes": [note("Long video with a prompt schedule (storyboard / live stream): 241 frames (15 s). "
                       "A rolling KV cache of 21 latent frames with a 3-frame sink keeps memory flat for any "
                       "length. Each Prompt Schedule node switches to its prompt at its start frame; the "
                       "cache is re-encoded so the scene carries on. Chain more for longer stories.",
                       ["generator", "text_encoder", "taehv"]),
                  *text_encoder(), model_loader(), taehv_loader(), prompt("positive", PROMPTS[0]),
                  prompt("second", PROMPTS[1]), prompt("third", PROMPTS[2]),
                  {"key": "switch_1", "type": "SelfForcingPromptSchedule", "column": 3,
                   "title": "Second prompt from frame 81", "widgets": {"start_frame": 81}},
                  {"key": "switch_2", "type": "SelfForcingPromptSchedule", "column": 3,
                   "title": "Third prompt from frame 161", "widgets": {"start_frame": 161}},
                  {**sampler(length=241, kv_window_frames=21, sink_frames=3), "column": 4},
                  *[{**node, "column": 5} for node in video_out("long_video")]],
        "links": [*SAMPLER_LINKS, ["clip", "CLIP", "second", "clip"], ["clip", "CLIP", "third", "clip"],
                  ["second", "CONDITIONING", "switch_1", "conditioning"],
                  ["third", "CONDITIONING", "switch_2", "conditioning"],
                  ["switch_1", "prompt_schedule", "switch_2", "prompt_schedule"],
                  ["switch_2", "prompt_schedule", "sampler", "prompt_schedule"],
                  ["decoder", "decoder", "sampler", "decoder"],
                  ["sampler", "images", "video", "images"], *VIDEO_LINKS],
    },
    "start_end_keyframes": {
        "nodes": [note("Start and end keyframes (image to video to image): the video opens on the start image "
                       "and ends on the end image at its last frame. Put both images into ComfyUI/input (or "
                       "upload them here); any size, they are cropped to the video size. The streaming decoder "
                       "also encodes the images (TAEHV for speed; a second Load Streaming Decoder with the Wan "
                       "2.1 VAE on the encoder input encodes them at full quality). Add Self-Forcing Keyframe "
                       "nodes for images in between.", ["generator", "text_encoder", "taehv"]),
                  *text_encoder(), model_loader(), taehv_loader(), prompt("positive", PROMPTS[1]),
                  {"key": "start", "type": "LoadImage", "column": 2, "title": "Start image",
                   "size": [300, 330], "widgets": {"image": "start_frame.png"}},
                  {"key": "end", "type": "LoadImage", "column": 2, "title": "End image",
                   "size": [300, 330], "widgets": {"image": "end_frame.png"}},
                  {**sampler(), "key": "sampler", "type": "SelfForcingKeyframeSampler"},
                  *video_out("keyframes")],
        "links": [*SAMPLER_LINKS, ["decoder", "decoder", "sampler", "decoder"],
                  ["start", "IMAGE", "sampler", "start_image"], ["end", "IMAGE", "sampler", "end_image"],
                  ["sampler", "images", "video", "images"], *VIDEO_LINKS],
    },
    "finetune_then_sample": {
        "nodes": [note("Fine-tune on your clips, then sample with the trained LoRA.\n"
                       "1. Put clips (mp4/webm/gif, or folders of images) into ComfyUI/input/self_forcing_clips; a "
                       "caption walk.txt beside walk.mp4 describes that clip, else the prompt is used. Queue: the "
                       "trainer fine-tunes a LoRA (self-rollout DMD, 600 steps in the paper; cancel any time, a "
                       "resumable checkpoint is kept) and saves models/loras/my_self_forcing_lora_00001_.safetensors (later runs: the next counter).\n"
                       "2. Press R, select the two training nodes and mute them (Ctrl+M), unmute the sampling "
                       "nodes (Ctrl+M), queue again.", ["generator", "text_encoder", "wan_vae", "taehv"]),
                  *text_encoder(), model_loader(),
                  {"key": "encoder", "type": "SelfForcingDecoderLoader", "column": 1, "title": "Clip encoder (Wan VAE)",
                   "widgets": {"decoder_name": "vae/wan_2.1_vae.safetensors", "dtype": "fp32"}},
                  {**taehv_loader(), "mode": MUTED},
                  prompt("positive", PROMPTS[0]), prompt("negative", WAN_NEGATIVE),
                  {"key": "videos", "type": "SelfForcingTrainingClips", "column": 3, "title": "1. Training videos",
                   "widgets": {"folder": "self_forcing_clips", "width": 832, "height": 480, "length": 81}},
                  {"key": "trainer", "type": "SelfForcingTrainer", "column": 3, "title": "1. Train the LoRA",
                   "widgets": {"lora_name": "my_self_forcing_lora", "control_after_generate": "fixed"}},
                  {"key": "lora", "type": "SelfForcingLora", "column": 3, "title": "2. Trained LoRA", "mode": MUTED,
                   "widgets": {"lora_name": "my_self_forcing_lora_00001_.safetensors", "strength": 1.0}},
                  {"key": "tuned", "type": "SelfForcingModelLoader", "column": 3, "title": "2. Model with the LoRA",
                   "mode": MUTED, "widgets": {"model_name": "self_forcing_dmd.pt", "weight_dtype": "auto",
                                              "device": "default", "fp8": "off"}},
                  {**sampler(), "column": 4, "mode": MUTED},
                  *[{**node, "column": 5, "mode": MUTED} for node in video_out("finetuned")]],
        "links": [["clip", "CLIP", "positive", "clip"], ["clip", "CLIP", "negative", "clip"],
                  ["clip", "CLIP", "videos", "clip"], ["encoder", "decoder", "videos", "encoder"],
                  ["positive", "CONDITIONING", "videos", "prompt"], ["negative", "CONDITIONING", "videos", "negative"],
                  ["model", "model", "trainer", "model"], ["videos", "training_videos", "trainer", "training_videos"],
                  ["lora", "loras", "tuned", "loras"], ["tuned", "model", "sampler", "model"],
                  ["positive", "CONDITIONING", "sampler", "positive"], ["decoder", "decoder", "sampler", "decoder"],
                  ["sampler", "images", "video", "images"], *VIDEO_LINKS],
    },
    "longlive_one_minute_story": {
        "nodes": [note("LongLive: a one-minute story (961 frames, 60 s at 16 fps) in six scenes, a prompt "
                       "switch every 10 s. The LongLive preset runs its own cache rules: a 12-frame KV window "
                       "with a 3-frame sink and block-relativistic RoPE, so positions stay inside the window "
                       "and the stream has no length limit (set length 0 to run until Stop); at each switch "
                       "the window is re-cached under the new prompt in one call while the sink keeps the "
                       "first scene. The Cache Rules node shows these rules; change one to compare. "
                       "LongLive's LoRA stays unmerged (lora_mode unmerged): the sampler's lora_strength "
                       "changes it without re-loading the model.", ["longlive", "longlive_lora", "text_encoder",
                                                                     "taehv"]),
                  *text_encoder(),
                  {"key": "lora", "type": "SelfForcingLora", "column": 1, "title": "LongLive LoRA",
                   "widgets": {"lora_name": "longlive_lora.pt", "strength": 1.0}},
                  model_loader("longlive_base.pt", lora_mode="unmerged"), taehv_loader(),
                  *[prompt(f"scene_{index + 1}", text) for index, text in enumerate(STORY)],
                  *[{"key": f"switch_{index}", "type": "SelfForcingPromptSchedule", "column": 3,
                     "title": f"Scene {index + 1} from frame {1 + index * STORY_SCENE_FRAMES}",
                     "widgets": {"start_frame": 1 + index * STORY_SCENE_FRAMES}} for index in range(1, len(STORY))],
                  {"key": "rules", "type": "SelfForcingCacheRules", "column": 3, "title": "LongLive cache rules",
                   "widgets": {"rope": "relative", "sink_protection": "on",
                               "prompt_switch": "re-cache window, keep sink"}},
                  {**sampler(length=1 + 6 * STORY_SCENE_FRAMES, kv_window_frames=12, sink_frames=3, steps="LongLive"),
                   "column": 4},
                  *[{**node, "column": 5} for node in video_out("longlive_story")]],
        "links": [["clip", "CLIP", "scene_1", "clip"], ["model", "model", "sampler", "model"],
                  ["scene_1", "CONDITIONING", "sampler", "positive"], ["lora", "loras", "model", "loras"],
                  *[["clip", "CLIP", f"scene_{index + 1}", "clip"] for index in range(1, len(STORY))],
                  *[[f"scene_{index + 1}", "CONDITIONING", f"switch_{index}", "conditioning"]
                    for index in range(1, len(STORY))],
                  *[[f"switch_{index}", "prompt_schedule", f"switch_{index + 1}", "prompt_schedule"]
                    for index in range(1, len(STORY) - 1)],
                  [f"switch_{len(STORY) - 1}", "prompt_schedule", "sampler", "prompt_schedule"],
                  ["rules", "cache_rules", "sampler", "cache_rules"], ["decoder", "decoder", "sampler", "decoder"],
                  ["sampler", "images", "video", "images"], *VIDEO_LINKS],
    },
    "quality_decode_wan_vae": {
        "nodes": [note("Quality decode: the sampler's LATENT (raw Wan 2.1 space) goes through ComfyUI's own "
                       "Load VAE + VAE Decode with the full Wan 2.1 VAE. Slower than TAEHV, full quality. "
                       "For live previews while sampling, also connect a Load Streaming Decoder (TAEHV).",
                       ["generator", "text_encoder", "wan_vae"]),
                  *text_encoder(), model_loader(),
                  {"key": "vae", "type": "VAELoader", "column": 1, "widgets": {"vae_name": "wan_2.1_vae.safetensors"}},
                  prompt("positive", PROMPTS[0]), sampler(),
                  {"key": "vae_decode", "type": "VAEDecode", "column": 4},
                  *[{**node, "column": 5} for node in video_out("quality_decode")]],
        "links": [*SAMPLER_LINKS, ["sampler", "latent", "vae_decode", "samples"], ["vae", "VAE", "vae_decode", "vae"],
                  ["vae_decode", "IMAGE", "video", "images"], *VIDEO_LINKS],
    },
}


def main(names):
    from support.comfy_paths import comfyui_root
    from support.comfy_server import ComfyServer
    from support.frontend import Frontend, write_example_images

    root = comfyui_root()
    if root is None:
        sys.exit("no ComfyUI host: run `.venv/bin/python scripts/setup_host.py` or set COMFYUI_PATH")
    server = ComfyServer(root).start()
    try:
        with Frontend(server) as frontend:
            for name in names or SPECS:
                spec = SPECS[name]
                missing = sorted({node["type"] for node in spec["nodes"] if not frontend.registered(node["type"])})
                if missing:
                    print(f"skipped {name}: the host has no {', '.join(missing)}")
                    continue
                text = frontend.build(spec)
                (WORKFLOWS / f"{name}.json").write_text(text)
                write_example_images(server.base_dir / "input", text)
                report = frontend.open_workflow(text, f"{name}.json")
                if any(report[problem] for problem in ("unregistered", "errors", "dialogs", "alerts")):
                    sys.exit(f"{name} does not open cleanly: {report}")
                frontend.screenshot(WORKFLOWS / f"{name}.jpg")
                print(f"wrote {name}.json and {name}.jpg ({len(report['node_types'])} nodes)")
    finally:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
