"""Composition on the toy world: two learned concepts in one prompt, one command.

    python -m bench.toyworld.measure_compose [--steps 300] [--json bench/toyworld/results/compose.json]

Concept A = the held-out yellow plain ring (token ``sks``), concept B = a purple checkered square (the held-out
texture; token ``zwx``), each learned with the pack's trainer from 4 renders (seeds 70,000,000+ and 71,000,000+).
``--concepts known`` learns two objects the base model can draw instead (a yellow striped diamond, a purple plain
square; same seeds), to measure the composition itself where the new shape and texture are out of reach.
Prompt: "a sks shape and a zwx shape on a <background> background" (A named first, so A belongs on the left).
Rows: both residuals global; multi-concept LAG (``core.regions``: each residual gated by its own token's
cross-attention, larger attention wins); region-limited LoRAs (each residual limited to a drawn half: A left,
B right); a diagnosis, A's residual alone on the left half (does the base model's right object survive it?);
the concepts named in the base model's own words, no residual (the ceiling: "a yellow striped diamond
and a purple square on …"); and, for comparison, the hook-based way (not one prompt, not one pass): one prompt
per half ("a sks shape on the left on a ⟨bg⟩ background", "a zwx shape on the right …"), each predicted in its
own UNet call with its own residual, blended by the half masks (what ComfyUI's masked conditionings with hook
LoRAs compute). ``--custom-diffusion`` adds two rows: each concept learned as Custom Diffusion K/V updates (the
pack's node: rank 16 on every attn2 to_k / to_v, same renders, prompts, steps and seed), the two summed, and the
two merged in closed form (``core.compose``; constraints: each concept's token and class word rows in its
training prompts; kept: every row of 24 base captions of scenes 90,000,000+). ``--cut-mix STEPS`` adds two
rows: both residuals fine-tuned together for STEPS on Cut-Mix images (SVDiff: every pair of the two concepts'
renders side by side, A left, "a sks shape and a zwx shape on a ⟨bg⟩ background"), each gated by its own half
as the masks row samples them (``core.cut_mix``); the pairs cut from pixels, or re-rendered at two-object size.
``--unmix W`` adds SVDiff's Unmix term to that training (each token's cross-attention outside its half).
Scores from the judge: both recognised (left object = A, right = B, every attribute), leakage (an
object carries the other concept's colour or shape), two objects drawn (any attributes). Sampling noise seeds
801-808, none used in training.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time

import numpy as np
import torch

from core import training
from core.compose import custom_diffusion_merge_layers
from core.cut_mix import cut_mix, gated_residuals, trainable_copy, unmix_term
from core.hooks.gate import LowRankGate
from core.hooks.plan import cfg_plan, plan_batch
from core.patching import diffusers as D
from core.regions import Region, RegionGate

from . import judge as J
from . import model as M
from . import scenes as S
from .measure import LowRankHooks, concept_captions

log = logging.getLogger(__name__)

CONCEPTS = {"sks": dict(shape="ring", colour="yellow", texture="plain", seed0=70_000_000),
            "zwx": dict(shape="square", colour="purple", texture="checkered", seed0=71_000_000)}
CONCEPT_SETS = {"new": CONCEPTS,
                "known": {"sks": dict(shape="diamond", colour="yellow", texture="striped", seed0=70_000_000),
                          "zwx": dict(shape="square", colour="purple", texture="plain", seed0=71_000_000)}}
SAMPLE_SEEDS = tuple(range(801, 809))
TRAIN_SEED = 0


def concept_scenes(c: dict, n: int = 4) -> list[S.Scene]:
    return [S.make_scene(c["seed0"] + i, n_objects=1, shapes=(c["shape"],), textures=(c["texture"],),
                         colours=(c["colour"],)) for i in range(n)]


def renders(c: dict, n: int = 4) -> torch.Tensor:
    return torch.from_numpy(S.render_batch(concept_scenes(c, n)))


def learn(unet, te, tok, steps: int, concepts: dict, lr: float = 1e-3, with_captions: bool = False,
          rank: int = 0) -> dict:
    out = {}
    for token, c in concepts.items():
        t0 = time.time()
        cfg = training.TrainConfig(steps=steps, batch_size=4, learning_rate=lr, seed=TRAIN_SEED, objective="v")
        rs, _ = D.train_residuals(unet, M.VAE(), tok, te, renders(c), S.CLASS_WORD, token=token,
                                  resolution=S.SIZE, flip=False, config=cfg, prediction="v", fixed_rank=rank,
                                  alphas_cumprod=M.train_alphas_cumprod(),
                                  captions=concept_captions(concept_scenes(c), token) if with_captions else None)
        out[token] = (rs, time.time() - t0)
    return out


class DeltaHooks:
    """Fixed weight deltas on linear layers through forward hooks, ``y + x ΔWᵀ`` (nothing written in place)."""

    def __init__(self, modules: dict, deltas: dict[str, torch.Tensor]):
        self.modules, self.deltas, self.handles = modules, deltas, []

    def __enter__(self):
        for name, d in self.deltas.items():
            self.handles.append(self.modules[name].register_forward_hook(
                lambda mod, inp, out, d=d: out + inp[0] @ d.T))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def two_object_size(o: S.Obj, place: str, rng: np.random.Generator) -> S.Obj:
    """An object of a single-object render moved into one half and scaled to the two-object radius range."""
    r = 4.0 + (o.r - 5.0) / 3.0 * 1.5
    lo, hi = (r + 1.0, S.SIZE * 9.5 / 32) if place == "left" else (S.SIZE * 22.5 / 32, S.SIZE - r - 1.0)
    return S.Obj(o.shape, o.colour, o.texture, float(rng.uniform(lo, hi)), min(max(o.y, r + 1.0), S.SIZE - r - 1.0), r)


def cut_mix_data(concepts: dict, rerender: bool) -> tuple[torch.Tensor, list[str]]:
    """Every pair of the two concepts' 4 renders side by side (A left), captioned "a sks shape and a zwx shape on a
    ⟨bg⟩ background" (the left render's background). ``rerender``: the pair drawn again by the renderer at
    two-object size (a perfect cut and shrink, which pixels of a 32-px image cannot give) instead of
    ``core.cut_mix.cut_mix`` on the renders and their masks."""
    sa, sb = concept_scenes(concepts["sks"]), concept_scenes(concepts["zwx"])
    caps = [f"a sks {S.CLASS_WORD} and a zwx {S.CLASS_WORD} on a {a.background} background" for a in sa for _ in sb]
    if rerender:
        rng = np.random.default_rng(5)
        scenes = [S.Scene((two_object_size(a.objects[0], "left", rng), two_object_size(b.objects[0], "right", rng)),
                          a.background, (0, 0), (False, False)) for a in sa for b in sb]
        return torch.from_numpy(S.render_batch(scenes)), caps

    def masks(scenes):
        return torch.from_numpy(np.stack([S.render(sc).masks[0] for sc in scenes])).float()
    images, _, _ = cut_mix(renders(concepts["sks"]), masks(sa), renders(concepts["zwx"]), masks(sb))
    return images, caps


def learn_cut_mix(unet, te, tok, learned: dict, concepts: dict, halves: dict, steps: int, lr: float,
                  rerender: bool, unmix: float = 0.0) -> tuple[dict, float]:
    """Both concepts' residuals fine-tuned together on Cut-Mix images (SVDiff), each gated by its own half as the
    masks row samples them (``core.cut_mix``), with SVDiff's Unmix term at weight ``unmix`` (0: off) on each
    token's attention; returns ({token: ResidualSet}, seconds)."""
    images, caps = cut_mix_data(concepts, rerender)
    views, _ = training.make_views(images, None, S.SIZE, 4, TRAIN_SEED, False)
    latents = D.encode_images(M.VAE(), views).float()
    context = D.encode_text(tok, te, caps).repeat_interleave(4, 0)
    sets = {t: trainable_copy(learned[t][0]) for t in concepts}
    params = [p for rs in sets.values() for p in rs.parameters()]
    cfg = training.TrainConfig(steps=steps, batch_size=4, learning_rate=lr, seed=TRAIN_SEED, objective="v")
    unet.requires_grad_(False)
    t0 = time.time()
    positions = [D.concept_positions(tok, caps[0], [t]) for t in concepts]  # the same in every caption
    term = unmix_term(D.unet_sites(unet), positions, [halves[t] for t in concepts], tuple(latents.shape[-2:]),
                      unmix) if unmix > 0 else contextlib.nullcontext()
    with gated_residuals(D.unet_modules(unet), [(sets[t], halves[t]) for t in concepts]), term as extra:
        training.train(params, lambda x, t, ctx: unet(x, t, encoder_hidden_states=ctx).sample, latents, context,
                       M.train_alphas_cumprod(), "v", None, cfg, extra_loss=extra)
    return {t: rs.detached() for t, rs in sets.items()}, time.time() - t0


def kv_layers(unet) -> dict:
    return {n: m for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}


def learn_kv(unet, te, tok, steps: int, concepts: dict, lr: float, with_captions: bool, rank: int) -> dict:
    """Custom Diffusion's concept learning as the pack's node does it: a rank-``rank`` ΔW on every cross-attention
    to_k / to_v (up starts at zero), plain diffusion loss, no token embedding, no prior images; the same renders,
    prompts, steps and seed as ``learn``. Returns {token: ({layer: ΔW}, seconds, training prompts)}."""
    layers = kv_layers(unet)
    unet.requires_grad_(False)
    out = {}
    for token, c in concepts.items():
        lora = LowRankHooks(list(layers.values()), rank, TRAIN_SEED)
        for p in lora.parameters():
            p.requires_grad_(True)
        prompts = training.image_prompts(token, S.CLASS_WORD, concept_captions(concept_scenes(c), token)
                                         if with_captions else None, 4)
        views, _ = training.make_views(renders(c), None, S.SIZE, 4, TRAIN_SEED, False)
        latents = D.encode_images(M.VAE(), views).float()
        context = D.encode_text(tok, te, prompts)
        if len(prompts) > 1:
            context = context.repeat_interleave(4, 0)
        cfg = training.TrainConfig(steps=steps, batch_size=4, learning_rate=lr, seed=TRAIN_SEED, objective="v")
        t0 = time.time()
        with lora:
            training.train(lora.parameters(), lambda x, t, ctx: unet(x, t, encoder_hidden_states=ctx).sample,
                           latents, context, M.train_alphas_cumprod(), "v", None, cfg)
        deltas = {n: (u @ d).detach() for n, d, u in zip(layers, lora.down, lora.up, strict=True)}
        out[token] = (deltas, time.time() - t0, sorted(set(prompts)))
    return out


def merged_kv(unet, te, tok, learned_kv: dict) -> dict[str, torch.Tensor]:
    """The closed-form merge (``core.compose``) of the concepts' K/V deltas, as Merge Custom Diffusion Concepts
    does it: each concept keeps its token's and class word's rows in its training prompts; 24 base captions of
    other scenes (seeds 90,000,000+, every row) are what must stay. Returns {layer: merged W − W0}."""
    layers = kv_layers(unet)
    feats = []
    for token, (_, _, prompts) in learned_kv.items():
        rows = [D.encode_text(tok, te, [p])[0, D.concept_positions(tok, p, [token, S.CLASS_WORD])] for p in prompts]
        feats.append(torch.cat(rows).float())
    reg = D.encode_text(tok, te, [S.caption(S.make_scene(90_000_000 + i)) for i in range(24)]).float()
    base = {n: m.weight.detach().float() for n, m in layers.items()}
    merged = custom_diffusion_merge_layers(base, [{n: base[n] + d[n] for n in layers} for d, _, _ in
                                                  learned_kv.values()], feats, reg.reshape(-1, reg.shape[-1]))
    return {n: merged[n] - base[n] for n in layers}


@torch.no_grad()
def sample(unet, te, tok, prompt: str, seed: int, before_call=None) -> torch.Tensor:
    """One CFG sample; ``before_call(batch)`` prepares the gates of each UNet call (rows: [uncond, cond])."""
    sched = M.build_scheduler()
    cond, uncond = D.encode_text(tok, te, [prompt]), D.encode_text(tok, te, [""])
    c = unet.config
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, c.in_channels, c.sample_size, c.sample_size), generator=gen) * sched.init_noise_sigma
    sched.set_timesteps(M.SAMPLE_STEPS)
    context = torch.cat([uncond, cond])
    for t in sched.timesteps:
        if before_call is not None:
            before_call(2)
        eps_u, eps_c = unet(sched.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=context) \
            .sample.chunk(2)
        x = sched.step(eps_u + M.GUIDANCE * (eps_c - eps_u), t, x).prev_sample
    return ((M.from_latents(x.float()) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


@torch.no_grad()
def sample_regional_prompts(unet, te, tok, items, seed: int) -> torch.Tensor:
    """The hook-based baseline (ComfyUI's ConditioningSetProperties with a mask and a hook LoRA per prompt): each
    ``(prompt, mask [h, w], residual set)`` is predicted in its own UNet call with its residual on everywhere, the
    conditional predictions are blended by the masks (which tile the image), the unconditional one has none."""
    sched = M.build_scheduler()
    uncond = D.encode_text(tok, te, [""])
    conds = [(D.encode_text(tok, te, [p]), m[None, None], rs) for p, m, rs in items]
    c = unet.config
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, c.in_channels, c.sample_size, c.sample_size), generator=gen) * sched.init_noise_sigma
    sched.set_timesteps(M.SAMPLE_STEPS)
    sites = D.unet_sites(unet)
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t)
        eps_u = unet(xin, t, encoder_hidden_states=uncond).sample
        eps_c = torch.zeros_like(eps_u)
        for cond, mask, rs in conds:
            gate = LowRankGate(sites, rs)
            gate.install()
            gate.plan = cfg_plan(1, [0], [])
            try:
                eps_c += mask * unet(xin, t, encoder_hidden_states=cond).sample
            finally:
                gate.remove()
        x = sched.step(eps_u + M.GUIDANCE * (eps_c - eps_u), t, x).prev_sample
    return ((M.from_latents(x.float()) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


def score(reading: J.Reading, concepts: dict = CONCEPTS) -> tuple[bool, bool]:
    """(both concepts recognised in place, any leakage of one concept's colour or shape onto the other)."""
    a, b = concepts["sks"], concepts["zwx"]
    objs = reading.objects
    both = len(objs) == 2 and all(getattr(objs[0], k) == a[k] for k in ("shape", "colour", "texture")) and \
        all(getattr(objs[1], k) == b[k] for k in ("shape", "colour", "texture"))
    leak = any((o.colour == b["colour"] or o.shape == b["shape"]) for o in objs[:1]) or \
        any((o.colour == a["colour"] or o.shape == a["shape"]) for o in objs[1:2])
    return both, leak


def run(weights: str, judge_path: str, steps: int, n_seeds: int = len(SAMPLE_SEEDS), n_prompts: int = 4,
        concept_set: str = "new", lr: float = 1e-3, with_captions: bool = False, rank: int = 0,
        custom_diffusion: bool = False, cut_mix_steps: int = 0, only: tuple[str, ...] = (), unmix: float = 0.0) -> dict:
    concepts = CONCEPT_SETS[concept_set]
    unet, te, tok = M.load(weights)
    judge = J.load(judge_path)
    learned = learn(unet, te, tok, steps, concepts, lr, with_captions, rank)
    sites = D.unet_sites(unet)
    modules = D.unet_modules(unet)
    prompts = [f"a sks {S.CLASS_WORD} and a zwx {S.CLASS_WORD} on a {bg} background"
               for bg in S.BACKGROUND_NAMES][:n_prompts]
    seeds = SAMPLE_SEEDS[:n_seeds]
    h = w = S.SIZE
    left, right = torch.zeros(h, w), torch.zeros(h, w)
    left[:, : w // 2], right[:, w // 2:] = 1, 1

    def rows_for(name):
        if name == "global":
            def ctx_global(prompt):
                gates = [LowRankGate(sites, learned[t][0]) for t in concepts]
                return gates, None
            return ctx_global

        def ctx_regions(prompt):
            regions = []
            pairs = (("sks", left),) if name == "masks_left_only" else (("sks", left), ("zwx", right))
            for token, mask in pairs:
                layers = dict(cut_sets[name][token].layers if name in cut_sets else learned[token][0].layers)
                if name == "multi_lag":  # cut-mix rows are gated by the halves they were trained in
                    regions.append(Region(layers, tokens=D.concept_positions(tok, prompt, [token]), name=token))
                else:
                    regions.append(Region(layers, mask=mask, name=token))
            gate = RegionGate(modules, sites, regions, "argmax")
            gate.set_latent_hw((unet.config.sample_size, unet.config.sample_size))
            plan = plan_batch(2, [1, 0], [False, True])
            rows, borrow = plan.rows, plan.borrow
            return [gate], lambda batch: gate.begin_call(rows, borrow)
        return ctx_regions

    res = {"concept_set": concept_set, "concepts": {k: dict(v) for k, v in concepts.items()}, "train_steps": steps,
           "learning_rate": lr, "captions": with_captions, "fixed_rank": rank, "train_seed": TRAIN_SEED,
           "sample_seeds": list(seeds),
           "prompts": prompts,
           "train_seconds": {t: round(learned[t][1], 1) for t in concepts}, "weights_sha256": M.sha256(weights),
           "rows": {}}
    def words(c):  # the concept in the base model's own words: the ceiling of what composition can reach
        return " ".join([c["colour"]] + ([c["texture"]] if c["texture"] != "plain" else []) + [c["shape"]])

    names = ["none", "global", "multi_lag", "masks", "masks_left_only", "hooks_regional_prompts", "words"]
    kv_rows = {}
    if custom_diffusion:
        kv = learn_kv(unet, te, tok, steps, concepts, lr, with_captions, rank or 16)
        res["custom_diffusion"] = {"rank": rank or 16, "train_seconds": {t: round(v[1], 1) for t, v in kv.items()}}
        kv_rows = {"custom_diffusion_summed": {n: kv["sks"][0][n] + kv["zwx"][0][n] for n in kv["sks"][0]},
                   "custom_diffusion_merged": merged_kv(unet, te, tok, kv)}
        names[-1:-1] = list(kv_rows)
    cut_sets = {}
    if cut_mix_steps:
        res["cut_mix"] = {"steps": cut_mix_steps, "unmix": unmix, "train_seconds": {}}
        for name, rerender in (("cut_mix_masks", False), ("cut_mix_rerendered_masks", True)):
            if only and name not in only:
                continue
            cut_sets[name], sec = learn_cut_mix(unet, te, tok, learned, concepts, {"sks": left, "zwx": right},
                                                cut_mix_steps, lr, rerender, unmix)
            res["cut_mix"]["train_seconds"][name] = round(sec, 1)
        names[-1:-1] = list(cut_sets)
    if only:
        names = [n for n in names if n in only]
    layers = kv_layers(unet)
    for name in names:
        both, leak, two = [], [], []
        for prompt in prompts:
            bg = prompt.split(" on a ")[-1]
            for seed in seeds:
                if name in kv_rows:
                    with DeltaHooks(layers, kv_rows[name]):
                        img = sample(unet, te, tok, prompt, seed)
                elif name == "words":
                    img = sample(unet, te, tok, f"a {words(concepts['sks'])} and a {words(concepts['zwx'])} on a {bg}",
                                 seed)
                elif name == "hooks_regional_prompts":  # two prompts, two passes: the baseline, not one prompt
                    img = sample_regional_prompts(unet, te, tok, [
                        (f"a sks {S.CLASS_WORD} on the left on a {bg}", left, learned["sks"][0]),
                        (f"a zwx {S.CLASS_WORD} on the right on a {bg}", right, learned["zwx"][0])], seed)
                else:
                    gates, before = ([], None) if name == "none" else rows_for(name)(prompt)
                    for g in gates:
                        g.install()
                        if isinstance(g, LowRankGate):
                            g.plan = cfg_plan(2, [1, 0], [])
                    try:
                        img = sample(unet, te, tok, prompt, seed, before)
                    finally:
                        for g in gates:
                            g.remove()
                reading = J.read(judge, img)[0]
                b, lk = score(reading, concepts)
                both.append(b)
                leak.append(lk)
                two.append(len(reading.objects) == 2)
        res["rows"][name] = {"both_recognised": float(np.mean(both)), "leakage": float(np.mean(leak)),
                             "two_objects": float(np.mean(two)), "samples": len(both)}
        log.info("%s %s", name, res["rows"][name])
    return res


def table(res: dict) -> str:
    lines = [f"{'row':<22} {'both':>6} {'leak':>6} {'two':>6}  (targets: both >= 0.80, leakage <= 0.05; two: "
             "two objects drawn)"]
    for name, r in res["rows"].items():
        lines.append(f"{name:<22} {r['both_recognised']:6.3f} {r['leakage']:6.3f} {r.get('two_objects', 0):6.3f}  "
                     f"({r['samples']} samples)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=M.DEFAULT_WEIGHTS)
    ap.add_argument("--judge", default=os.path.join(M.HERE, "weights", "judge.safetensors"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=len(SAMPLE_SEEDS), help="sampling seeds per prompt")
    ap.add_argument("--prompts", type=int, default=4, help="prompts (one per background)")
    ap.add_argument("--concepts", choices=sorted(CONCEPT_SETS), default="new",
                    help="new: the held-out ring and checkered texture; known: two objects the base model can draw")
    ap.add_argument("--lr", type=float, default=1e-3, help="the residual trainer's learning rate")
    ap.add_argument("--captions", action="store_true",
                    help="train each concept on its renders' captions ('a sks shape on the left on a white "
                         "background') instead of the paper's one prompt")
    ap.add_argument("--rank", type=int, default=0,
                    help="fixed residual rank for every layer (0: the paper's rule, 0.05 of the width)")
    ap.add_argument("--custom-diffusion", action="store_true",
                    help="also learn each concept as Custom Diffusion K/V updates (rank --rank, or 16) and sample "
                         "them summed and merged in closed form")
    ap.add_argument("--cut-mix", type=int, default=0, metavar="STEPS",
                    help="also fine-tune both residuals together for STEPS on Cut-Mix images of their renders, each "
                         "gated by its half (core.cut_mix; cut from pixels, and re-rendered), sampled as the masks row")
    ap.add_argument("--unmix", type=float, default=0.0, metavar="WEIGHT",
                    help="with --cut-mix: SVDiff's Unmix term at this weight (each token's attention outside its half)")
    ap.add_argument("--rows", default="", help="comma-separated rows to sample (default: all)")
    ap.add_argument("--json", default="bench/toyworld/results/compose.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    res = run(args.weights, args.judge, args.steps, args.seeds, args.prompts, args.concepts, args.lr, args.captions,
              args.rank, args.custom_diffusion, args.cut_mix,
              tuple(r.strip() for r in args.rows.split(",") if r.strip()), args.unmix)
    print(table(res))
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
