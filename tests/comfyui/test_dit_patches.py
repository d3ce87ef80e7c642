"""SD3 and Flux in a real ComfyUI, in-process (a subprocess in ComfyUI's own Python): the identities users rely on.

Random conditioning stands in for the text encoders (positions 5 and 6 play V* and the class word), so no T5 runs:
- our residual file through ComfyUI's stock LoRA loader (what LoraLoaderModelOnly calls) gives the same latent as
  Apply Residuals' patches;
- LAG at strength 0 is the base model exactly, and LAG changes the image at strength 1;
- an attention override another node set earlier still runs under LAG and recording, and alone changes nothing;
- after LAG and recording, the plain model samples the same latent as before them.
"""

import pytest

from . import harness
from .make_checkpoints import FLUX_NAME, SD3_NAME

pytestmark = pytest.mark.dit

SCRIPT = """
    import comfy.sample, comfy.sd, comfy.utils
    from comfyui_concepts.core import residuals as R
    from comfyui_concepts.core.heatmaps import AttentionRecord
    from comfyui_concepts.core.patching.comfy import (apply_localized, apply_recording, lag_wrapper,
                                                      model_family, model_sites)
    from comfyui_concepts.nodes.learn import ApplyResiduals

    family, path, out_dir = {family!r}, {path!r}, {out_dir!r}
    if family == "flux":
        model = comfy.sd.load_diffusion_model(path)
    else:
        model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
    flux = family == "flux"
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(1, 256 if flux else 154, 4096, generator=gen) * 0.5
    pooled = torch.randn(1, 768 if flux else 2048, generator=gen) * 0.5
    cond = [[context, {{"pooled_output": pooled}}]]
    latent = torch.zeros(1, 16, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    cfg = 1.0 if flux else 4.5

    def sample(m):
        return comfy.sample.sample(m, noise, 2, cfg, "euler", "simple", cond, cond, latent, seed=0, disable_pbar=True)

    sites = [s for s, _ in model_sites(model)]
    rs = R.init_residuals(sites, init_scale=0.3, metadata={{"base_family": model_family(model), "token": "sks",
                                                           "class_word": "toy"}})
    file = out_dir + "/residual.safetensors"
    R.save(rs, file)
    res = {{"family": model_family(model), "sites": [s.target for s in sites]}}
    base = sample(model)
    applied = sample(ApplyResiduals.execute(model, R.load(file), 1.0, "").args[0])
    stock = sample(comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(file), 1.0, 0)[0])
    res["stock_vs_apply"] = (stock - applied).abs().max().item()
    res["apply_vs_base"] = (applied - base).abs().max().item()

    calls = [0]
    def other_override(func, *args, **kwargs):
        calls[0] += 1
        return func(*args, **kwargs)
    other = model.clone()
    other.model_options.setdefault("transformer_options", {{}})["optimized_attention_override"] = other_override
    res["other_alone_equal"] = torch.equal(sample(other), base)
    calls_alone = calls[0]
    lag0 = sample(apply_localized(other, lag_wrapper(rs, [5, 6], context[0], strength=0.0)))
    res["lag0_equal"] = torch.equal(lag0, base)
    lag = sample(apply_localized(other, lag_wrapper(rs, [5, 6], context[0])))
    res["lag_vs_base"] = (lag - base).abs().max().item()
    res["lag_finite"] = bool(torch.isfinite(lag).all())
    record = AttentionRecord()
    rec = sample(apply_recording(other, record))
    res["record_equal"] = torch.equal(rec, base)
    res["record_sums"] = len(record.sums)
    res["other_calls"] = [calls_alone, calls[0]]
    res["plain_after_equal"] = torch.equal(sample(model), base)
    print("RESULT " + json.dumps(res))
"""


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dit_identities_in_comfyui(dit_checkpoints, family, tmp_path):
    path = str(dit_checkpoints[SD3_NAME if family == "sd3" else FLUX_NAME])
    res = harness.run_in_process(SCRIPT, family=family, path=path, out_dir=str(tmp_path))
    assert res["family"] == {"sd3": "SD3", "flux": "Flux"}[family]
    assert res["stock_vs_apply"] == 0.0  # LoraLoaderModelOnly on our file = Apply Residuals, bit for bit
    assert res["apply_vs_base"] > 1e-3  # and the residual does something
    assert res["other_alone_equal"] and res["lag0_equal"] and res["record_equal"] and res["plain_after_equal"]
    assert res["lag_finite"] and res["lag_vs_base"] > 1e-3 and res["record_sums"] > 0
    calls_alone, calls_total = res["other_calls"]
    assert calls_alone > 0 and calls_total >= 4 * calls_alone  # it ran under LAG (twice) and recording too
