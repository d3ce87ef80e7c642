"""The toy world's DiT base model: a diffusers ``SD3Transformer2DModel`` (MMDiT: joint attention over image and
text tokens, adaLN from the timestep and the pooled text) in pixel space, with the toy UNet's text encoder,
tokenizer, noise schedule, objective and sampler convention.

32x32x3 images in [-1, 1], patch 2 -> 16x16 = 256 image tokens; the prompt's 32 token states of the tiny CLIP text
encoder (``model.TEXT_DIM`` = 64) are the joint text tokens and its pooled output (the end token's state) feeds
the adaLN conditioning. Being a stock SD3 transformer, the pack's DiT backend (``core.patching.diffusers_dit``:
``dit_family``, ``dit_sites``, ``DiTTap``, ``cfg_call``) works on it unchanged. v-prediction on the UNet toy's
cosine schedule, sampled with the same DDIM scheduler ("trailing", 20 steps) and CFG convention as
``model.generate`` (``uncond + g * (cond - uncond)``, one noise seed for the batch). The transformer starts as
adaLN-Zero (DiT's initialisation: every block's modulation, the output modulation and the output projection are
zero), so each block starts as the identity.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from . import model as M
from . import scenes as S

DEFAULT_DIT_WEIGHTS = os.path.join(M.HERE, "weights", "base_dit.safetensors")
# pixel space, 256 image tokens + 32 text tokens in every block's joint attention; width 96 (3 heads of 32), 6 blocks,
# 1.96 M parameters: chosen over 64 x 8 blocks (1.19 M) on the validation split's loss after 250 steps at equal steps
DIT_CONFIG = dict(
    sample_size=S.SIZE, patch_size=2, in_channels=3, out_channels=3, num_layers=6, attention_head_dim=32,
    num_attention_heads=3, joint_attention_dim=M.TEXT_DIM, caption_projection_dim=96, pooled_projection_dim=M.TEXT_DIM,
    pos_embed_max_size=S.SIZE // 2, qk_norm="rms_norm",
)


def _zero_init(dit: nn.Module) -> None:
    """adaLN-Zero: the modulation layers (shift, scale, gate from the conditioning) and the output projection
    start at zero."""
    for block in dit.transformer_blocks:
        for norm in (block.norm1, block.norm1_context):
            nn.init.zeros_(norm.linear.weight)
            nn.init.zeros_(norm.linear.bias)
    nn.init.zeros_(dit.norm_out.linear.weight)
    nn.init.zeros_(dit.norm_out.linear.bias)
    nn.init.zeros_(dit.proj_out.weight)
    nn.init.zeros_(dit.proj_out.bias)


def build_dit(seed: int = 0, config: dict | None = None):
    """The SD3 transformer of ``config`` (default ``DIT_CONFIG``; the text projection's width follows the heads)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    cfg = dict(DIT_CONFIG, **(config or {}))
    cfg["caption_projection_dim"] = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    dit = SD3Transformer2DModel(**cfg)
    _zero_init(dit)
    return dit


def save_dit(dit, text_encoder, path: str, meta: dict | None = None) -> None:
    """fp16 safetensors: ``dit.*`` and ``text.*`` tensors, the transformer config in the metadata."""
    from safetensors.torch import save_file

    cfg = {k: dit.config[k] for k in DIT_CONFIG}
    meta = dict(meta or {}, dit_config=cfg)
    tensors = {f"dit.{k}": v.detach().half().contiguous() for k, v in dit.state_dict().items()}
    tensors.update({f"text.{k}": v.detach().half().contiguous() for k, v in text_encoder.state_dict().items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={"toyworld": json.dumps(meta)})


def load_dit(path: str = DEFAULT_DIT_WEIGHTS):
    """(transformer, text_encoder, tokenizer) in fp32, eval mode, from a file written by ``save_dit``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    sd = load_file(path)
    with safe_open(path, "pt") as f:
        meta = json.loads((f.metadata() or {}).get("toyworld", "{}"))
    tok = M.build_tokenizer()
    dit = build_dit(config=meta.get("dit_config"))
    te = M.build_text_encoder(len(tok))
    dit.load_state_dict({k[4:]: v.float() for k, v in sd.items() if k.startswith("dit.")})
    te.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("text.")}, strict=False)
    return dit.eval().requires_grad_(False), te.eval().requires_grad_(False), tok


def text_conditioning(text_encoder, ids: torch.Tensor) -> dict:
    """The DiT's conditioning keywords for token ids [N, L]: the token states and the pooled output."""
    out = text_encoder(ids)
    return {"encoder_hidden_states": out[0], "pooled_projections": out[1]}


def predict(dit, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The model's v-prediction for a batch (``t``: one timestep per row)."""
    return dit(hidden_states=x_t, timestep=t, return_dict=False, **cond)[0]


@torch.no_grad()
def generate_dit(dit, text_encoder, tokenizer, prompts: list[str], seed: int, steps: int = M.SAMPLE_STEPS,
                 guidance: float = M.GUIDANCE, gate=None, token_idx=None) -> torch.Tensor:
    """Images [N, H, W, 3] in [0, 1] for ``prompts``: ``model.generate``'s sampler (DDIM, v-prediction, trailing,
    the same initial noise for a seed) with the DiT backend's CFG call; with ``gate`` each call gets the CFG plan
    for LAG on ``token_idx``."""
    from core.patching.diffusers import token_ids
    from core.patching.diffusers_dit import cfg_call

    dev = next(dit.parameters()).device

    def conditioning(texts):
        ids = torch.tensor([token_ids(tokenizer, p) for p in texts], device=dev)
        return text_conditioning(text_encoder, ids)

    cond, uncond = conditioning(prompts), conditioning([""])
    c = dit.config
    shape = (len(prompts), c.in_channels, c.sample_size, c.sample_size)
    scheduler = M.build_scheduler()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dev) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        v_u, v_c = cfg_call(dit, inp, float(t), cond, uncond, gate, token_idx or ())
        x = scheduler.step(v_u + guidance * (v_c - v_u), t, x).prev_sample
    return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
