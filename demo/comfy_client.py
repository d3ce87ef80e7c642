"""Run the main job on a ComfyUI server through its HTTP API (standard library only)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


def _request(url, data=None, headers=None, timeout=60):
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None
    except urllib.error.URLError as e:
        raise SystemExit(f"cannot reach ComfyUI at {url}: {e.reason}. Start it, or fix --server.") from None


def upload_image(server: str, path: Path) -> str:
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            "Content-Type: image/png\r\n\r\n")
    tail = (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\nfalse\r\n"
            f"--{boundary}--\r\n")
    body = head.encode() + path.read_bytes() + tail.encode()
    resp = json.loads(_request(f"{server}/upload/image", body,
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
    return resp["name"] if not resp.get("subfolder") else f"{resp['subfolder']}/{resp['name']}"


def run_prompt(server: str, prompt: dict, timeout: float = 3600) -> dict:
    """Queue ``prompt``, wait for it, return its outputs; exits with ComfyUI's own error message on failure."""
    body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
    resp = json.loads(_request(f"{server}/prompt", body, {"Content-Type": "application/json"}))
    pid = resp["prompt_id"]
    t0 = time.time()
    while time.time() - t0 < timeout:
        hist = json.loads(_request(f"{server}/history/{pid}"))
        if pid in hist:
            entry = hist[pid]
            status = entry.get("status", {})
            if status.get("status_str") == "success":
                return entry.get("outputs", {})
            errors = [d.get("exception_message") for kind, d in status.get("messages", []) if kind == "execution_error"]
            raise SystemExit(f"ComfyUI could not run the prompt: {'; '.join(map(str, errors)) or status}")
        time.sleep(0.5)
    raise SystemExit(f"prompt {pid} did not finish within {timeout}s")


def workflow(name: str, **by_class) -> dict:
    """workflows/api/<name>.json with input values replaced per class_type."""
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    for node in prompt.values():
        node["inputs"].update(by_class.get(node["class_type"], {}))
    return prompt


def download_images(server: str, outputs: dict, out: Path, stem: str) -> list[str]:
    saved = []
    for node_out in outputs.values():
        for i, ref in enumerate(node_out.get("images", [])):
            q = urllib.parse.urlencode({k: ref.get(k, "") for k in ("filename", "subfolder", "type")})
            path = out / f"{stem}{'' if i == 0 else f'_{i}'}.png"
            path.write_bytes(_request(f"{server}/view?{q}"))
            saved.append(str(path))
    return saved


def run_on_server(args) -> dict:
    from core.toy_models import concept_renders

    from .cli import image_files
    from .report import save_png, settle, write_report

    server = args.server.rstrip("/")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.images:
        files = image_files(args.images)
    else:
        files = []
        for i, img in enumerate(concept_renders(4, args.resolution, seed=0)):
            files.append(out / f"concepts_demo_{i + 1}.png")
            save_png(img, files[-1])
    names = [upload_image(server, f) for f in files[:4]]
    while len(names) < 4:
        names.append(names[len(names) % len(files)])
    save_name = f"concepts/{args.token}_{args.class_word}_{time.strftime('%Y%m%d_%H%M%S')}"
    ckpt = {"CheckpointLoaderSimple": {"ckpt_name": args.ckpt}}
    train = workflow("learn_residuals", **ckpt, ConceptsTrainResiduals={
        "class_word": args.class_word, "token": args.token, "steps": args.steps, "learning_rate": args.lr,
        "batch_size": args.batch_size, "seed": args.seed, "resolution": args.resolution, "views": args.views},
        ConceptsSaveResiduals={"save_name": save_name})
    for node, name in zip((n for n in train.values() if n["class_type"] == "LoadImage"), names, strict=False):
        node["inputs"]["image"] = name
    t0 = time.perf_counter()
    outputs = run_prompt(server, train)
    report = {"server": server, "checkpoint": args.ckpt, "residual_file": f"models/loras/{save_name}.safetensors",
              "train_seconds": round(time.perf_counter() - t0, 2)}
    for path in download_images(server, outputs, out, "loss_curve"):
        settle(Path(path))
    prompt = args.prompt or f"a photo of a {args.token} {args.class_word} on the beach"
    common = dict(ckpt, ConceptsLoadResiduals={"residual_name": f"{save_name}.safetensors"},
                  EmptyLatentImage={"width": args.resolution, "height": args.resolution},
                  KSampler={"seed": args.seed, "steps": args.sample_steps, "cfg": args.cfg})
    jobs = (("apply_residuals", "sample_global", {}),
            ("apply_residuals_lag", "sample_lag", {"ConceptsApplyResidualsLocalized": {"text": prompt}}))
    for name, stem, extra in jobs:
        wf = workflow(name, **common, **extra)
        if name == "apply_residuals":
            next(n for n in wf.values() if n["_meta"].get("title") == "Positive prompt")["inputs"]["text"] = prompt
        t0 = time.perf_counter()
        report[stem] = [str(settle(Path(p))) for p in download_images(server, run_prompt(server, wf), out, stem)]
        report[f"{stem}_seconds"] = round(time.perf_counter() - t0, 2)
    write_report(out, report)
    return report
