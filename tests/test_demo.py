"""README command 1 (the main job) on the standalone core."""
import json

from core.demo import main


def test_main_job_writes_images_report_and_a_loadable_residual(tmp_path):
    out = tmp_path / "job"
    main(["--out", str(out), "--steps", "4", "--sample-steps", "3", "--resolution", "32", "--views", "1"])
    report = json.loads((out / "report.json").read_text())
    for name in ("sample_base.png", "sample_global.png", "sample_lag.png", "loss_curve.png", "train_1.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert report["lag_mask_coverage_last_step"] == 0.5  # the median rule
    assert report["mean_abs_change_vs_base"]["global"] > 0

    from core.residuals import load
    assert load(str(out / "residuals.safetensors")).metadata["class_word"] == "toy"


def test_main_job_loads_a_diffusers_folder(tmp_path, sd1_unet, vae, tokenizer, text_encoder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = tmp_path / "model"
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=sd1_unet,
                            scheduler=DDIMScheduler(beta_schedule="scaled_linear"), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    out = tmp_path / "job"
    main(["--model", str(folder), "--out", str(out), "--steps", "2", "--sample-steps", "2", "--resolution", "32",
          "--views", "1", "--class-word", "dog"])
    assert json.loads((out / "report.json").read_text())["model"] == str(folder)
