"""ConceptAttention in a real ComfyUI: the concept stream is ComfyUI's own text stream, recording leaves the sampled
latent bit-identical, Attention Heatmaps reads one map per concept, and UNets are refused.

The stream check builds ComfyUI's Flux and SD3 blocks at a small width in ComfyUI's Python (seconds). The workflow
checks run the tiny DiT files (``dit`` marker; Flux encodes every concept with the full random T5-XXL, ~50 s each on
one thread, so the concepts here are two).
"""
import json
import os
import subprocess
import textwrap

import pytest

from . import harness
from .prompts import CKPT, insert_model_node, node_id, stock_t2i_prompt, workflow_prompt

CONCEPTS = "toy, sky"
SAVE_LATENT = "900"  # the DiT workflows use the stock prompt's node ids for other nodes
SIZE, STEPS = 128, 2

STREAM_CHECK = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{comfy!r}, {repo!r}]
    from comfy.cli_args import args
    args.cpu = True
    import torch
    import comfy.ops
    from comfy.ldm.flux.layers import DoubleStreamBlock, EmbedND
    from comfy.ldm.modules.diffusionmodules.mmdit import JointBlock
    from core.concept_attention import FluxStream, MMDiTStream, block_step, heads_first

    ops = comfy.ops.disable_weight_init
    torch.manual_seed(0)

    def randomize(module):
        for name, p in module.named_parameters():
            norm = name.endswith("scale") or ".ln_" in name
            p.data = (1.0 if norm else 0.0) + 0.2 * torch.randn(p.shape)

    calls = []

    def capture(func, *a, **kw):
        out = func(*a, **kw)
        calls.append((a[1], a[2], out, bool(kw.get("skip_reshape")), int(a[3] if len(a) > 3 else kw["heads"])))
        return out

    def image_side(n_txt):
        k, v, out, head_major, heads = calls[0]
        if head_major:
            return k[:, :, n_txt:], v[:, :, n_txt:], out[:, n_txt:]
        return heads_first(k[:, n_txt:], heads), heads_first(v[:, n_txt:], heads), out[:, n_txt:]

    result = {{}}
    hidden, heads, n_txt, side = 64, 4, 6, 4
    img, txt, vec = torch.randn(2, side * side, hidden), torch.randn(2, n_txt, hidden), torch.randn(2, hidden)
    opts = {{"optimized_attention_override": capture}}
    with torch.no_grad():
        block = DoubleStreamBlock(hidden, heads, mlp_ratio=4.0, qkv_bias=True, operations=ops)
        randomize(block)
        ids = torch.zeros(2, n_txt + side * side, 3)
        ids[:, n_txt:, 1] = torch.arange(side).repeat_interleave(side).float()
        ids[:, n_txt:, 2] = torch.arange(side).repeat(side).float()
        pe = EmbedND(dim=hidden // heads, theta=10000, axes_dim=[4, 6, 6])(ids)
        _, txt_out = block(img.clone(), txt.clone(), vec, pe, transformer_options=opts)
        concepts, saliency = block_step(FluxStream, block, txt, vec, *image_side(n_txt))
        result["flux"] = float((concepts - txt_out).abs().max() / txt_out.abs().max())
        result["flux_saliency_rows"] = float((saliency.sum(-1) - 1).abs().max())
        for name, x_attn in (("sd3", False), ("sd35_mmdit_x", True)):
            calls.clear()
            block = JointBlock(hidden, heads, mlp_ratio=4.0, qkv_bias=True, attn_mode="torch", pre_only=False,
                               qk_norm="rms", x_block_self_attn=x_attn, operations=ops)
            randomize(block)
            txt_out, _ = block(txt.clone(), img.clone(), c=vec, transformer_options=opts)
            concepts, _ = block_step(MMDiTStream, block, txt, vec, *image_side(n_txt))
            result[name] = float((concepts - txt_out).abs().max() / txt_out.abs().max())
    print(json.dumps(result))
""")


def test_the_concept_stream_is_comfyuis_text_stream():
    """Concept tokens equal to the prompt's text tokens, attending over [their keys; the image keys] (= the joint
    keys), come out of ComfyUI's own Flux double block and SD3 / SD3.5 (MMDiT-X) joint blocks as the text stream:
    the stream reuses the text-stream weights, modulation and gates exactly, and Flux's text RoPE (ids 0) is the
    identity."""
    script = STREAM_CHECK.format(comfy=str(harness.comfyui_path()), repo=str(harness.REPO_ROOT))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("COMFYUI_OMP_NUM_THREADS", "1"))
    r = subprocess.run([harness.comfyui_python(), "-c", script], capture_output=True, text=True, env=env,
                       cwd=str(harness.comfyui_path()), timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["flux_saliency_rows"] < 1e-5
    for name in ("flux", "sd3", "sd35_mmdit_x"):  # max |difference| relative to the text stream's largest value
        assert got[name] < 1e-5, (name, got)


def test_unets_are_refused_with_a_clear_message(comfy_server):
    p = stock_t2i_prompt(harness.SD15_CKPT, seed=1, positive="a photo of a dog", prefix="ca_unet")
    p = insert_model_node(p, "20", "ConceptsRecordConceptAttention",
                          {"clip": [CKPT, 1], "concepts": "dog, sky", "blocks": "auto"})
    err = comfy_server.run_expect_error(p)
    assert "concept attention needs a diffusion transformer (Flux, SD3)" in json.dumps(err)


# ------------------------------------------------------------------------------------------------ tiny DiT files
def concept_prompt(family, concepts=CONCEPTS, words=""):
    """The family's heatmap workflow with Record Concept Attention in place of Record Cross-Attention, the
    sampled latent saved."""
    p = workflow_prompt(f"attention_heatmaps_{family}", None, size=SIZE, steps=STEPS)
    rec, heat = node_id(p, "ConceptsRecordAttention"), node_id(p, "ConceptsAttentionHeatmaps")
    ks = node_id(p, "KSampler")
    p[rec] = {"class_type": "ConceptsRecordConceptAttention",
              "inputs": {"model": p[rec]["inputs"]["model"], "clip": p[heat]["inputs"]["clip"], "concepts": concepts,
                         "blocks": "auto"}}
    p[heat]["inputs"]["words"] = words
    p[SAVE_LATENT] = {"class_type": "SaveLatent",
                      "inputs": {"samples": [ks, 0], "filename_prefix": f"latents/ca_{family}"}}
    return p


@pytest.mark.dit
def test_concept_recording_leaves_the_latent_unchanged_and_maps_every_concept(dit_server):
    family, server = dit_server
    p = concept_prompt(family)
    out = server.run(p)
    recorded = server.read_latent(harness.output_refs({SAVE_LATENT: out[SAVE_LATENT]}, "latents")[0])
    heat = node_id(p, "ConceptsAttentionHeatmaps")
    assert len(out.get(heat, {}).get("images", [])) == len(CONCEPTS.split(","))  # one overlay per concept

    rec, ks = node_id(p, "ConceptsRecordConceptAttention"), node_id(p, "KSampler")
    p[ks]["inputs"]["model"] = p[rec]["inputs"]["model"]  # the same run without the recording
    p = {k: v for k, v in p.items() if k in (ks, SAVE_LATENT) or v["class_type"] not in (
        "ConceptsRecordConceptAttention", "ConceptsAttentionHeatmaps", "SaveImage", "VAEDecode")}
    p[SAVE_LATENT]["inputs"]["filename_prefix"] = f"latents/ca_base_{family}"
    out = server.run(p)
    base = server.read_latent(harness.output_refs({SAVE_LATENT: out[SAVE_LATENT]}, "latents")[0])
    assert recorded.equal(base)


@pytest.mark.dit
def test_concept_heatmap_errors_say_what_to_fix(dit_server):
    family, server = dit_server
    err = json.dumps(server.run_expect_error(concept_prompt(family, words="cat")))
    assert "recorded concepts are: toy, sky" in err
    err = json.dumps(server.run_expect_error(concept_prompt(family, concepts="toy")))
    assert "at least two concepts" in err
