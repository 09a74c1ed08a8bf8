"""Live runs of the samplers in the host: the pack's routes, frames to the browser, recording, prompt log.

Routes (JSON in, JSON out; a refusal answers 400 (bad input) or 409 (not running, stopping, Stop
twice) with {"error": "what is wrong and what to do"}):

    POST /selfforcing/live/prompt  {"prompt_id", "node_id", "text"}   switch at the next block
    POST /selfforcing/live/stop    {"prompt_id", "node_id"}           end after the current block, keep it all

Both accept only the sampler node that is running in the prompt that is running. Live text is
encoded with the CLIP connected to the sampler, or, without one, names a saved prompt embedding
(``models/prompt_embeddings``). The host's own Cancel still discards the run.

Frames go to the browser tab that queued the prompt as the websocket event ``selfforcing.live``
({"kind": "start" | "block" | "end", "prompt_id", "node", ...}; a block carries its frames as
base64 JPEGs), encoded on a worker thread, off the generation path; the same thread appends them
to the recorded mp4. Files go to ``output/self_forcing/`` under a fresh counter, never overwriting:
``live_NNNNN_record.mp4`` and ``live_NNNNN_prompt_log.json``. The prompt log is written when the
run recorded or took live requests: when the sampler ends (finished, stopped, or cancelled by the
host's Cancel, then with the frames of the finished blocks), and, once the prompt has run, again
beside every video that nodes downstream of the sampler saved to ``output/`` (Save Video's
``name_00001_.mp4`` gets ``name_00001_.prompt_log.json``).
"""
import base64
import io as bytes_io
import json
import logging
import os
import queue
import threading
import time

import folder_paths
from aiohttp import web
from server import PromptServer

from ..selfforcing_core.atomic import atomic_write
from ..selfforcing_core.live import LiveRequestError, LiveSteering
from ..selfforcing_core.prompt_embeddings import load_prompt_embeddings
from ..selfforcing_core.recording import Mp4Recorder
from ..selfforcing_core.units import video_frames_for
from .common import prompt_tensor
from .prompt_embeddings import FOLDER as EMBEDDINGS_FOLDER

EVENT = "selfforcing.live"
FPS = 16  # Wan 2.1's frame rate: the player's and the recording's
PLAYER_SIZE = 512  # longest side of the frames sent to the browser
OUTPUT_PREFIX = "self_forcing/live"
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv")

_runs: dict[tuple[str, str], "LiveRun"] = {}
_runs_lock = threading.Lock()


def live_text_encoder(clip):
    """text -> prompt [1, L, 4096]: the CLIP's umT5 encoding, or a saved prompt embedding named by the text.

    Returns (encode, check): check(text) raises ValueError at once for text that cannot be encoded.
    """
    def embedding_path(text):
        name = text if text.endswith(".safetensors") else f"{text}.safetensors"
        return folder_paths.get_full_path(EMBEDDINGS_FOLDER, name)

    def check(text):
        if clip is None and embedding_path(text.strip()) is None:
            raise ValueError("no CLIP is connected to the sampler's clip input, so live text must name a "
                                   f"saved prompt embedding in models/{EMBEDDINGS_FOLDER}; connect the text encoder "
                                   "(CLIPLoader, type wan) to type prompts")

    def encode(text):
        if clip is not None:
            return prompt_tensor(clip.encode_from_tokens_scheduled(clip.tokenize(text)), "live")
        return prompt_tensor(load_prompt_embeddings(embedding_path(text)), "live")

    return encode, check


def output_stem(suffix: str) -> tuple[str, str]:
    """(folder, stem) of a new ``output/self_forcing/live_NNNNN`` name whose ``stem + suffix`` does not exist."""
    folder, name, counter, _, _ = folder_paths.get_save_image_path(OUTPUT_PREFIX, folder_paths.get_output_directory())
    os.makedirs(folder, exist_ok=True)
    while os.path.exists(os.path.join(folder, f"{name}_{counter:05}{suffix}")):
        counter += 1
    return folder, f"{name}_{counter:05}"


class LiveRun:
    """One running sampler node: its steering, the frame worker, the recording and the prompt log."""

    def __init__(self, prompt_id: str, node_id: str, clip, record: bool, size: tuple[int, int], length: int = 0):
        self.prompt_id, self.node_id = prompt_id, node_id
        encode, self.check_text = live_text_encoder(clip)
        self.steering = LiveSteering(encode)
        self.client_id = PromptServer.instance.client_id  # the tab that queued the prompt (None: an API call)
        self.length = length  # video frames of the output (0: until stopped); the last block is trimmed to it
        self.blocks_done = 0
        self.frames_done = 0  # video frames of the finished blocks (trimmed to the length)
        self.logged = False
        self.steerable = True  # False: the sampler takes no live prompt or Stop (Rolling Forcing)
        self.block_first_frames: dict[int, int] = {}  # block -> its first video frame in the output
        self.folder, self.stem, self.recorder = None, None, None
        if record:
            self.folder, self.stem = output_stem("_record.mp4")
            self.recorder = Mp4Recorder(os.path.join(self.folder, f"{self.stem}_record.mp4"), *size, fps=FPS)
        self.frames = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="selfforcing-live", daemon=True)

    # -- lifecycle (the sampler's thread) ----------------------------------------------------
    def __enter__(self):
        with _runs_lock:
            _runs[(self.prompt_id, self.node_id)] = self
        self.worker.start()
        self.send({"kind": "start", "fps": FPS, "started_at": time.time()})
        return self

    def __exit__(self, error_type, error, traceback):
        with _runs_lock:
            _runs.pop((self.prompt_id, self.node_id), None)
        self.frames.put(None)
        self.worker.join()
        if self.recorder is not None:
            self.recorder.close()
        reason = "stopped" if self.steering.stop_requested else "finished" if error is None else "cancelled"
        if error is not None:  # Cancel or a failure: log what the finished blocks hold
            try:
                self.write_prompt_log(self.frames_done, "cancelled")
            except OSError:
                logging.exception("Self-Forcing live: the prompt log of a cancelled run could not be written")
        self.send({"kind": "end", "reason": reason, "blocks": self.blocks_done})

    def live_for(self, settings):
        """The steering to pass to ``generate_video``: None for the Rolling Forcing sampler, which takes none."""
        self.steerable = settings.sampler != "rolling"
        return self.steering if self.steerable else None

    def on_block(self, report):
        """Wrap the host reporter (progress, preview, interrupt check): then hand the block's frames to the worker."""
        def on_block(info: dict):
            report(info)
            block, frames = info["block"], info["frames"]
            first_frame = self.block_first_frames[block] = video_frames_for(info["start_frame"])
            if frames is not None and self.length:
                frames = frames[:, :max(0, self.length - first_frame)]
            self.blocks_done = block + 1
            if frames is not None:
                self.frames_done = first_frame + frames.shape[1]
            switched = [event.text for event in self.steering.log if event.kind == "switch" and event.block == block]
            self.frames.put((block, first_frame, frames, time.time(), switched[-1] if switched else None))
        return on_block

    # -- the worker thread ----------------------------------------------------------------------
    def _work(self):
        from PIL import Image

        while (item := self.frames.get()) is not None:
            block, first_frame, frames, block_end, switched = item
            if frames is None:
                continue
            pixels = (frames[0].float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            try:
                if self.recorder is not None:
                    self.recorder.append(pixels)
                if self.client_id is not None:
                    jpegs = []
                    for frame in pixels:
                        image = Image.fromarray(frame)
                        image.thumbnail((PLAYER_SIZE, PLAYER_SIZE))
                        buffer = bytes_io.BytesIO()
                        image.save(buffer, format="JPEG", quality=85)
                        jpegs.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
                    self.send({"kind": "block", "block": block, "first_frame": first_frame, "frames": jpegs,
                               "block_end": block_end, "switched": switched})
            except Exception:  # the stream goes on without the player or recording; the log says why
                logging.exception("Self-Forcing live: block %d could not be sent or recorded", block)

    def send(self, data: dict):
        if self.client_id is not None:
            PromptServer.instance.send_sync(EVENT, {"prompt_id": self.prompt_id, "node": self.node_id, **data},
                                            self.client_id)

    # -- what the run leaves behind -------------------------------------------------------------
    def switch_frame(self, event) -> int | None:
        """First video frame generated under a live prompt taken at ``event.block`` (None: never generated)."""
        return self.block_first_frames.get(event.block)

    def summary(self) -> str:
        """Lines for the sampler's info output: every live switch with its frame, and the stop."""
        lines = [f"live switch at frame {self.switch_frame(e)} (block {e.block}): {e.text}"
                 for e in self.steering.log if e.kind == "switch"]
        lines += [f"live stop after block {e.block}" for e in self.steering.log if e.kind == "stop"]
        return "\n".join(lines)

    def write_prompt_log(self, total_frames: int, ending: str | None = None) -> str | None:
        """``live_NNNNN_prompt_log.json`` beside the recording (when there is one, or a live request
        arrived); returns its path relative to output/. After a finished run (``ending`` None), the
        same log goes beside the videos the prompt saves from the sampler's output, once it has run."""
        if self.logged or (self.recorder is None and not self.steering.log):
            return None
        self.logged = True
        if self.stem is None:
            self.folder, self.stem = output_stem("_prompt_log.json")
        ending = ending or ("stopped" if self.steering.stop_requested else "finished")
        log = {"prompt_id": self.prompt_id, "node": self.node_id, "fps": FPS, "frames": total_frames,
               "ending": ending, "record": f"{self.stem}_record.mp4" if self.recorder is not None else None,
               "events": [{"kind": e.kind, "text": e.text, "block": e.block,
                           "frame": self.switch_frame(e),
                           "requested_at": e.requested_at, "applied_at": e.applied_at} for e in self.steering.log]}
        path = os.path.join(self.folder, f"{self.stem}_prompt_log.json")
        write_json(path, log)
        if ending != "cancelled":
            threading.Thread(target=log_beside_saved_videos, args=(self.prompt_id, self.node_id, log),
                             name="selfforcing-prompt-log", daemon=True).start()
        return os.path.relpath(path, folder_paths.get_output_directory())


def write_json(path: str, data: dict) -> None:
    """Write ``data`` to a new file at ``path``, whole or not at all; an existing file is never replaced."""
    def write(temp):
        with open(temp, "w") as file:
            json.dump(data, file, indent=1)
    try:
        atomic_write(path, write, overwrite=False)
    except FileExistsError:
        raise FileExistsError(f"{os.path.basename(path)} appeared while the stream ran; the prompt log was not "
                              "written over it") from None


def downstream_nodes(graph: dict, node_id: str) -> set[str]:
    """Ids of the nodes of an API-format ``graph`` that take, directly or not, an output of ``node_id``."""
    found, grown = set(), True
    while grown:
        grown = False
        for node, spec in graph.items():
            links = [value[0] for value in spec.get("inputs", {}).values() if isinstance(value, list) and value]
            if node not in found and any(str(link) in found | {str(node_id)} for link in links):
                found.add(node)
                grown = True
    return found


def log_beside_saved_videos(prompt_id: str, node_id: str, log: dict, poll_seconds: float = 0.2) -> None:
    """Once prompt ``prompt_id`` has run: ``log`` (with the video's name) beside every video file in
    output/ that a node downstream of ``node_id`` saved, as ``<video name>.prompt_log.json``."""
    queue = PromptServer.instance.prompt_queue
    while not (history := queue.get_history(prompt_id=prompt_id)):
        if not any(item[1] == prompt_id for item in queue.get_current_queue_volatile()[0]):
            return  # gone from the queue without a history entry (history wiped)
        time.sleep(poll_seconds)
    entry = history[prompt_id]
    output_root = os.path.realpath(folder_paths.get_output_directory())
    downstream = downstream_nodes(entry["prompt"][2], node_id)
    for node, outputs in entry["outputs"].items():
        saved = [item for items in outputs.values() if isinstance(items, list) for item in items
                 if isinstance(item, dict) and item.get("type") == "output"
                 and str(item.get("filename", "")).lower().endswith(VIDEO_EXTENSIONS)]
        for item in saved if node in downstream else []:
            video = os.path.realpath(os.path.join(output_root, item.get("subfolder", ""), item["filename"]))
            if os.path.commonpath([video, output_root]) != output_root or not os.path.isfile(video):
                continue
            try:
                write_json(os.path.splitext(video)[0] + ".prompt_log.json", {**log, "video": item["filename"]})
            except OSError:
                logging.exception("Self-Forcing live: no prompt log beside %s", item["filename"])


def find_run(body: dict) -> LiveRun:
    prompt_id, node_id = body.get("prompt_id"), body.get("node_id")
    if not isinstance(prompt_id, str) or not isinstance(node_id, (str, int)):
        raise ValueError("send the running prompt's prompt_id and the sampler's node_id")
    with _runs_lock:
        run = _runs.get((prompt_id, str(node_id)))
    if run is None:
        raise LookupError(f"node {node_id} of prompt {prompt_id} is not running a Self-Forcing sampler; live "
                          "prompts and Stop go to a sampler while it runs")
    if not run.steerable:
        raise ValueError("the Rolling Forcing preset takes no live prompts or Stop; use a block-by-block preset "
                         "(or the host's Cancel)")
    return run


def live_route(path: str):
    """Register ``handle(run, body) -> dict`` as POST ``path``; refusals become clear JSON errors."""
    def register(handle):
        async def route(request):
            try:
                body = await request.json()
                if not isinstance(body, dict):
                    raise ValueError("send a JSON object")
                return web.json_response(handle(find_run(body), body))
            except json.JSONDecodeError:
                return web.json_response({"error": "the request body is not JSON"}, status=400)
            except LookupError as error:
                return web.json_response({"error": str(error)}, status=409)
            except LiveRequestError as error:  # the run's state refuses it (stopping, Stop twice)
                return web.json_response({"error": str(error)}, status=409)
            except ValueError as error:  # bad input
                return web.json_response({"error": str(error)}, status=400)
        PromptServer.instance.routes.post(path)(route)
        return handle
    return register


@live_route("/selfforcing/live/prompt")
def live_prompt(run: LiveRun, body: dict) -> dict:
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the live prompt is empty; type what the video should show next")
    run.check_text(text)
    event = run.steering.request_prompt(text)
    return {"accepted": event.text, "blocks_done": run.blocks_done, "requested_at": event.requested_at}


@live_route("/selfforcing/live/stop")
def live_stop(run: LiveRun, body: dict) -> dict:
    event = run.steering.request_stop()
    return {"stopping": True, "blocks_done": run.blocks_done, "requested_at": event.requested_at}
