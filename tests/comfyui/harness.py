"""Drive a real ComfyUI server from tests: discovery, start/stop, and a small HTTP client.

Standard library only at import time (torch/safetensors are imported lazily by ``read_latent``), so that collecting
tests/comfyui works, and skips cleanly, on a machine without ComfyUI or torch.
"""
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from .make_checkpoints import (  # standard library only at import time too
    CLIP_L_NAME,
    DIT_NAMES,
    FLUX_NAME,
    MODEL_FOLDER,
    SD3_NAME,
    T5XXL_NAME,
    VAE16_NAME,
)

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
PACK_DIR_NAME = "comfyui-concepts"
MAKE_CHECKPOINTS = HERE / "make_checkpoints.py"
SD15_CKPT = "tiny_sd15_random.safetensors"
SDXL_CKPT = "tiny_sdxl_random.safetensors"
# Diffusion transformers: SD3.5 as one checkpoint; Flux as diffusion model + CLIP-L + T5-XXL + VAE files.
SD3_CKPT, FLUX_UNET, CLIP_L_TE, T5XXL_TE, VAE16 = SD3_NAME, FLUX_NAME, CLIP_L_NAME, T5XXL_NAME, VAE16_NAME
DIT_FILES = DIT_NAMES
MODEL_SUBFOLDERS = ("checkpoints", "loras", "diffusion_models", "text_encoders", "vae")


def model_folder(file_name):
    """The models/ subfolder ComfyUI loads a test file from: checkpoints unless make_checkpoints says otherwise."""
    return MODEL_FOLDER.get(Path(file_name).name, "checkpoints")


# ---------------------------------------------------------------------------------------------------- discovery
def comfyui_path():
    """The ComfyUI work tree from $COMFYUI_PATH, or None when unset."""
    p = os.environ.get("COMFYUI_PATH")
    return Path(p).expanduser().resolve() if p else None


def comfyui_skip_reason():
    """Why the real-ComfyUI tests cannot run here, or None when they can."""
    p = comfyui_path()
    if p is None:
        return "COMFYUI_PATH not set: real-ComfyUI tests need a ComfyUI checkout (see README)"
    if not (p / "main.py").is_file():
        return f"COMFYUI_PATH={p} has no main.py: real-ComfyUI tests need a ComfyUI checkout (see README)"
    return None


def comfyui_python():
    """$COMFYUI_PYTHON, else <COMFYUI_PATH>/../venv/bin/python, else <COMFYUI_PATH>/venv/bin/python,
    else sys.executable."""
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return env
    p = comfyui_path()
    if p is not None:
        bin_rel = Path("Scripts", "python.exe") if os.name == "nt" else Path("bin", "python")
        for venv in (p.parent / "venv", p / "venv"):
            if (venv / bin_rel).exists():
                return str(venv / bin_rel)
    return sys.executable


def cache_dir():
    """Where the test checkpoints live: $COMFYUI_CONCEPTS_CACHE, default ~/.cache/comfyui-concepts."""
    return Path(os.environ.get("COMFYUI_CONCEPTS_CACHE", "~/.cache/comfyui-concepts")).expanduser()


def ensure_checkpoints(names=(SD15_CKPT, SDXL_CKPT), timeout=1800):
    """Build the missing test checkpoints in cache_dir() with make_checkpoints.py; return {name: path}."""
    out = cache_dir()
    paths = {n: out / n for n in names}
    if all(p.exists() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    cmd = [comfyui_python(), str(MAKE_CHECKPOINTS), "--comfy", str(comfyui_path()), "--out-dir", str(out)]
    for n in names:
        cmd += ["--only", n]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("COMFYUI_OMP_NUM_THREADS", "1"))
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(
            f"building test checkpoints failed ({shlex.join(cmd)}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise RuntimeError(f"make_checkpoints.py did not produce {missing}")
    return paths


# ---------------------------------------------------------------------------------------------------- helpers
def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_latent(path):
    """Load a ``.latent`` file written by the stock SaveLatent node as a float tensor [B, C, H, W].

    SaveLatent stores ``latent_tensor`` plus an empty ``latent_format_version_0`` marker in a safetensors file;
    files without the marker are the legacy format, which LoadLatent scales by 1/0.18215 (mirrored here).
    """
    import safetensors.torch

    data = safetensors.torch.load_file(str(path), device="cpu")
    t = data["latent_tensor"].float()
    if "latent_format_version_0" not in data:
        t = t * (1.0 / 0.18215)
    return t


def output_refs(outputs, kind="images"):
    """All file refs ({filename, subfolder, type}) of one kind ("images", "latents", ...) in a run() result."""
    return [ref for node_out in outputs.values() for ref in node_out.get(kind, [])]


def _format_node_errors(node_errors):
    lines = []
    for node_id, ne in (node_errors or {}).items():
        for err in ne.get("errors", []):
            lines.append("node {} ({}): {}: {}".format(node_id, ne.get("class_type"), err.get("message"),
                                                       err.get("details")))
    return lines


class ComfyServer:
    """One ComfyUI subprocess with its own base directory and port.

    Attributes: ``url``, ``base_dir`` (models/, custom_nodes/, input/, output/, temp/, user/), ``log_path``, ``port``,
    ``proc``.  The pack is visible as ``custom_nodes/comfyui-concepts`` (a symlink to the repo root).  Each file in
    ``checkpoints`` is linked into the models/ folder its loader reads (``model_folder``: checkpoints/,
    diffusion_models/, text_encoders/ or vae/).
    """

    def __init__(self, base_dir, checkpoints=(), port=None, extra_args=(), comfy_path=None, python=None,
                 link_pack=True):
        self.comfy_path = Path(comfy_path or comfyui_path())
        self.python = python or comfyui_python()
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "comfyui-server.log"
        self.extra_args = list(extra_args) + shlex.split(os.environ.get("COMFYUI_EXTRA_ARGS", ""))
        self.client_id = str(uuid.uuid4())
        self.proc = None
        self.startup_s = None
        subs = [f"models/{m}" for m in MODEL_SUBFOLDERS] + ["custom_nodes", "input", "output", "temp", "user"]
        for sub in subs:
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        if link_pack:
            _symlink(REPO_ROOT, self.base_dir / "custom_nodes" / PACK_DIR_NAME)
        for ck in checkpoints:
            ck = Path(ck)
            _symlink(ck.resolve(), self.base_dir / "models" / model_folder(ck.name) / ck.name)

    # ------------------------------------------------------------------------------------------ lifecycle
    @property
    def output_dir(self):
        return self.base_dir / "output"

    def start(self, timeout=120):
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(self.base_dir),
               "--database-url", "sqlite:///:memory:"] + self.extra_args
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("COMFYUI_OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
        t0 = time.time()
        with open(self.log_path, "ab") as log:
            log.write(("$ " + shlex.join(cmd) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_path), env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} during startup; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                status, _ = self._request("GET", "/system_stats", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.time() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"ComfyUI did not answer /system_stats within {timeout}s; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.25)
        self.startup_s = time.time() - t0
        return self

    def stop(self, timeout=20):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout)

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n=60):
        return "\n".join(self.log_text().splitlines()[-n:])

    def pack_import_failed(self):
        """True if ComfyUI logged an import failure for our pack (it keeps running without it)."""
        return any(("IMPORT FAILED" in line or "Cannot import" in line) and PACK_DIR_NAME in line
                   for line in self.log_text().splitlines())

    # ------------------------------------------------------------------------------------------ HTTP
    def _request(self, method, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path):
        status, body = self._request("GET", path)
        assert status == 200, f"GET {path} -> {status}: {body[:2000]}"
        return json.loads(body)

    def post_json(self, path, body):
        status, resp = self._request("POST", path, body)
        assert status == 200, f"POST {path} -> {status}: {resp[:2000]}"
        return json.loads(resp) if resp.strip() else None

    def object_info(self, cls=None):
        """GET /object_info (all nodes) or the definition of one node class."""
        if cls is None:
            return self.get_json("/object_info")
        info = self.get_json("/object_info/" + urllib.parse.quote(cls))
        assert cls in info, f"node class {cls!r} is not registered on this server; log tail:\n{self.log_tail(30)}"
        return info[cls]

    def free(self, unload_models=True, free_memory=True):
        """POST /free: ComfyUI applies it after its current/next queue item."""
        self._request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    # ------------------------------------------------------------------------------------------ prompts
    def submit(self, prompt):
        """POST /prompt; return (http_status, response dict)."""
        status, body = self._request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        try:
            resp = json.loads(body)
        except ValueError:
            resp = {"error": {"message": body.decode(errors="replace")}}
        return status, resp

    def wait(self, prompt_id, timeout=600):
        """Poll /history/<id> until the prompt finished; return its history entry."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            status, body = self._request("GET", "/history/" + urllib.parse.quote(prompt_id))
            if status == 200:
                entry = json.loads(body).get(prompt_id)
                if entry and entry.get("status", {}).get("completed") is not None:
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI died (exit {self.proc.returncode}) while running prompt {prompt_id}; "
                                     f"log tail:\n{self.log_tail()}")
            time.sleep(0.1)
        self._request("POST", "/interrupt", {})
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout}s; log tail:\n{self.log_tail()}")

    def run(self, prompt, timeout=600):
        """Run an API-format prompt to completion and return the history entry's ``outputs``.

        Raises AssertionError with node_errors (validation) or the execution_error message (runtime).
        """
        status, resp = self.submit(prompt)
        if status != 200 or resp.get("node_errors"):
            err = resp.get("error") or {}
            raise AssertionError("prompt rejected ({}): {} {}\n{}".format(
                status, err.get("message"), err.get("details", ""),
                "\n".join(_format_node_errors(resp.get("node_errors")))))
        entry = self.wait(resp["prompt_id"], timeout)
        st = entry["status"]
        if st.get("status_str") != "success":
            raise AssertionError("prompt failed ({}): {}\nlog tail:\n{}".format(
                st.get("status_str"), self._execution_errors(entry) or "no execution_error message",
                self.log_tail(40)))
        return entry.get("outputs", {})

    def run_expect_error(self, prompt, timeout=600):
        """Run a prompt that must fail; return the error text (validation or execution error)."""
        status, resp = self.submit(prompt)
        if status != 200 or resp.get("node_errors"):
            err = resp.get("error") or {}
            parts = [str(err.get("message", "")), str(err.get("details", ""))]
            parts += _format_node_errors(resp.get("node_errors"))
            return "\n".join(p for p in parts if p)
        entry = self.wait(resp["prompt_id"], timeout)
        if entry["status"].get("status_str") == "success":
            raise AssertionError("prompt was expected to fail but succeeded; outputs: {}".format(
                json.dumps(entry.get("outputs"))[:2000]))
        return self._execution_errors(entry) or "prompt status: {}".format(entry["status"].get("status_str"))

    @staticmethod
    def _execution_errors(entry):
        lines = []
        for kind, data in entry.get("status", {}).get("messages", []):
            if kind == "execution_error":
                lines.append("node {} ({}): {}: {}".format(data.get("node_id"), data.get("node_type"),
                                                           data.get("exception_type"), data.get("exception_message")))
            elif kind == "execution_interrupted":
                lines.append("execution interrupted at node {}".format(data.get("node_id")))
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------ files
    def output_path(self, ref):
        """Local path of a {filename, subfolder, type} ref that this server wrote."""
        root = {"output": "output", "input": "input", "temp": "temp"}[ref.get("type", "output")]
        return self.base_dir / root / ref.get("subfolder", "") / ref["filename"]

    def image_bytes(self, ref):
        """GET /view for an image ref from run() outputs."""
        q = urllib.parse.urlencode({"filename": ref["filename"], "subfolder": ref.get("subfolder", ""),
                                    "type": ref.get("type", "output")})
        status, body = self._request("GET", "/view?" + q)
        assert status == 200, f"GET /view?{q} -> {status}"
        return body

    def read_latent(self, ref):
        """read_latent() of a SaveLatent ref ({filename, subfolder, type}) from run() outputs."""
        return read_latent(self.output_path(ref))


def _symlink(target, link):
    link = Path(link)
    if link.is_symlink() or link.exists():
        return
    try:
        os.symlink(str(target), str(link), target_is_directory=Path(target).is_dir())
    except OSError:  # no symlink privilege (Windows): copy files, refuse to copy the pack
        if Path(target).is_dir():
            raise
        shutil.copy2(str(target), str(link))


def start_server(checkpoints=(), base_dir=None, timeout=120, **kwargs):
    """Start a new, independent ComfyServer (new port, new base dir) and return it once it answers."""
    base_dir = base_dir or tempfile.mkdtemp(prefix="comfyui-concepts-")
    return ComfyServer(base_dir, checkpoints=checkpoints, **kwargs).start(timeout=timeout)


# The setup every in-process script starts with: ComfyUI on the CPU, its folder_paths, this pack imported as a package.
IN_PROCESS_SETUP = """
import importlib.util, json, sys
from pathlib import Path
sys.argv = sys.argv[:1] + ["--cpu"]
sys.path.insert(0, {comfy!r})
import torch
import comfy.options
comfy.options.enable_args_parsing()
import comfy.cli_args  # noqa: F401
import nodes  # noqa: F401  (sets up folder_paths)
import folder_paths
spec = importlib.util.spec_from_file_location("comfyui_concepts", Path({repo!r}) / "__init__.py",
                                              submodule_search_locations=[{repo!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["comfyui_concepts"] = pack
spec.loader.exec_module(pack)
"""


def run_in_process(body: str, timeout: int = 900, **values) -> dict:
    """Run ``body`` (dedented Python, ``str.format``-ed with ``values``) after ``IN_PROCESS_SETUP`` in ComfyUI's own
    Python; it reports by printing one line ``RESULT <json>``, which is returned. Fails with the script's stderr."""
    import json
    import subprocess
    import textwrap

    script = (IN_PROCESS_SETUP + textwrap.dedent(body)).format(comfy=str(comfyui_path()), repo=str(REPO_ROOT),
                                                               **values)
    proc = subprocess.run([comfyui_python(), "-c", script], capture_output=True, text=True, timeout=timeout,
                          cwd=str(comfyui_path()))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])
