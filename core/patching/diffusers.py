"""The diffusers backend: residuals and LAG on a ``UNet2DConditionModel`` through the core's forward hooks."""
from __future__ import annotations

import torch

from .. import residuals as R
from .. import training
from ..extract import DEFAULT_SENTENCE
from ..heatmaps import step_bin
from ..hooks.gate import LowRankGate
from ..hooks.plan import cfg_plan
from ..layouts import diffusers_to_ldm_namer, family_from_config, find_sites
from ..tokens import find_subsequence, word_positions


def unet_sites(unet):
    """(site, module) for every transformer of a diffusers UNet, with ldm paths."""
    return find_sites(unet, diffusers_to_ldm_namer(unet.config.layers_per_block))


def unet_family(unet) -> str:
    return family_from_config(unet.config.cross_attention_dim, bool(unet.config.use_linear_projection))


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids


def concept_positions(tokenizer, prompt: str, words: list[str]) -> list[int]:
    """Prompt positions of every sub-token of ``words`` (e.g. the token V* and the class word)."""
    ids = token_ids(tokenizer, prompt)
    word_ids = {w: tokenizer(w, add_special_tokens=False).input_ids for w in words}
    return word_positions(ids, word_ids, prompt)


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = torch.tensor([token_ids(tokenizer, p) for p in prompts], device=text_encoder.device)
    return text_encoder(ids)[0]


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """images [N, H, W, 3] in [0, 1] -> scaled latents (the distribution's mean: deterministic)."""
    out = []
    for i in range(0, images.shape[0], batch):
        x = images[i:i + batch].permute(0, 3, 1, 2).to(vae.device, vae.dtype) * 2 - 1
        out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images [N, H, W, 3] in [0, 1]."""
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def train_residuals(unet, vae, tokenizer, text_encoder, images: torch.Tensor, class_word: str,
                    token: str = "sks", masks: torch.Tensor | None = None, resolution: int = 512,
                    views: int = 4, flip: bool = True, rank_ratio: float = R.DEFAULT_RANK_RATIO, fixed_rank: int = 0,
                    config: training.TrainConfig = training.TrainConfig(), prediction: str = "eps",
                    alphas_cumprod: torch.Tensor | None = None, progress=None, captions: list[str] | None = None):
    """Learn a residual set for a concept from ``images`` [N, H, W, 3]; returns (ResidualSet, losses).

    ``captions``: one prompt per image (each naming the token and the class word) instead of the paper's single
    "a photo of a V* <class>"; see ``training.image_prompts``."""
    masks = training.check_images(images, masks)
    sites = unet_sites(unet)
    prompts = training.image_prompts(token, class_word, captions, images.shape[0])
    for prompt in set(prompts):
        concept_positions(tokenizer, prompt, [token, class_word])  # fails early on a word the tokenizer drops
    meta = training.residual_metadata(unet_family(unet), class_word, token, config, resolution, prompts)
    rs = R.init_residuals([s for s, _ in sites], rank_ratio, fixed_rank, seed=config.seed,
                          device=unet.device, metadata=meta)
    view_images, view_masks = training.make_views(images, masks, resolution, views, config.seed, flip)
    latents = encode_images(vae, view_images).float()
    lat_masks = training.latent_masks(view_masks, latents.shape[-2:])
    context = encode_text(tokenizer, text_encoder, prompts)
    if len(prompts) > 1:
        context = context.repeat_interleave(views, 0)  # make_views keeps each image's views together
    ac = alphas_cumprod if alphas_cumprod is not None else training.scaled_linear_alphas_cumprod()
    unet.requires_grad_(False)

    def predict(x_t, t, ctx):
        return unet(x_t.to(unet.dtype), t, encoder_hidden_states=ctx).sample

    with LowRankGate(sites, rs):
        losses = training.train(rs.parameters(), predict, latents, context, ac, prediction, lat_masks, config,
                                progress)
    return rs.detached(), losses


@torch.no_grad()
def sample(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, latent_shape, steps: int = 20,
           guidance: float = 7.0, seed: int = 0, gate: LowRankGate | None = None, token_idx=None,
           recorder=None):
    """Classifier-free-guided sampling; with ``gate`` installed, every UNet call gets a CFG plan for LAG; with
    ``recorder`` (an installed ``core.heatmaps.AttentionRecorder``) the conditional rows' maps are recorded."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(latent_shape, generator=gen).to(unet.device, unet.dtype) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    b = latent_shape[0]
    context = torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)])
    if recorder is not None:
        recorder.record.reset()
        recorder.record.latent_hw = tuple(latent_shape[-2:])
        recorder.rows = {recorder.record.source_of(cond[0]): tuple(range(b, 2 * b))}
    for i, t in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        if recorder is not None:
            recorder.bin = step_bin(i / max(1, steps - 1), recorder.record.bins)
        if gate is not None:
            gate.plan = cfg_plan(2 * b, [1, 0], token_idx or [])
        eps_u, eps_c = unet(inp, t, encoder_hidden_states=context).sample.chunk(2)
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x


def noised(latents: torch.Tensor, fraction: float, alphas_cumprod: torch.Tensor, seed: int = 0):
    """(x_t, t): latents noised to the timestep at ``fraction`` of the schedule (0 = clean, 1 = pure noise)."""
    t = min(alphas_cumprod.shape[0] - 1, max(0, round(fraction * (alphas_cumprod.shape[0] - 1))))
    a = alphas_cumprod[t].to(latents)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise, torch.full((latents.shape[0],), t, device=latents.device)


@torch.no_grad()
def self_attention_masks(unet, vae, tokenizer, text_encoder, image: torch.Tensor, concepts: int = 0,
                         max_concepts: int = 4, noise_fraction: float = 0.3, seed: int = 0, prompt: str = "",
                         alphas_cumprod: torch.Tensor | None = None, noise_draws: int = 4,
                         record_all_layers: bool = False) -> torch.Tensor:
    """ConceptExpress-style masks [K, H, W] for one image [1, H, W, 3]: noise (``noise_draws`` draws, seeds
    ``seed``, ``seed + 1``, ...), one UNet call per draw, cluster the mean self-attention. Only the layers the grid uses
    are recorded unless ``record_all_layers``."""
    from ..extract import GRID_MAX_WIDTH, cluster_concepts, record_self_attention, resize_masks, self_attention_grid

    latents = encode_images(vae, image).float()
    ac = alphas_cumprod if alphas_cumprod is not None else training.scaled_linear_alphas_cumprod()
    ctx = encode_text(tokenizer, text_encoder, [prompt])
    latent_hw = tuple(latents.shape[-2:])
    max_width = None if record_all_layers else GRID_MAX_WIDTH

    def run_draw(draw):
        x_t, t = noised(latents, noise_fraction, ac, seed + draw)
        unet(x_t.to(unet.dtype), t, encoder_hidden_states=ctx)

    # sums over the draws; the grid divides by the counts
    sums, counts = record_self_attention(unet_sites(unet), latent_hw, run_draw, noise_draws, max_width)
    grid, hw = self_attention_grid(sums, counts, latent_hw)
    masks = cluster_concepts(grid[0], hw, concepts, max_concepts, seed)
    return resize_masks(masks, tuple(image.shape[1:3]))


def extract_concepts(unet, vae, tokenizer, text_encoder, image: torch.Tensor, masks: torch.Tensor,
                     tokens: list[str], class_words: list[str] | None = None, resolution: int = 512, views: int = 4,
                     flip: bool = True, config=None, rank_ratio: float = R.DEFAULT_RANK_RATIO, fixed_rank: int = 0,
                     prediction: str = "eps", alphas_cumprod: torch.Tensor | None = None, progress=None,
                     start_phrases: list[str] | None = None, sentence: str = DEFAULT_SENTENCE):
    """Learn one handle per mask (and shared residuals) from one image [1, H, W, 3] and masks [K, H, W].

    ``start_phrases``: candidate phrases ('a red circle', 'a dog'); each handle starts from the candidate row
    that best explains its mask (``core.extract.handle_search_losses``) instead of its own word's row.
    ``sentence``: what the concepts are learned in, '{}' for their words ('{} on a wooden table')."""
    import torch.nn.functional as F

    from ..extract import (
        ConceptSet,
        ExtractConfig,
        HandleAttention,
        check_masks,
        check_sentence,
        handle_search_losses,
        start_handles,
        subset_prompt,
        subsets,
        train_concepts,
        view_masks,
    )

    config = config or ExtractConfig()
    masks = check_masks(masks, tuple(image.shape[1:3]), len(tokens))
    sentence = check_sentence(sentence)
    class_words = class_words or [""] * len(tokens)
    phrases = [f"{t} {c}".strip() for t, c in zip(tokens, class_words, strict=True)]
    contexts, positions = {}, {}
    for sub in subsets(len(tokens)) if config.union_sampling else [tuple(range(len(tokens)))]:
        prompt = subset_prompt(phrases, sub, sentence)
        contexts[sub] = encode_text(tokenizer, text_encoder, [prompt]).float()
        positions[sub] = [concept_positions(tokenizer, prompt, [tokens[i]]) for i in sub]
    handles, contexts_i, positions_i = [], [], []  # each starts as its word's encoding in the sentence alone
    for i in range(len(tokens)):
        prompt = subset_prompt(phrases, (i,), sentence)
        ctx = encode_text(tokenizer, text_encoder, [prompt]).float()
        contexts_i.append(ctx)
        positions_i.append(concept_positions(tokenizer, prompt, [tokens[i]]))
        handles.append(ctx[0, positions_i[-1]].clone())
    sites = unet_sites(unet)
    rs = None
    if config.joint_steps > 0:
        meta = {"technique": "break-a-scene", "base_family": unet_family(unet), "token": ",".join(tokens),
                "class_word": ",".join(class_words)}
        rs = R.init_residuals([s for s, _ in sites], rank_ratio, fixed_rank, seed=config.seed, device=unet.device,
                              metadata=meta)
    view_images, vmasks = view_masks(training.make_views, image, masks, resolution, views, config.seed, flip)
    latents = encode_images(vae, view_images).float()
    lat_masks = F.interpolate(vmasks, size=latents.shape[-2:], mode="bilinear", align_corners=False)
    ac = alphas_cumprod if alphas_cumprod is not None else training.scaled_linear_alphas_cumprod()
    unet.requires_grad_(False)

    def predict(x_t, t, ctx):
        return unet(x_t.to(unet.dtype), t, encoder_hidden_states=ctx.to(unet.dtype)).sample

    chosen: list[str] = []
    if start_phrases:
        rows = candidate_rows(tokenizer, text_encoder, start_phrases, sentence)
        scores = [handle_search_losses(predict, latents, lat_masks[:, i:i + 1], contexts_i[i], positions_i[i], rows,
                                       ac, prediction) for i in range(len(tokens))]
        chosen = [start_phrases[j] for j in start_handles(handles, rows, scores)]
    gate = LowRankGate(sites, rs) if rs is not None else None
    try:
        if gate is not None:
            gate.install()
        with HandleAttention(sites) as att:
            losses = train_concepts(predict, latents, lat_masks, contexts, positions, handles,
                                    rs.parameters() if rs is not None else [], ac, prediction, config, att, progress)
    finally:
        if gate is not None:
            gate.remove()
    return ConceptSet(tokens, [h.detach() for h in handles], masks, rs.detached() if rs is not None else None,
                      list(class_words), losses, start_phrases=chosen, sentence=sentence)


def candidate_rows(tokenizer, text_encoder, phrases: list[str], sentence: str = DEFAULT_SENTENCE) -> torch.Tensor:
    """[C, D]: each phrase's last word's row in ``candidate_prompt(phrase, sentence)`` (the search's candidates)."""
    from ..extract import candidate_prompt

    rows = []
    for phrase in phrases:
        prompt, head = candidate_prompt(phrase, sentence)
        pos = concept_positions(tokenizer, head, [phrase.split()[-1]])
        rows.append(encode_text(tokenizer, text_encoder, [prompt]).float()[0, max(pos)])
    return torch.stack(rows)


def concept_context(tokenizer, text_encoder, concepts, prompt: str):
    """(conditioning [1, L, D] of ``prompt`` with the handles of the concepts it names, their token positions)."""
    from ..extract import insert_handles

    ctx = encode_text(tokenizer, text_encoder, [prompt]).float()
    ids = token_ids(tokenizer, prompt)
    present, pos = [], []
    for i, tok in enumerate(concepts.tokens):
        p = find_subsequence(ids, tokenizer(tok, add_special_tokens=False).input_ids)
        if p:
            present.append(i)
            pos.append(p)
    if not present:
        raise ValueError(f"the prompt \"{prompt}\" names none of the concepts {concepts.tokens}")
    return insert_handles(ctx, pos, [concepts.handles[i] for i in present]), sorted(x for p in pos for x in p)


def unet_modules(unet) -> dict:
    """{ldm module path: module} for every layer of a diffusers UNet a LoRA can target."""
    from ..lora_files import spec_from_diffusers_config, unet_module_map

    to_ldm, _ = unet_module_map(spec_from_diffusers_config(unet.config, unet_family(unet)))
    named = dict(unet.named_modules())
    return {ldm: named[d] for d, ldm in to_ldm.items() if d in named}
