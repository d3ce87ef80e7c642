"""Concept extraction from one image: masks from self-attention clustering (ConceptExpress, Hao et al. 2024) or
from the user (Break-A-Scene, Avrahami et al. 2023), then one learned handle per mask plus shared residuals.

A *handle* is a learned vector for each sub-token of the concept's word, written over the text encoder's output
at that word's positions (the conditioning space: no gradient through the text encoder, and any prompt that holds
the word can carry it). Training follows Break-A-Scene: phase 1 the handles alone, phase 2 handles and the
pack's residuals; per step a random subset of the concepts ("union sampling"), the diffusion loss inside the
union of their masks, and optionally a loss pulling each handle's cross-attention toward its mask.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import token_indicator, token_mass, token_probabilities
from .hooks.tap import AttentionEvent, UNetTap
from .layouts import TransformerSite
from .masks import block_hw
from .residuals import ResidualSet
from .training import TrainingDivergedError, convert_prediction, diffusion_loss

HANDLE_TOKENS = ("sks", "ohwx", "zwx", "qxz", "vyk", "pqa")  # rare words, one per concept by default


class ExtractionError(ValueError):
    """The image, masks or settings cannot give the concepts asked for."""


# ----------------------------------------------------------------------------- masks from self-attention
GRID_MAX_WIDTH = 32  # self_attention_grid uses the finest layers no wider than this


class SelfAttentionRecorder:
    """Hooks on every transformer's self-attention (attn1) summing head-averaged probabilities per resolution.

    With ``latent_hw`` and ``max_width``, layers wider than ``max_width`` are skipped before their N x N map is
    computed (the grid never uses them; at 512 px on SD1.5 each 64-wide layer's map holds 4096² values per head).
    """

    def __init__(self, sites: list[tuple[TransformerSite, torch.nn.Module]], rows: tuple[int, ...] = (0,),
                 latent_hw: tuple[int, int] | None = None, max_width: int | None = None):
        self.sites = sites
        self.rows = rows
        self.latent_hw, self.max_width = latent_hw, max_width
        self.sums: dict[int, torch.Tensor] = {}  # positions -> [rows, N, N]
        self.counts: dict[int, int] = {}

    def __enter__(self):
        self._tap = UNetTap(self.sites, "self").listen(self._on_attention).install()
        return self

    def __exit__(self, *exc):
        self._tap.remove()

    def _too_wide(self, n: int) -> bool:
        return bool(self.max_width and self.latent_hw and block_hw(n, self.latent_hw)[1] > self.max_width)

    def _on_attention(self, ev: AttentionEvent) -> None:
        n = ev.image_tokens
        if self._too_wide(n):
            return
        with torch.no_grad():
            idx = torch.tensor(self.rows, device=ev.q.device)
            p = token_probabilities(ev.queries().index_select(0, idx), ev.keys().index_select(0, idx)).cpu()
            self.sums[n] = p if n not in self.sums else self.sums[n] + p
            self.counts[n] = self.counts.get(n, 0) + 1


def record_self_attention(sites, latent_hw: tuple[int, int], run_draw, draws: int,
                          max_width: int | None = GRID_MAX_WIDTH) -> tuple[dict, dict]:
    """(sums, counts) of ``SelfAttentionRecorder`` over ``run_draw(i)`` for each draw, skipping layers wider than
    ``max_width``; a model with no layer that narrow is recorded whole instead (draw 0 runs once more)."""
    with SelfAttentionRecorder(sites, latent_hw=latent_hw, max_width=max_width) as rec:
        for draw in range(max(1, draws)):
            run_draw(draw)
            if draw == 0 and not rec.sums and rec.max_width is not None:
                rec.max_width = None
                run_draw(0)
    return rec.sums, rec.counts


def self_attention_grid(sums: dict[int, torch.Tensor], counts: dict[int, int], latent_hw: tuple[int, int],
                        upsample: int = 2) -> tuple[torch.Tensor, tuple[int, int]]:
    """The finest layers' mean self-attention with queries on a finer grid: ([rows, Gq, N], grid hw).

    Only the layers at the finest resolution no wider than 32 count (coarser maps blur neighbouring objects into
    one cluster). Rows are distributions over that resolution's N keys; queries are resampled bilinearly to
    ``upsample`` x the attention grid (at most the latent's), so mask edges can fall between attention cells.
    Both choices and their toy-world measurements: docs/extract.md.
    """
    sizes = {n: block_hw(n, latent_hw) for n in sums}
    fitting = [hw for hw in sizes.values() if hw[1] <= GRID_MAX_WIDTH] or \
        [min(sizes.values(), key=lambda s: s[0] * s[1])]
    attn_hw = max(fitting, key=lambda s: s[0] * s[1])
    layers = [n for n in sums if sizes[n] == attn_hw]
    p = sum((sums[n] / counts[n]).float() for n in layers) / len(layers)  # [rows, N queries, N keys]
    grid_hw = (min(latent_hw[0], attn_hw[0] * upsample), min(latent_hw[1], attn_hw[1] * upsample))
    rows, n = p.shape[0], p.shape[-1]
    if grid_hw != attn_hw:
        q = p.transpose(1, 2).reshape(rows * n, 1, *attn_hw)  # keys as channels, queries as the image
        q = F.interpolate(q, size=grid_hw, mode="bilinear", align_corners=False)
        p = q.reshape(rows, n, grid_hw[0] * grid_hw[1]).transpose(1, 2)
    p = p.clamp_min(0)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-12), grid_hw


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iters: int = 50) -> torch.Tensor:
    """Labels [G] of k-means on points [G, D] (k-means++ seeding from ``seed``; deterministic)."""
    g = points.shape[0]
    if k > g:
        raise ExtractionError(f"cannot make {k} clusters from {g} positions")
    gen = torch.Generator().manual_seed(seed)
    centres = [points[int(torch.randint(0, g, (), generator=gen))]]
    for _ in range(1, k):
        d = torch.cdist(points, torch.stack(centres)).amin(1) ** 2
        if float(d.sum()) <= 0:
            centres.append(points[int(torch.randint(0, g, (), generator=gen))])
        else:
            centres.append(points[int(torch.multinomial(d / d.sum(), 1, generator=gen))])
    c = torch.stack(centres)
    labels = torch.cdist(points, c).argmin(1)
    for _ in range(iters):
        for j in range(k):
            members = points[labels == j]
            if len(members):
                c[j] = members.mean(0)
        new = torch.cdist(points, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def silhouette(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette coefficient (Rousseeuw 1987) of a clustering; -1 when it has a single cluster."""
    ids = labels.unique()
    if len(ids) < 2:
        return -1.0
    d = torch.cdist(points, points)
    own = torch.stack([d[:, labels == j].mean(1) for j in ids], 1)  # [G, K] mean distance to each cluster
    sizes = torch.stack([(labels == j).sum() for j in ids]).float()
    col = (labels[:, None] == ids[None]).float().argmax(1)
    a = own.gather(1, col[:, None])[:, 0] * sizes[col] / (sizes[col] - 1).clamp_min(1)
    own_masked = own.scatter(1, col[:, None], float("inf"))
    b = own_masked.amin(1)
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    s[sizes[col] <= 1] = 0
    return float(s.mean())


def background_cluster(labels: torch.Tensor, hw: tuple[int, int]) -> int:
    """The cluster holding most of the image border (our background rule; ConceptExpress filters it too)."""
    grid = labels.reshape(hw)
    border = torch.cat([grid[0], grid[-1], grid[:, 0], grid[:, -1]])
    return int(torch.bincount(border, minlength=int(labels.max()) + 1).argmax())


def cluster_concepts(attn: torch.Tensor, hw: tuple[int, int], concepts: int = 0, max_concepts: int = 4,
                     seed: int = 0, min_fraction: float = 0.01) -> torch.Tensor:
    """Concept masks [K, h, w] (0/1) from one image's self-attention rows [G, N]: k-means on the rows'
    Hellinger embedding (sqrt of each distribution) into ``concepts`` + 1 clusters, the background cluster
    dropped. ``concepts=0`` picks the count in 1..max_concepts with the best silhouette. Masks are ordered left
    to right by centre of mass."""
    points = attn.clamp_min(0).sqrt()
    if concepts < 0 or max_concepts < 1:
        raise ExtractionError("the number of concepts must be >= 0 (0 = automatic) and max_concepts >= 1")
    if concepts + 1 > points.shape[0]:
        raise ExtractionError(f"asked for {concepts} concepts but the image gives only {points.shape[0]} attention "
                              "positions; use a larger image or ask for fewer concepts")
    max_concepts = min(max_concepts, points.shape[0] - 1)
    if concepts == 0:
        scored = []
        for k in range(1, max_concepts + 1):
            labels = kmeans(points, k + 1, seed)
            scored.append((silhouette(points, labels), k, labels))
        _, concepts, labels = max(scored, key=lambda s: s[0])
    else:
        labels = kmeans(points, concepts + 1, seed)
    bg = background_cluster(labels, hw)
    keep = [j for j in range(concepts + 1) if j != bg]
    masks = torch.stack([(labels == j).float().reshape(hw) for j in keep])
    area = masks.flatten(1).mean(1)
    if bool((area < min_fraction).any()):
        raise ExtractionError(
            f"asked for {concepts} concepts but the image's self-attention gives only "
            f"{int((area >= min_fraction).sum())} distinct regions besides the background; "
            "ask for fewer concepts or set 0 (automatic)")
    xs = torch.arange(hw[1], dtype=torch.float32)
    centre = (masks.sum(1) * xs).sum(1) / masks.sum((1, 2))
    return masks[centre.argsort()]


def resize_masks(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[K, h, w] -> [K, H, W] by nearest neighbour (masks stay 0/1)."""
    return F.interpolate(masks[:, None].float(), size=hw, mode="nearest")[:, 0]


def check_masks(masks: torch.Tensor | None, image_hw: tuple[int, int], concepts: int | None = None) -> torch.Tensor:
    """Validate user masks [K, H, W] for one image: same size as the image, none empty, K concepts if given."""
    if masks is None or masks.ndim != 3 or masks.shape[0] == 0:
        raise ExtractionError("give one mask per concept (a MASK batch)")
    if tuple(masks.shape[1:]) != tuple(image_hw):
        raise ExtractionError(f"the masks are {tuple(masks.shape[1:])} but the image is {tuple(image_hw)}: "
                              "draw the masks on this image (or resize them to it)")
    empty = [i for i in range(masks.shape[0]) if float(masks[i].max()) <= 0]
    if empty:
        raise ExtractionError(f"mask(s) {empty} are empty: every concept needs some pixels")
    if concepts is not None and masks.shape[0] != concepts:
        raise ExtractionError(f"{masks.shape[0]} masks for {concepts} concept names: give one name per mask")
    return masks.float().clamp(0, 1)


# ----------------------------------------------------------------------------- handles and training
DEFAULT_SENTENCE = "a photo of {}"  # Break-A-Scene's; '{}' is where the concepts' words go


@dataclass
class ConceptSet:
    """Extracted concepts: a word and a handle [sub-tokens, D] per concept, masks [K, H, W], shared residuals."""

    tokens: list[str]
    handles: list[torch.Tensor]
    masks: torch.Tensor | None = None
    residuals: ResidualSet | None = None
    class_words: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    family: str = ""
    start_phrases: list[str] = field(default_factory=list)  # the candidate each handle started from (empty: none)
    sentence: str = DEFAULT_SENTENCE  # the sentence the concepts were learned in

    def phrase(self, i: int) -> str:
        cw = self.class_words[i] if i < len(self.class_words) else ""
        return f"{self.tokens[i]} {cw}".strip()


def concept_tokens(text: str, count: int) -> list[str]:
    """The concepts' words: the user's comma-separated list, or the default rare words."""
    given = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not given:
        if count > len(HANDLE_TOKENS):
            raise ExtractionError(f"at most {len(HANDLE_TOKENS)} concepts have default words; name the others")
        return list(HANDLE_TOKENS[:count])
    if len(given) != count:
        raise ExtractionError(f"{len(given)} words for {count} concepts: give one word per concept")
    if len(set(given)) != count:
        raise ExtractionError("each concept needs its own word")
    return given


def check_sentence(sentence: str | None) -> str:
    """The sentence concepts are learned in, '{}' marking their words once; empty: Break-A-Scene's."""
    text = (sentence or "").strip() or DEFAULT_SENTENCE
    if text.count("{}") != 1:
        raise ExtractionError(f"the sentence {text!r} needs exactly one {{}} where the concepts' words go, "
                              "e.g. 'a photo of {}' or '{} on a wooden table'")
    return text


def subset_prompt(phrases: list[str], subset: tuple[int, ...], sentence: str = DEFAULT_SENTENCE) -> str:
    """The prompt for a subset of concepts: the sentence around '<a> and <b>' (Break-A-Scene: 'a photo of {}')."""
    return sentence.replace("{}", " and ".join(phrases[i] for i in subset))


def subsets(count: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of the concepts (union sampling draws from these)."""
    return [s for r in range(1, count + 1) for s in itertools.combinations(range(count), r)]


def insert_handles(context: torch.Tensor, positions: list[list[int]], handles: list[torch.Tensor]) -> torch.Tensor:
    """context [B, L, D] with each handle's rows written at its positions (out of place, differentiable).

    A handle with fewer rows than positions (the word occurs twice) is repeated."""
    out = context.clone()
    for pos, h in zip(positions, handles, strict=True):
        if pos:
            rows = h.to(out.dtype).repeat(math.ceil(len(pos) / h.shape[0]), 1)[:len(pos)]
            out[:, pos] = rows.expand(out.shape[0], -1, -1)
    return out


def masked_union_loss(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor,
                      subset: tuple[int, ...]) -> torch.Tensor:
    """The diffusion loss inside the union of the subset's masks [B, K, h, w] (Break-A-Scene's masked loss)."""
    return diffusion_loss(pred, target, masks[:, list(subset)].amax(1, keepdim=True))


def attention_alignment_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Break-A-Scene's cross-attention loss: MSE between each map [B, K, N] scaled to a maximum of 1 and its mask."""
    scaled = maps / maps.amax(-1, keepdim=True).clamp_min(1e-8)
    return F.mse_loss(scaled, masks.to(scaled))


class HandleAttention:
    """Cross-attention maps of the handles' positions with gradients, one [B, K, N] tensor per block, for the
    alignment loss (a listener on the UNet's attention tap, ``core.hooks.tap``)."""

    def __init__(self, sites: list[tuple[TransformerSite, torch.nn.Module]]):
        self.sites = sites
        self.positions: list[list[int]] = []
        self.maps: list[torch.Tensor] = []

    def __enter__(self):
        self._tap = UNetTap(self.sites).listen(self._on_attention, lambda: bool(self.positions)).install()
        return self

    def __exit__(self, *exc):
        self._tap.remove()

    def _on_attention(self, ev: AttentionEvent) -> None:
        qh, kh = ev.queries(), ev.keys()
        heads = qh.shape[1]
        per = [token_mass(qh, kh, token_indicator(torch.tensor(p, device=qh.device), heads, kh.shape[2], kh.shape[3],
                                                  kh)) / heads for p in self.positions]
        self.maps.append(torch.stack(per, 1))  # [B, K, N]


@dataclass
class ExtractConfig:
    handle_steps: int = 100  # phase 1: handles alone
    joint_steps: int = 150  # phase 2: handles and residuals (0: handles only, as ConceptExpress)
    handle_lr: float = 5e-3
    joint_handle_lr: float = 5e-4
    residual_lr: float = 1e-3
    batch_size: int = 2
    attention_weight: float = 0.01  # Break-A-Scene's lambda_attn; 0 turns the alignment loss off
    union_sampling: bool = True
    seed: int = 0


def train_concepts(predict, latents: torch.Tensor, masks: torch.Tensor, contexts: dict[tuple[int, ...], torch.Tensor],
                   positions: dict[tuple[int, ...], list[list[int]]], handles: list[torch.Tensor],
                   residual_params: list[torch.Tensor], alphas_cumprod: torch.Tensor, prediction: str = "eps",
                   config: ExtractConfig = ExtractConfig(), attention: HandleAttention | None = None,
                   progress=None) -> list[float]:
    """Break-A-Scene's two-phase training; returns the loss per step.

    latents [V, C, h, w] (views of the one image); masks [V, K, h, w] at latent size; ``contexts[subset]`` the
    encoded subset prompt [1, L, D] and ``positions[subset]`` each member's token positions in it;
    ``predict(x_t, t, context)`` the model's output of type ``prediction`` (residuals already hooked in).
    """
    k = masks.shape[1]
    gen = torch.Generator().manual_seed(config.seed)
    device = latents.device
    ac = alphas_cumprod.to(device=device, dtype=torch.float32)
    choices = subsets(k) if config.union_sampling else [tuple(range(k))]
    for h in handles:
        h.requires_grad_(True)
    losses: list[float] = []
    total = config.handle_steps + config.joint_steps
    phase = None
    opt = None
    for step in range(total):
        joint = step >= config.handle_steps
        if phase != joint:
            phase = joint
            groups = [{"params": handles, "lr": config.joint_handle_lr if joint else config.handle_lr}]
            if joint and residual_params:
                for p in residual_params:
                    p.requires_grad_(True)
                groups.append({"params": residual_params, "lr": config.residual_lr})
            opt = torch.optim.AdamW(groups, weight_decay=0.0)
        subset = choices[int(torch.randint(0, len(choices), (), generator=gen))]
        views = torch.randint(0, latents.shape[0], (config.batch_size,), generator=gen)
        x0 = latents[views]
        noise = torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
        t = torch.randint(0, ac.shape[0], (len(views),), generator=gen).to(device)
        a = ac[t]
        x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
        ctx = insert_handles(contexts[subset].to(device), positions[subset], [handles[i] for i in subset])
        ctx = ctx.expand(len(views), -1, -1)
        if attention is not None:
            attention.positions = positions[subset] if config.attention_weight > 0 else []
            attention.maps = []
        pred = convert_prediction(predict(x_t, t, ctx), prediction, "eps", x_t, a)
        loss = masked_union_loss(pred, noise, masks[views], subset)
        if attention is not None and attention.maps:
            per_block = []
            for m in attention.maps:
                hw = block_hw(m.shape[-1], tuple(x0.shape[-2:]))
                target = F.interpolate(masks[views][:, list(subset)], size=hw, mode="bilinear", align_corners=False)
                per_block.append(attention_alignment_loss(m, target.flatten(2)))
            loss = loss + config.attention_weight * torch.stack(per_block).mean()
        if not math.isfinite(loss.item()):
            raise TrainingDivergedError(f"the extraction loss became {loss.item()} at step {step + 1}: lower the "
                                        "learning rates or train in fp32")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, total, losses[-1])
    for p in list(handles) + list(residual_params):
        p.requires_grad_(False)
    return losses


SEARCH_FRACTIONS = (0.3, 0.5, 0.7, 0.9)  # noise levels the handle search scores at (toy validation: 300-900 of 1000)
SEARCH_DRAWS = 2  # fixed noises per level: a candidate costs len(SEARCH_FRACTIONS) * SEARCH_DRAWS model calls


def candidate_prompt(phrase: str, sentence: str = DEFAULT_SENTENCE) -> tuple[str, str]:
    """(the prompt a candidate phrase is encoded in, that prompt cut after the phrase). The phrase's last word's
    row is the candidate ('a red circle' -> the row of 'circle' in 'a photo of a red circle', which has read the
    words before it); its position is found in the cut prompt, so a word the sentence repeats later is skipped."""
    head = sentence.split("{}")[0] + phrase.strip()
    return sentence.replace("{}", phrase.strip()), head


def candidate_phrases(text: str) -> list[str]:
    """The comma-separated candidate phrases of the search (empty: no search)."""
    return [p.strip() for p in (text or "").split(",") if p.strip()]


@torch.no_grad()
def handle_search_losses(predict, latents: torch.Tensor, mask: torch.Tensor, context: torch.Tensor,
                         positions: list[int], rows: torch.Tensor, alphas_cumprod: torch.Tensor,
                         prediction: str = "eps", fractions: tuple[float, ...] = SEARCH_FRACTIONS,
                         draws: int = SEARCH_DRAWS, seed: int = 99, progress=None) -> torch.Tensor:
    """Masked diffusion loss [C] of each candidate row [C, D] written at the concept's ``positions`` of
    ``context`` [1, L, D]: summed over ``fractions`` of the schedule and ``draws`` fixed noises, on all views
    ``latents`` [V, C, h, w] inside ``mask`` [V, 1, h, w]. Every candidate sees the same noise (a paired
    comparison); the lowest loss is the base model's own conditioning that best explains the masked object."""
    device = latents.device
    ac = alphas_cumprod.to(device=device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    noises = [torch.randn(latents.shape, generator=gen).to(device, latents.dtype) for _ in range(draws)]
    steps = [min(ac.shape[0] - 1, max(0, round(f * (ac.shape[0] - 1)))) for f in fractions]
    losses = torch.zeros(rows.shape[0])
    done, total = 0, rows.shape[0] * len(steps) * len(noises)
    for c in range(rows.shape[0]):
        ctx = insert_handles(context.to(device), [positions], [rows[c:c + 1].to(device)])
        ctx = ctx.expand(latents.shape[0], -1, -1)
        for step in steps:
            t = torch.full((latents.shape[0],), step, device=device, dtype=torch.long)
            a = ac[t]
            for noise in noises:
                x_t = a.sqrt().view(-1, 1, 1, 1) * latents + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
                pred = convert_prediction(predict(x_t, t, ctx), prediction, "eps", x_t, a)
                losses[c] += float(diffusion_loss(pred, noise, mask))
                done += 1
                if progress is not None:
                    progress(done, total, None)
    if not bool(torch.isfinite(losses).all()):
        raise TrainingDivergedError("the handle search's losses are not finite: check the model and the image")
    return losses


def start_handles(handles: list[torch.Tensor], rows: torch.Tensor, scores: list[torch.Tensor]) -> list[int]:
    """Overwrite each handle [n, D] with the candidate row of lowest score (every sub-token row gets it); returns
    the chosen candidates' indices."""
    chosen = []
    for h, s in zip(handles, scores, strict=True):
        best = int(s.argmin())
        with torch.no_grad():
            h.copy_(rows[best].to(h).expand_as(h))
        chosen.append(best)
    return chosen


def view_masks(make_views, image: torch.Tensor, masks: torch.Tensor, resolution: int, views: int, seed: int,
               flip: bool):
    """Views of one image [1, H, W, 3] and its K masks: the same crops for every mask (same seed).

    Returns (views [V, res, res, 3], masks [V, K, res, res])."""
    per = [make_views(image, masks[i:i + 1], resolution, views, seed, flip) for i in range(masks.shape[0])]
    return per[0][0], torch.stack([m for _, m in per], 1)


HANDLE_KEY = "concepts.handle."


def save_concepts(concepts: ConceptSet, path: str, overwrite: bool = False) -> str:
    """One safetensors file: the shared residuals under generic LoRA keys (stock loaders read them; they log the
    handle keys as not loaded), each handle under ``concepts.handle.<i>``, words and family in the metadata.
    Refuses to replace an existing file unless ``overwrite``; written atomically."""
    import json
    import os

    from .file_checks import save_atomic
    from .residuals import to_state_dict

    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or enable 'overwrite'")
    sd = to_state_dict(concepts.residuals) if concepts.residuals is not None else {}
    sd.update({f"{HANDLE_KEY}{i}": h.detach().float().cpu().contiguous() for i, h in enumerate(concepts.handles)})
    meta = dict(concepts.residuals.metadata) if concepts.residuals is not None else {}
    meta.update({"technique": "concept-set", "tokens": json.dumps(concepts.tokens),
                 "class_words": json.dumps(concepts.class_words), "base_family": concepts.family,
                 "start_phrases": json.dumps(concepts.start_phrases), "sentence": concepts.sentence})
    save_atomic(sd, path, {k: str(v) for k, v in meta.items()})
    return path


def load_concepts(path: str) -> ConceptSet:
    """The concept set ``save_concepts`` wrote (masks and losses are not stored); ``BrokenFileError`` naming the
    file when it is unreadable, truncated, holds NaN/Inf, is another kind of file or its metadata is missing or
    contradicts its tensors."""
    from .file_checks import EDITED, broken, check_factors, metadata_json, read_checked
    from .residuals import check_rank_metadata, check_residual_keys, from_state_dict

    kind = "concept file"
    sd, meta = read_checked(path, kind)
    technique = meta.get("technique")
    if technique != "concept-set":
        said = f"its metadata says technique '{technique}'" if technique else "its metadata names no technique"
        raise broken(path, kind, f"is not a concept set saved by Save Concepts ({said})",
                     "load residual, slider or erase files with Load Residuals, or pick a file Save Concepts wrote")
    tokens = metadata_json(meta, "tokens", path, kind)
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        raise broken(path, kind, f"has a 'tokens' metadata entry that is not a list of words "
                                 f"({meta['tokens'][:60]!r})", EDITED)
    lists = {k: metadata_json(meta, k, path, kind, required=False, default=[])
             for k in ("class_words", "start_phrases")}
    for key, value in lists.items():
        if not isinstance(value, list):
            raise broken(path, kind, f"has a '{key}' metadata entry that is not a list",
                         EDITED)
    stored = sorted(k for k in sd if k.startswith(HANDLE_KEY))
    expect = [f"{HANDLE_KEY}{i}" for i in range(len(tokens))]
    if stored != sorted(expect):
        raise broken(path, kind, f"has contradictory metadata: it names {len(tokens)} token(s) but holds "
                                 f"{len(stored)} handle(s) ({', '.join(stored) or 'none'})",
                     EDITED)
    handles = [sd[k] for k in expect]
    widths = {tuple(h.shape[1:]) for h in handles}
    if any(h.dim() != 2 or h.shape[0] == 0 for h in handles) or len(widths) > 1:
        raise broken(path, kind, "has handles that are not [sub-tokens, width] matrices of one width ("
                                 + ", ".join(str(tuple(h.shape)) for h in handles) + ")",
                     EDITED)
    lora = {k: v for k, v in sd.items() if not k.startswith(HANDLE_KEY)}
    residuals = None
    if lora:
        check_factors(lora, path, kind)
        check_residual_keys(lora, {}, path, kind)
        rmeta = {k: v for k, v in meta.items() if k not in ("tokens", "class_words", "technique", "start_phrases",
                                                       "sentence")}
        residuals = from_state_dict(lora, rmeta)
        check_rank_metadata(residuals, path, kind)
    return ConceptSet(tokens, handles, None, residuals, lists["class_words"], [], meta.get("base_family", ""),
                      lists["start_phrases"], meta.get("sentence", DEFAULT_SENTENCE))
