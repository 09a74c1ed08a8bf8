// Live player of the Self-Forcing samplers: plays the stream in the node while it is generated,
// takes a new prompt (Enter) and Stop. Frames arrive over the host's websocket as the
// "selfforcing.live" event (nodes/live.py): {kind: "start" | "block" | "end", prompt_id, node, ...}.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SAMPLERS = ["SelfForcingStreamingSampler", "SelfForcingKeyframeSampler"];
const EVENT = "selfforcing.live";
const BUFFER_FRAMES = 4; // frames queued before playback starts or resumes after running dry
const PLAYER_HEIGHT = 300;

function makePlayer(node) {
  const root = document.createElement("div");
  root.className = "selfforcing-live";
  root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;font:12px sans-serif;color:#ccc";
  const canvas = document.createElement("canvas");
  canvas.width = 832;
  canvas.height = 480;
  canvas.style.cssText = "flex:1;min-height:0;width:100%;object-fit:contain;background:#111;border-radius:4px";
  const stats = document.createElement("div");
  stats.className = "selfforcing-live-stats";
  const row = document.createElement("div");
  row.style.cssText = "display:flex;gap:4px";
  const input = document.createElement("input");
  input.type = "text";
  input.placeholder = "New prompt while it runs (Enter)";
  input.className = "selfforcing-live-prompt";
  input.style.cssText = "flex:1;min-width:0;background:#222;color:#ddd;border:1px solid #555;border-radius:4px;padding:3px";
  const stop = document.createElement("button");
  stop.textContent = "Stop";
  stop.className = "selfforcing-live-stop";
  stop.title = "End the stream after the current block and keep everything generated";
  stop.style.cssText = "background:#533;color:#eee;border:1px solid #755;border-radius:4px;padding:3px 10px;cursor:pointer";
  const message = document.createElement("div");
  message.className = "selfforcing-live-message";
  message.style.cssText = "min-height:1.2em;color:#aaa";
  row.append(input, stop);
  root.append(canvas, stats, row, message);

  const player = {
    node, canvas, stats, message, input,
    promptId: null, fps: 16, queue: [], received: 0, shown: 0, blocks: 0, ended: false, playing: false,
    startedAt: null, firstFrameAt: null, lastShownAt: null, switches: [], latencies: [], arrivals: [], timer: null,

    reset(promptId, fps) {
      clearInterval(this.timer);
      Object.assign(this, { promptId, fps: fps || 16, queue: [], received: 0, shown: 0, blocks: 0, ended: false,
                            playing: false, startedAt: performance.now(), firstFrameAt: null, switches: [], latencies: [],
                            arrivals: [] });
      const context = canvas.getContext("2d");
      context.fillStyle = "#111";
      context.fillRect(0, 0, canvas.width, canvas.height);
      this.timer = setInterval(() => this.tick(), 1000 / this.fps);
      this.render();
    },

    addBlock(data) {
      this.blocks = data.block + 1;
      if (data.switched) this.switches.push({ block: data.block, frame: data.first_frame, text: data.switched });
      data.frames.forEach((jpeg, index) => {
        const image = new Image();
        image.src = `data:image/jpeg;base64,${jpeg}`;
        this.queue.push({ image, blockEnd: index === 0 ? data.block_end : null });
      });
      this.received += data.frames.length;
      this.arrivals.push({ block: data.block, received: this.received, shown: this.shown, at: performance.now() });
      this.render();
    },

    tick() {
      if (!this.playing && (this.queue.length >= BUFFER_FRAMES || (this.ended && this.queue.length))) this.playing = true;
      if (!this.playing) return;
      const frame = this.queue[0];
      if (!frame) {
        this.playing = false; // ran dry: buffer again
        if (this.ended) clearInterval(this.timer);
        return;
      }
      if (!frame.image.complete) return;
      this.queue.shift();
      if (canvas.width !== frame.image.naturalWidth || canvas.height !== frame.image.naturalHeight) {
        canvas.width = frame.image.naturalWidth;
        canvas.height = frame.image.naturalHeight;
      }
      canvas.getContext("2d").drawImage(frame.image, 0, 0);
      const now = performance.now();
      if (this.firstFrameAt === null) this.firstFrameAt = now;
      if (frame.blockEnd !== null) this.latencies.push(Date.now() / 1000 - frame.blockEnd);
      this.lastShownAt = now;
      this.shown += 1;
      this.render();
    },

    get achievedFps() {
      return this.shown > 1 ? (this.shown - 1) / ((this.lastShownAt - this.firstFrameAt) / 1000) : 0;
    },

    render() {
      const first = this.firstFrameAt === null ? "-" : `${((this.firstFrameAt - this.startedAt) / 1000).toFixed(1)} s`;
      stats.textContent = this.promptId === null ? "Live player: queue the workflow to watch the stream here" :
        `blocks ${this.blocks} · frames ${this.shown}/${this.received} · ${this.achievedFps.toFixed(1)} fps · ` +
        `first frame ${first}${this.ended ? " · ended" : ""}`;
      stats.dataset.blocks = this.blocks;
      stats.dataset.shown = this.shown;
      stats.dataset.received = this.received;
    },

    async post(route, payload) {
      if (this.promptId === null) {
        message.textContent = "Nothing is running in this node yet: queue the workflow first.";
        return null;
      }
      const response = await api.fetchApi(route, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt_id: this.promptId, node_id: String(node.id), ...payload }),
      });
      const answer = await response.json();
      message.textContent = response.ok ? (payload.text ? `"${answer.accepted}" takes over at the next block` :
        "Stopping after the current block; everything generated is kept.") : answer.error;
      message.style.color = response.ok ? "#aaa" : "#f88";
      return { status: response.status, ...answer };
    },
  };

  input.addEventListener("keydown", (event) => {
    event.stopPropagation(); // typing must not trigger the canvas's shortcuts
    if (event.key === "Enter") {
      player.lastSent = player.post("/selfforcing/live/prompt", { text: input.value });
      input.value = "";
    }
  });
  stop.addEventListener("click", () => { player.lastSent = player.post("/selfforcing/live/stop", {}); });
  player.render();

  const widget = node.addDOMWidget("selfforcing_live_player", "selfforcing_live", root, {
    serialize: false, hideOnZoom: false, getMinHeight: () => PLAYER_HEIGHT,
  });
  widget.serialize = false; // not a saved value: workflows keep widget values by position
  node.selfForcingLive = player;
  // The player shows every frame: no host preview image (the newest frame per block) under it as well.
  Object.defineProperty(node, "imgs", { get: () => undefined, set: () => {}, configurable: true });
  const [width, height] = node.size;
  node.setSize([Math.max(width, 360), height]);
  return player;
}

function playerOf(data) {
  const node = app.graph?.getNodeById?.(Number(data.node)) ?? app.graph?.getNodeById?.(data.node);
  return node?.selfForcingLive;
}

app.registerExtension({
  name: "SelfForcing.LivePlayer",
  async nodeCreated(node) {
    if (SAMPLERS.includes(node.comfyClass)) makePlayer(node);
  },
  async setup() {
    api.addEventListener(EVENT, ({ detail: data }) => {
      const player = playerOf(data);
      if (!player) return;
      if (data.kind === "start") player.reset(data.prompt_id, data.fps);
      if (data.prompt_id !== player.promptId) return; // an earlier run's late frames
      if (data.kind === "block") player.addBlock(data);
      if (data.kind === "end") {
        player.ended = true;
        player.render();
      }
    });
  },
});
