"""Record the README's animated picture of the live player from the real frontend.

    .venv/bin/python scripts/record_live_player.py [--out workflows/live_player.webp]

Starts the host with a small random-weight generator (the picture shows the player, not a
model's quality), opens workflows/live_stream.json in headless Chromium, queues it (length 0:
until Stop), types a second prompt into the player mid-stream, presses Stop, and screenshots the
sampler node throughout; PIL assembles the screenshots into an animated WebP.
"""
import argparse
import io
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "scripts")]

NODE_RECT_JS = """(id) => {
  const node = app.graph.getNodeById(Number(id));
  const [x, y, w, h] = node.boundingRect;
  app.canvas.ds.fitToBounds([x, y, w, h], {zoom: 0.95});
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([x, y]), [x1, y1] = app.canvas.ds.convertOffsetToCanvas([x + w, y + h]);
  return {x: Math.max(0, x0), y: Math.max(0, y0), width: x1 - Math.max(0, x0), height: y1 - Math.max(0, y0)};
}"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "workflows" / "live_player.webp"))
    parser.add_argument("--blocks", type=int, default=4, help="blocks before the typed prompt, and after it")
    args = parser.parse_args()

    import torch
    from PIL import Image

    from comfy_paths import comfyui_root
    from comfy_server import ComfyServer
    from decoder_weights import taehv_state_dict
    from frontend import Frontend
    from selfforcing_core.model import CausalWanModel, WanConfig
    from selfforcing_core.prompt_embeddings import save_prompt_embeddings
    from test_live_browser import PLAYER_JS, QUEUE_JS, WORKFLOW
    from test_workflows_browser import swap_in_tiny_models

    server = ComfyServer(comfyui_root()).start()
    shots = []
    try:
        torch.manual_seed(0)
        config = WanConfig(dim=256, ffn_dim=512, num_layers=2, num_heads=2, text_dim=32)
        server.write_safetensors("diffusion_models", "sf_tiny.safetensors",
                                 {f"model.diffusion_model.{k}": v for k, v in CausalWanModel(config).state_dict().items()})
        server.write_safetensors("vae_approx", "taew2_1.safetensors", taehv_state_dict())
        for seed, name in ((1, "cat"), (2, "dog")):
            context = torch.randn(1, 12, config.text_dim, generator=torch.Generator().manual_seed(seed))
            save_prompt_embeddings(server.model_dir("prompt_embeddings") / f"{name}.safetensors",
                                   [(context, {"pooled_output": None})])
        with Frontend(server) as frontend:
            page = frontend.page
            frontend.open_workflow(WORKFLOW.read_text(), WORKFLOW.name)
            prompt = frontend.graph_to_prompt()
            swap_in_tiny_models(prompt)
            node = next(i for i, n in prompt.items() if n["class_type"] == "SelfForcingStreamingSampler")
            prompt[node]["inputs"].update(length=0, width=256, height=160)
            clip = page.evaluate(NODE_RECT_JS, node)

            def shoot():
                shots.append(Image.open(io.BytesIO(page.screenshot(type="png", clip=clip))).convert("RGB"))

            def play_until(condition):
                while not page.evaluate(f"(id) => {{ const p = app.graph.getNodeById(Number(id)).selfForcingLive; "
                                        f"return {condition}; }}", node):
                    shoot()
                    time.sleep(0.15)

            shoot()
            page.evaluate(QUEUE_JS, prompt)
            play_until(f"p.blocks >= {args.blocks}")
            box = page.locator(".selfforcing-live-prompt")
            box.click()
            for letter in "dog":
                box.press(letter)
                shoot()
            box.press("Enter")
            play_until(f"p.switches.length > 0 && p.blocks >= p.switches[0].block + {args.blocks}")
            page.locator(".selfforcing-live-stop").click()
            play_until("p.ended && p.queue.length === 0")
            shoot()
            print(page.evaluate(PLAYER_JS, node)["stats"])
    finally:
        server.stop()
    width = min(560, shots[0].width)
    frames = [shot.resize((width, round(shot.height * width / shot.width)), Image.LANCZOS) for shot in shots]
    frames[0].save(args.out, save_all=True, append_images=frames[1:], duration=150, loop=0, quality=70, method=4)
    print(f"wrote {args.out}: {len(frames)} frames")


if __name__ == "__main__":
    main()
