"""The host's own web frontend in headless Chromium (Debian's `chromium`, driven by playwright).

    with Frontend(server) as frontend:
        workflow = frontend.build(spec)              # nodes made with LiteGraph, saved as "Export" does
        report = frontend.open_workflow(workflow)    # the file-open / drop path (app.handleFile)
        prompt = frontend.graph_to_prompt()          # API prompt, as the Queue button makes it
        frontend.screenshot(path)

Never downloads a browser: it uses /usr/bin/chromium, with a fresh profile per session, and
every request that does not go to the local server is refused.
"""
import json
import shutil
import tempfile
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 900}
# User settings of a returning user: no template browser on start, the classic node look.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.VueNodes.Enabled": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 1, "Comfy.Graph.CanvasInfo": False, "Comfy.Graph.CanvasMenu": False}
READY = ("() => window.app && window.app.graph && window.app.canvas && window.LiteGraph"
         " && Object.keys(window.LiteGraph.registered_node_types).length > 0")

# Spec -> nodes in the live graph. A spec is {"nodes": [{"key", "type", "column", "title"?,
# "widgets": {name: value}}], "links": [[from_key, output_name, to_key, input_name]]}; nodes are
# stacked in columns from left to right. Returns the workflow file's text as Export writes it.
BUILD_JS = """async (spec) => {
  const graph = app.graph;
  graph.clear();
  const byKey = {}, MIN_WIDTH = 300;
  for (const item of spec.nodes) {
    const node = LiteGraph.createNode(item.type);
    if (!node) throw new Error(`node type ${item.type} is not registered`);
    graph.add(node);
    if (item.title) node.title = item.title;
    node.size = item.size || [Math.max(node.size[0], MIN_WIDTH), node.size[1]];
    for (const [name, value] of Object.entries(item.widgets || {})) {
      const widget = (node.widgets || []).find((w) => w.name === name);
      if (!widget) throw new Error(`${item.type} has no widget ${name}`);
      widget.value = value;
    }
    if (item.mode !== undefined) node.mode = item.mode;
    if (item.color) { node.color = item.color[0]; node.bgcolor = item.color[1]; }
    byKey[item.key] = node;
  }
  for (const [fromKey, outputName, toKey, inputName] of spec.links) {
    const source = byKey[fromKey], target = byKey[toKey];
    const output = source.outputs.findIndex((o) => o.name === outputName);
    const input = target.inputs.findIndex((i) => i.name === inputName);
    if (output < 0 || input < 0) throw new Error(`cannot link ${fromKey}.${outputName} -> ${toKey}.${inputName}`);
    source.connect(output, target, input);
  }
  const columnX = 40, gapX = 50, gapY = 70;
  let x = columnX;
  const columns = [...new Set(spec.nodes.map((item) => item.column))].sort((a, b) => a - b);
  for (const column of columns) {
    let y = 60, width = 0;
    for (const item of spec.nodes.filter((i) => i.column === column)) {
      const node = byKey[item.key];
      node.pos = [x, y];
      y += node.size[1] + gapY;
      width = Math.max(width, node.size[0]);
    }
    x += width + gapX;
  }
  graph.setDirtyCanvas(true, true);
  return JSON.stringify((await app.graphToPrompt()).workflow, null, 2);
}"""

# Model and input lists refreshed (the R key), the file-open / drag-and-drop path, then what a user would see: node types the host does not
# know, nodes flagged with errors, and the text of any dialog or alert that opened.
OPEN_JS = """async ([name, text]) => {
  await app.refreshComboInNodes();
  app.extensionManager.toast.removeAll();  // its "Node definitions updated" notice
  await new Promise((resolve) => setTimeout(resolve, 300));
  await app.handleFile(new File([text], name, {type: "application/json"}));
  await new Promise((resolve) => setTimeout(resolve, 500));
  const nodes = app.graph._nodes;
  return {
    node_types: nodes.map((n) => n.type),
    unregistered: nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type),
    errors: nodes.filter((n) => n.has_errors).map((n) => n.type),
    dialogs: [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText),
    alerts: [...document.querySelectorAll(".p-toast-message")].map((t) => t.innerText),
  };
}"""

# Zoom to the whole graph; returns the graph's rectangle on screen (a screenshot clip).
FIT_VIEW_JS = """() => {
  app.canvas.deselectAll();
  const [left, top, right, bottom] = app.graph._nodes.reduce((b, n) => {
    const [x, y, w, h] = n.boundingRect;
    return [Math.min(b[0], x), Math.min(b[1], y), Math.max(b[2], x + w), Math.max(b[3], y + h)];
  }, [Infinity, Infinity, -Infinity, -Infinity]);
  const ds = app.canvas.ds;
  ds.fitToBounds([left, top, right - left, bottom - top], {zoom: 0.97});
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  const [x0, y0] = ds.convertOffsetToCanvas([left, top]), [x1, y1] = ds.convertOffsetToCanvas([right, bottom]);
  const pad = 16, width = window.innerWidth, height = window.innerHeight;
  const x = Math.max(0, x0 - pad), y = Math.max(0, y0 - pad);
  return {x, y, width: Math.min(width, x1 + pad) - x, height: Math.min(height, y1 + pad) - y};
}"""


def write_example_images(input_dir, workflow_text: str, size=(96, 64)):
    """Put a gradient picture under the name of every Load Image node's file into the host's input
    folder (the shared workflows name images the user supplies)."""
    import numpy as np
    from PIL import Image

    names = [node["widgets_values"][0] for node in json.loads(workflow_text)["nodes"] if node["type"] == "LoadImage"]
    for index, name in enumerate(names):
        ramp = np.linspace(0, 1, size[0])[None, :, None] * np.array([1.0, 0.6, 0.3])[::(-1) ** index]
        pixels = (255 * np.broadcast_to(ramp, (size[1], size[0], 3))).astype("uint8")
        Image.fromarray(pixels).save(Path(input_dir) / name)
    return names


def chromium_or_skip():
    """Skip (with a loud reason) when Chromium or playwright is missing; scripts/setup.sh installs both."""
    import pytest

    if not CHROMIUM.is_file():
        pytest.skip(f"NO BROWSER: {CHROMIUM} is missing; run scripts/setup.sh as root "
                    "(apt-get install chromium) to enable the browser tests")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("NO BROWSER DRIVER: the playwright package is missing; pip install -r requirements-dev.txt")


class Frontend:
    """One Chromium page on the frontend that `server` (a tests.comfy_host.ComfyServer) serves."""

    def __init__(self, server, timeout_ms=120_000):
        self.server = server
        self.timeout_ms = timeout_ms
        self.console_errors = []

    def __enter__(self):
        from playwright.sync_api import sync_playwright

        self.server.post("/settings", SETTINGS)
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.playwright = sync_playwright().start()
        try:
            self.context = self.playwright.chromium.launch_persistent_context(
                self.profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                viewport=VIEWPORT, timeout=self.timeout_ms)
            origin = f"http://127.0.0.1:{self.server.port}"
            self.context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(origin)
                               else route.abort())
            self.context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            self.page = self.context.new_page()
            self.page.set_default_timeout(self.timeout_ms)
            self.page.on("console", lambda message: message.type == "error" and self.console_errors.append(message.text))
            self.page.goto(origin + "/")
            self.page.wait_for_function(READY)
            self.page.evaluate("() => document.fonts.ready")
            self.page.evaluate("() => app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        if getattr(self, "context", None) is not None:
            self.context.close()
        self.playwright.stop()
        shutil.rmtree(self.profile, ignore_errors=True)

    def registered(self, node_type: str) -> bool:
        return self.page.evaluate("(t) => !!LiteGraph.registered_node_types[t]", node_type)

    def build(self, spec: dict) -> str:
        """Create the spec's nodes and links in the live graph; the text of the workflow file
        that the frontend's Export writes for it."""
        return self.page.evaluate(BUILD_JS, spec)

    def open_workflow(self, text: str, name: str = "workflow.json") -> dict:
        """Open a UI-format workflow file's text through the frontend's file handler; what it then shows."""
        self.page.keyboard.press("Escape")  # close a dialog left open by the previous file
        return self.page.evaluate(OPEN_JS, [name, text])

    def graph_to_prompt(self) -> dict:
        """The API-format prompt of the open graph, made by app.graphToPrompt() like Queue does."""
        return self.page.evaluate("async () => (await app.graphToPrompt()).output")

    def screenshot(self, path, quality=85):
        """JPEG of the whole graph, zoomed to fit the window."""
        clip = self.page.evaluate(FIT_VIEW_JS)
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(path), type="jpeg", quality=quality, clip=clip)
