"""Record the README's animated picture of the live player from the real frontend.

    .venv/bin/python -m scripts.record_live_player [--out workflows/live_player.webp]

Starts the host with a small random-weight generator (the picture shows the player, not a
model's quality), opens workflows/live_stream.json in headless Chromium, queues it (length 0:
until Stop), types a second prompt into the player mid-stream, presses Stop, and screenshots the
sampler node throughout; PIL assembles the screenshots into an animated WebP.
"""
import argparse
import io
import time

from support.comfy_paths import REPO_ROOT

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
    parser.add_argument("--out", default=str(REPO_ROOT / "workflows" / "live_player.webp"))
    parser.add_argument("--blocks", type=int, default=4, help="blocks before the typed prompt, and after it")
    args = parser.parse_args()

    from PIL import Image

    from support.comfy_host import write_tiny_models
    from support.comfy_paths import comfyui_root
    from support.comfy_server import ComfyServer
    from support.frontend import Frontend
    from support.live_player import LIVE_WORKFLOW, PLAYER_JS, QUEUE_JS
    from support.tiny_workflows import swap_in_tiny_models

    server = ComfyServer(comfyui_root()).start()
    shots = []
    try:
        write_tiny_models(server)
        with Frontend(server) as frontend:
            page = frontend.page
            frontend.open_workflow(LIVE_WORKFLOW.read_text(), LIVE_WORKFLOW.name)
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
