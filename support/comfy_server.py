"""A real ComfyUI server with this pack linked into its custom_nodes (tests and scripts/generate.py).

    server = ComfyServer(comfyui_root()).start()
    server.write_safetensors("diffusion_models", "tiny.safetensors", state_dict)
    prompt_id = server.queue_prompt({"1": {"class_type": ..., "inputs": {...}}})
    entry = server.wait(prompt_id)          # history entry; raises PromptExecutionError on failure
    server.stop()

Everything the server writes (models, input, output, user data, its sqlite database, its log)
lives in one temporary `--base-directory`, removed by `stop()`. ComfyUI 0.3.75 resolves
custom nodes, models, input, output, temp and user folders under that directory.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-self-forcing"
MODEL_FOLDERS = ["diffusion_models", "vae", "vae_approx", "loras", "text_encoders", "prompt_embeddings"]
SERVER_FLAGS = [
    "--listen", "127.0.0.1",
    "--disable-api-nodes",     # no network, fewer modules to import
    "--disable-auto-launch",
    "--dont-print-server",
    "--log-stdout",
    "--preview-method", "none",
]


class PromptValidationError(RuntimeError):
    """POST /prompt refused the workflow; `response` holds ComfyUI's JSON answer."""

    def __init__(self, response):
        self.response = response
        lines = [_describe(response.get("error", {}))]
        for node_id, node in response.get("node_errors", {}).items():
            for error in node.get("errors", []):
                lines.append(f"node {node_id} ({node.get('class_type')}): {_describe(error)}")
        super().__init__("\n".join(lines))


class PromptExecutionError(RuntimeError):
    """A queued workflow failed while running; `details` is ComfyUI's execution_error message."""

    def __init__(self, details):
        self.details = details
        super().__init__(f"node {details.get('node_id')} ({details.get('node_type')}) raised "
                         f"{details.get('exception_type')}: {details.get('exception_message', '').strip()}")


def _describe(error):
    parts = [error.get("message", ""), error.get("details", "")]
    return ": ".join(part for part in parts if part)


def status_messages(entry):
    """The {event: data} status messages of a history entry (execution_error, execution_interrupted...)."""
    return {event: data for event, data in entry.get("status", {}).get("messages", [])}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ComfyServer:
    """One ComfyUI process (`main.py` of the host at `comfyui_root`) on a free loopback port."""

    def __init__(self, comfyui_root, pack_root=REPO_ROOT, cpu=True, extra_args=()):
        """cpu: run with --cpu (tests); extra_args: more ComfyUI flags (e.g. model paths, output folder)."""
        self.comfyui_root = Path(comfyui_root)
        self.pack_root = Path(pack_root)
        self.flags = [*SERVER_FLAGS, *(["--cpu"] if cpu else []), *extra_args]
        self.base_dir = None
        self.process = None
        self.port = None
        self.start_seconds = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout=300):
        """Launch the server and block until GET /system_stats answers; raise with the log tail if
        it exits, times out, or reports that this pack failed to import."""
        self.base_dir = Path(tempfile.mkdtemp(prefix="comfyui-host-"))
        (self.base_dir / "custom_nodes").mkdir()
        (self.base_dir / "custom_nodes" / PACK_NAME).symlink_to(self.pack_root, target_is_directory=True)
        for folder in MODEL_FOLDERS:
            self.model_dir(folder)
        self.port = free_port()
        command = [sys.executable, "main.py", *self.flags, "--port", str(self.port),
                   "--base-directory", str(self.base_dir),
                   "--database-url", f"sqlite:///{self.base_dir / 'comfyui.db'}"]
        environment = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", DO_NOT_TRACK="1")
        self.log_path = self.base_dir / "server.log"
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.comfyui_root, stdout=log,
                                            stderr=subprocess.STDOUT, env=environment)
        while not self._answers():
            if self.process.poll() is not None:
                self._fail(f"ComfyUI exited with code {self.process.returncode} while starting")
            if time.monotonic() - started > timeout:
                self._fail(f"ComfyUI did not answer /system_stats within {timeout} s")
            time.sleep(0.2)
        self.start_seconds = time.monotonic() - started
        failures = self.import_failures()
        if any(PACK_NAME in line for line in failures):
            self._fail(f"ComfyUI could not import the {PACK_NAME} pack")
        return self

    def stop(self):
        """Terminate the server and delete its base directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def log(self):
        return self.log_path.read_text(errors="replace")

    def import_failures(self):
        """Log lines of modules (ours or the host's own) that ComfyUI failed to import."""
        return [line.strip() for line in self.log().splitlines() if "IMPORT FAILED" in line]

    def _fail(self, message):
        tail = "\n".join(self.log().splitlines()[-60:])
        self.stop()
        raise RuntimeError(f"{message}. Last lines of the server log:\n{tail}")

    def _answers(self):
        try:
            self.get("/system_stats")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    # -- folders -------------------------------------------------------------------------------
    def model_dir(self, folder):
        """models/<folder> of the server (created), e.g. "diffusion_models", "vae_approx"."""
        path = self.base_dir / "models" / folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def output_dir(self):
        return self.base_dir / "output"

    def write_safetensors(self, folder, name, tensors, metadata=None):
        """Save a {key: tensor} dict as models/<folder>/<name>; returns the path."""
        path = self.model_dir(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({key: value.contiguous() for key, value in tensors.items()}, path, metadata=metadata)
        return path

    def copy_model(self, folder, source, name=None):
        """Copy a file (e.g. an official .pt checkpoint) to models/<folder>/<name>; returns the path."""
        path = self.model_dir(folder) / (name or Path(source).name)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        return path

    # -- HTTP API ------------------------------------------------------------------------------
    def get(self, route):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{route}", timeout=30) as response:
            return json.load(response)

    def post(self, route, payload=None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{route}",
                                         data=json.dumps({} if payload is None else payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def object_info(self, node_class=None):
        """GET /object_info (all nodes) or the entry of one node class."""
        if node_class is None:
            return self.get("/object_info")
        return self.get(f"/object_info/{node_class}")[node_class]

    def queue_prompt(self, prompt, client_id=None):
        """POST /prompt with an API-format workflow (as websocket client ``client_id``, if given);
        returns the prompt id. Raises PromptValidationError (with ComfyUI's readable messages) when
        it is refused."""
        payload = {"prompt": prompt} if client_id is None else {"prompt": prompt, "client_id": client_id}
        try:
            return self.post("/prompt", payload)["prompt_id"]
        except urllib.error.HTTPError as error:
            if error.code != 400:
                raise
            raise PromptValidationError(json.load(error)) from None

    def wait(self, prompt_id, timeout=120, raise_on_error=True):
        """Block until the prompt has run; return its /history entry. Raises PromptExecutionError
        when a node failed (unless `raise_on_error` is False), RuntimeError on timeout or a crash."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status", {}).get("status_str") in ("success", "error"):
                break
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died (code {self.process.returncode}):\n"
                                   + "\n".join(self.log().splitlines()[-60:]))
            if time.monotonic() > deadline:
                raise RuntimeError(f"prompt {prompt_id} not finished after {timeout} s")
            time.sleep(0.1)
        error = status_messages(entry).get("execution_error")
        if raise_on_error and error is not None:
            raise PromptExecutionError(error)
        return entry

    def run(self, prompt, timeout=120):
        """queue_prompt + wait: the history entry of a workflow that must succeed."""
        return self.wait(self.queue_prompt(prompt), timeout)

    def interrupt(self):
        """POST /interrupt: stop the running prompt."""
        self.post("/interrupt")
