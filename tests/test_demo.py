"""README command 1 (the main job): what it writes, what it reads from the judge, and the input it refuses."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from demo.cli import main

REPO = Path(__file__).resolve().parent.parent
FAST = ["--steps", "2", "--sample-steps", "2", "--samples", "1", "--views", "1"]


def strict_json(path: Path) -> dict:
    def reject(token):
        raise ValueError(f"{path} holds {token}, which strict JSON readers reject")
    return json.loads(path.read_text(), parse_constant=reject)


def modes(folder: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}


def test_tiny_model_job_writes_sheet_report_and_a_loadable_residual(tmp_path):
    out = tmp_path / "job"
    assert main(["--model", "tiny", "--out", str(out), "--resolution", "32", *FAST]) == 0
    for name in ("contact_sheet.png", "loss_curve.png", "train_1.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = strict_json(out / "report.json")
    assert report["lag_mask_coverage_last_step"] == 0.5  # the median rule turns on half of each block
    assert report["mean_abs_change_vs_base"]["global"] > 0
    assert "rows" not in report  # no judge outside the toy world: no scores pretended
    assert len(modes(out)) == 1, "every output file gets the same permissions"

    from core.residuals import load
    assert load(str(out / "residuals.safetensors")).metadata["class_word"] == "toy"


def test_toy_model_job_judges_every_row(tmp_path):
    out = tmp_path / "job"
    assert main(["--out", str(out), *FAST]) == 0
    report = strict_json(out / "report.json")
    assert report["concept_read_by_judge"] == "yellow striped diamond"
    assert set(report["rows"]) == {"base", "global", "lag"}
    for row in report["rows"].values():
        assert row["samples"] == 4  # four prompts, one sample each here
        assert 0.0 <= row["colour"] <= 1.0
    assert report["rows"]["base"]["background_kept"] is None  # the base row is the reference
    assert len(report["prompts"]) == 4


def test_report_json_has_no_nan_even_when_a_value_is_not_finite(tmp_path):
    from demo.report import write_report

    clean = write_report(tmp_path, {"loss_last10": float("nan"), "nested": {"x": float("inf")}, "rows": None})
    assert strict_json(tmp_path / "report.json") == clean == {"loss_last10": None, "nested": {"x": None},
                                                               "rows": None}


def _refused(argv, capsys, tmp_path, out=None):
    out = out or tmp_path / "never"
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing is created on bad input"
    return err


def test_bad_images_folders_are_refused_before_anything_is_written(tmp_path, capsys):
    assert "no such folder" in _refused(["--images", str(tmp_path / "missing")], capsys, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no .png/.jpg/.jpeg/.webp images" in _refused(["--images", str(empty)], capsys, tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "photo.png").write_bytes(b"not a png at all")
    err = _refused(["--images", str(broken)], capsys, tmp_path)
    assert "photo.png" in err and "cannot read" in err


@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], "--steps 0"), (["--steps", "-5"], "--steps -5"), (["--batch-size", "0"], "--batch-size"),
    (["--lr", "0"], "--lr"), (["--lr=-1e-3"], "--lr"), (["--lr", "nan"], "--lr"), (["--steps", "x"], "--steps"),
    (["--samples", "0"], "--samples"), (["--resolution", "30"], "--resolution"),
])
def test_numbers_out_of_range_are_refused(argv, words, tmp_path, capsys):
    if "x" in argv:  # argparse's own type error: still one line and exit 2
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(tmp_path / "never")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err
        return
    assert words in _refused(argv, capsys, tmp_path)


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "out.txt"
    f.write_text("keep me")
    assert "a file is in the way" in _refused([], capsys, tmp_path, out=f)
    assert f.read_text() == "keep me"


def test_a_model_that_is_not_a_model_is_refused(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "not a model file" in _refused(["--model", str(text)], capsys, tmp_path)
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "model_index.json" in _refused(["--model", str(folder)], capsys, tmp_path)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00" * 64)
    assert "not a safetensors file" in _refused(["--model", str(fake)], capsys, tmp_path)
    import torch
    from safetensors.torch import save_file
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(lora))
    assert "without a UNet" in _refused(["--model", str(lora)], capsys, tmp_path)
    assert "no such file" in _refused(["--model", str(tmp_path / "missing.safetensors")], capsys, tmp_path)


def test_main_job_loads_a_diffusers_folder(tmp_path, sd1_unet, vae, tokenizer, text_encoder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = tmp_path / "model"
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=sd1_unet,
                            scheduler=DDIMScheduler(beta_schedule="scaled_linear"), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    out = tmp_path / "job"
    assert main(["--model", str(folder), "--out", str(out), "--resolution", "32", "--class-word", "dog",
                 *FAST]) == 0
    assert strict_json(out / "report.json")["model"] == str(folder)


def test_runs_from_any_folder(tmp_path):
    """``python path/to/comfyui-concepts --help`` works outside the clone (the folder's __main__.py)."""
    env = dict(os.environ, PYTHONPATH="")
    res = subprocess.run([sys.executable, str(REPO), "--help"], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--model" in res.stdout
