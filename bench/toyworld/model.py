"""The toy world's base model: a diffusers ``UNet2DConditionModel`` (cross-attention transformers, so the core
patches it unchanged), a tiny CLIP text encoder and the toy vocabulary's tokenizer.

The committed model runs in pixel space (``PixelVAE``, the identity, stands in where the core expects a VAE); a
latent-space variant runs on the pixel-unshuffled image, [3, 32, 32] -> [12, 16, 16], exactly invertible
(``ShuffleVAE``); ``vae_for(unet)`` picks the shim. The file's metadata carries the UNet config. v-prediction on a
cosine schedule; sampled with DDIM, "trailing" timesteps, CFG. The UNet's first convolution also adds a learned
per-position embedding (``PosConv``), so that place words have something to bind to.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from types import SimpleNamespace

import torch
from torch import nn

from core.toy_models import tiny_tokenizer

from . import scenes as S

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WEIGHTS = os.path.join(HERE, "weights", "base.safetensors")
# a variant of the fourth version: the fourth continued on captions that sometimes leave the colour out, so that a class
# word alone ("a sks shape") draws an object (see the toy README); not yet the default, every table names its file
COLOURLESS_WEIGHTS = os.path.join(HERE, "weights", "base_colourless.safetensors")
MAX_LENGTH = 32
TEXT_DIM = 64
UNET_CONFIG = dict(  # the committed model: pixel space, cross-attention at 16² and 8²
    sample_size=S.SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
    norm_num_groups=8, cross_attention_dim=TEXT_DIM, attention_head_dim=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
SHUFFLE = 2  # pixel-unshuffle factor of the latent-space variant
# the latent-space variant (``train_base --unet shuffle``): [3, 32, 32] -> [12, 16, 16], cross-attention at 8² and
# 4²; tried, learned slower than pixel space per minute (bench/toyworld/README.md)
SHUFFLE_UNET_CONFIG = dict(
    UNET_CONFIG, sample_size=S.SIZE // SHUFFLE, in_channels=3 * SHUFFLE ** 2, out_channels=3 * SHUFFLE ** 2,
    block_out_channels=(64, 128, 128), norm_num_groups=16, attention_head_dim=4,
)
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
GUIDANCE = 1.25  # chosen on the validation split (bench/toyworld/README.md): stronger CFG draws stray objects
SAMPLE_STEPS = 20


class PosConv(nn.Conv2d):
    """conv_in plus a learned [C, H, W] embedding of the pixel's place (interpolated if the size differs)."""

    def __init__(self, conv: nn.Conv2d, size: int):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
        self.load_state_dict(conv.state_dict())
        self.pos = nn.Parameter(torch.zeros(conv.out_channels, size, size))

    def forward(self, x):
        out = super().forward(x)
        pos = self.pos
        if pos.shape[-2:] != out.shape[-2:]:
            pos = nn.functional.interpolate(pos[None], size=out.shape[-2:], mode="bilinear", align_corners=False)[0]
        return out + pos.to(out.dtype)


def build_tokenizer():
    """The toy vocabulary, one token per word. ``tiny_tokenizer``'s whole-word merges can collide (a shorter
    word's merge fires first), so words go longest first and any word that still splits moves to the front."""
    order = sorted(S.VOCABULARY, key=lambda w: (-len(w), w))
    for _ in range(len(order)):
        tok = tiny_tokenizer(order, max_length=MAX_LENGTH)
        split = [w for w in order if len(tok(w, add_special_tokens=False).input_ids) != 1]
        if not split:
            return tok
        order = split + [w for w in order if w not in split]
    raise RuntimeError(f"no merge order gives one token per word; still split: {split}")


def build_text_encoder(vocab_size: int, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModel(cfg)


def build_unet(seed: int = 0, config: dict | None = None):
    """The UNet of ``config`` (default ``UNET_CONFIG``); saved weights carry their config in the metadata."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = dict(UNET_CONFIG, **(config or {}))
    unet = UNet2DConditionModel(**cfg)
    unet.conv_in = PosConv(unet.conv_in, cfg["sample_size"])
    return unet


def train_alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE).alphas_cumprod.float()


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=True,
                         set_alpha_to_one=True)


def unshuffle(x: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] -> [N, 12, H/2, W/2] (pixel-unshuffle: lossless)."""
    return nn.functional.pixel_unshuffle(x, SHUFFLE)


def shuffle(z: torch.Tensor) -> torch.Tensor:
    """The exact inverse of ``unshuffle``."""
    return nn.functional.pixel_shuffle(z, SHUFFLE)


def to_latents(x: torch.Tensor, unet=None) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> the latents of ``unet``'s space (default: the committed model's):
    the images themselves in pixel space, ``unshuffle(x)`` in the latent-space variant."""
    channels = unet.config.in_channels if unet is not None else UNET_CONFIG["in_channels"]
    return x if channels == 3 else unshuffle(x)


def from_latents(z: torch.Tensor) -> torch.Tensor:
    """Latents of either space -> images [N, 3, H, W] in [-1, 1] (3 channels: already pixels)."""
    return z if z.shape[1] == 3 else shuffle(z)


class PixelVAE:
    """The identity in place of a VAE for ``core.patching.diffusers`` (encode_images / decode_latents)."""

    def __init__(self, device="cpu", dtype=torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.config = SimpleNamespace(scaling_factor=1.0)

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        return SimpleNamespace(sample=z)


class ShuffleVAE:
    """Pixel-unshuffle in place of a VAE for ``core.patching.diffusers`` (encode_images / decode_latents)."""

    def __init__(self, device="cpu", dtype=torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.config = SimpleNamespace(scaling_factor=1.0)

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=unshuffle(x)))

    def decode(self, z):
        return SimpleNamespace(sample=shuffle(z))


def vae_for(unet):
    """The VAE shim of ``unet``'s space: pixels (3 channels) or pixel-unshuffled latents."""
    return PixelVAE() if unet.config.in_channels == 3 else ShuffleVAE()


VAE = PixelVAE if UNET_CONFIG["in_channels"] == 3 else ShuffleVAE  # the committed model's shim


def save(unet, text_encoder, path: str, meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    cfg = {k: unet.config[k] for k in UNET_CONFIG}
    meta = dict(meta or {}, unet_config=cfg)
    tensors = {f"unet.{k}": v.detach().half().contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"text.{k}": v.detach().half().contiguous() for k, v in text_encoder.state_dict().items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={"toyworld": json.dumps(meta)})


def load(path: str = DEFAULT_WEIGHTS):
    """(unet, text_encoder, tokenizer) in fp32, eval mode, from a file written by ``save``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    sd = load_file(path)
    with safe_open(path, "pt") as f:
        meta = json.loads((f.metadata() or {}).get("toyworld", "{}"))
    tok = build_tokenizer()
    unet = build_unet(config=meta.get("unet_config"))
    te = build_text_encoder(len(tok))
    unet.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("unet.")})
    te.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("text.")}, strict=False)
    return unet.eval().requires_grad_(False), te.eval().requires_grad_(False), tok


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: str = os.path.join(HERE, "weights")) -> str:
    """(Re)write ``SHA256SUMS`` for the committed weight files in ``folder``; the CI test compares against it."""
    names = [n for n in ("base.safetensors", "base_colourless.safetensors", "judge.safetensors")
             if os.path.exists(os.path.join(folder, n))]
    path = os.path.join(folder, "SHA256SUMS")
    with open(path, "w") as f:
        f.writelines(f"{sha256(os.path.join(folder, n))}  {n}\n" for n in names)
    return path


@torch.no_grad()
def generate(unet, text_encoder, tokenizer, prompts: list[str], seed: int, steps: int = SAMPLE_STEPS,
             guidance: float = GUIDANCE, gate=None, token_idx=None) -> torch.Tensor:
    """Images [N, H, W, 3] in [0, 1] for ``prompts`` through the core's CFG sampler (one seed for the batch)."""
    from core.patching.diffusers import encode_text, sample

    cond = encode_text(tokenizer, text_encoder, prompts)
    uncond = encode_text(tokenizer, text_encoder, [""])
    c = unet.config
    z = sample(unet, build_scheduler(), cond, uncond, (len(prompts), c.in_channels, c.sample_size, c.sample_size),
               steps=steps, guidance=guidance, seed=seed, gate=gate, token_idx=token_idx)
    x = from_latents(z.float())
    return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
