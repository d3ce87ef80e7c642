"""The diffusers DiT backend: residuals and LAG on ``SD3Transformer2DModel`` and ``FluxTransformer2DModel``.

The gate (``core.hooks.gate``) is model-agnostic: it hooks the layers ``core.families.find_sites`` names. What a
DiT needs from this module is the tap: diffusers' joint attention computes q and k inside an attention processor,
after QK-norm (and RoPE on Flux), so no forward hook on ``to_q``/``to_k`` sees them as the model uses them.
``DiTTap`` swaps in processors that compute what the stock ones compute and report each call as an
``AttentionEvent`` when a listener wants it. diffusers is imported only when a tap is installed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..families import FAMILIES, Family, find_sites
from ..hooks.gate import LowRankGate
from ..hooks.plan import cfg_plan
from ..hooks.tap import AttentionEvent, Tap

# diffusers class -> family key; the stock processor each family's joint attention must have for the tap to stand in
_FAMILY_OF = {"SD3Transformer2DModel": "SD3", "FluxTransformer2DModel": "Flux"}
_STOCK = {"SD3": "JointAttnProcessor2_0", "Flux": "FluxAttnProcessor"}


def dit_family(transformer: nn.Module) -> Family:
    """The family of a diffusers DiT (subclasses count as their base); anything else is refused by name."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in _FAMILY_OF:
            return FAMILIES[_FAMILY_OF[cls.__name__]]
    raise ValueError(f"{type(transformer).__name__} is not a diffusers DiT this pack supports; supported: "
                     + ", ".join(f"{c} ({FAMILIES[k].label})" for c, k in _FAMILY_OF.items()))


def dit_sites(transformer: nn.Module) -> list:
    """``[(site, block)]`` of a diffusers DiT, ComfyUI-named (the residual file's keys), in forward order."""
    return find_sites(transformer, dit_family(transformer), diffusers=True)


class DiTTap(Tap):
    """Attention processors on each site's joint attention (``block.attn``) for the duration of a ``with`` block.

    The event's site is the index into ``sites`` (default ``dit_sites(transformer)``); q and k are head-major
    ``[B, h, L, d]``, laid out as the processor lays out the joint sequence: SD3 ``[img | txt]``, Flux
    ``[txt | img]``. Flux's single blocks get the joint sequence without ``encoder_hidden_states``, so the text
    length of the current call comes from a pre-hook on the transformer. The original processors come back on
    exit; a processor other than diffusers' stock one is refused (replacing it would silently drop its effect).
    """

    def __init__(self, transformer: nn.Module, sites: list | None = None):
        super().__init__()
        self.transformer = transformer
        self.family = dit_family(transformer)
        self.sites = sites if sites is not None else dit_sites(transformer)
        self.text_length: int | None = None
        self._saved: list[tuple[nn.Module, object]] = []
        self._hook = None

    def install(self) -> DiTTap:
        if self._hook is not None:
            return self
        stock = _STOCK[self.family.key]
        attns = [block.attn for _, block in self.sites]
        for attn in attns:
            if type(attn.processor).__name__ != stock:
                raise RuntimeError(
                    f"an attention of this {self.family.label} model uses {type(attn.processor).__name__}, not "
                    f"diffusers' {stock}: localized residuals and attention maps need the stock processor")
        make = _SD3Processor if self.family.key == "SD3" else _flux_processor()
        for i, attn in enumerate(attns):
            self._saved.append((attn, attn.processor))
            attn.set_processor(make(self, i))
        self._hook = self.transformer.register_forward_pre_hook(self._on_call, with_kwargs=True)
        return self

    def remove(self) -> None:
        for attn, original in self._saved:
            attn.set_processor(original)
        self._saved.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.text_length = None

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()

    def _on_call(self, module, args, kwargs):
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.text_length = None if context is None else int(context.shape[1])


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, h*d] -> [B, h, L, d], as JointAttnProcessor2_0 splits heads."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


class _SD3Processor:
    """JointAttnProcessor2_0's computation (SD3's joint attention, sequence ``[img | txt]``) plus the tap's event."""

    def __init__(self, tap: DiTTap, site: int):
        self.tap, self.site = tap, site

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n = hidden_states.shape[:2]
        heads = attn.heads
        q, k, v = (_heads(proj(hidden_states), heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq, ck, cv = (_heads(proj(encoder_hidden_states), heads)
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
            if self.tap.wanted():
                text = (n, encoder_hidden_states.shape[1])
                self.tap.emit(AttentionEvent(self.site, q, k, heads, head_major=True, image=(0, n), text=text))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, heads * v.shape[-1]).to(q.dtype)
        context = None
        if encoder_hidden_states is not None:
            out, context = out[:, :n], out[:, n:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if context is None else (out, context)


def _flux_processor():
    """The Flux processor class (diffusers' public ``apply_rotary_emb`` is imported here, not at module load)."""
    from diffusers.models.embeddings import apply_rotary_emb

    class _FluxProcessor:
        """FluxAttnProcessor's computation with the native attention backend (sequence ``[txt | img]``; a single
        block's call has no ``encoder_hidden_states`` and takes the text length from the tap) plus the event."""

        def __init__(self, tap: DiTTap, site: int):
            self.tap, self.site = tap, site

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            if getattr(attn, "fused_projections", False):
                q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))  # [B, L, h, d]
            q, k = attn.norm_q(q), attn.norm_k(k)
            joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
            if joint:
                if getattr(attn, "fused_projections", False):
                    cq, ck, cv = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
                else:
                    cq, ck, cv = (proj(encoder_hidden_states)
                                  for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
                cq, ck, cv = (x.unflatten(-1, (-1, attn.head_dim)) for x in (cq, ck, cv))
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
                q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
            if image_rotary_emb is not None:
                q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
                k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
            qh, kh, vh = (x.permute(0, 2, 1, 3) for x in (q, k, v))  # what the native backend hands to SDPA
            if self.tap.wanted():
                self.tap.emit(self._event(qh, kh, encoder_hidden_states if joint else None))
            mask = attention_mask
            if mask is not None and mask.ndim == 2 and mask.shape == (q.shape[0], k.shape[1]):
                mask = mask[:, None, None]
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=0.0, is_causal=False)
            out = out.permute(0, 2, 1, 3).flatten(2, 3).to(q.dtype)
            if encoder_hidden_states is None:
                return out
            text = encoder_hidden_states.shape[1]
            context, out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(context.contiguous())

        def _event(self, qh, kh, context) -> AttentionEvent:
            text = context.shape[1] if context is not None else self.tap.text_length
            if text is None:
                raise RuntimeError("a Flux single block ran outside a transformer call the tap saw: its text "
                                   "length is unknown")
            total = qh.shape[2]
            return AttentionEvent(self.site, qh, kh, qh.shape[1], head_major=True, image=(text, total - text),
                                  text=(0, text))

    return _FluxProcessor


def _rows(value: torch.Tensor, b: int) -> torch.Tensor:
    return value.expand(b, *value.shape[1:]) if value.shape[0] == 1 else value


@torch.no_grad()
def cfg_call(transformer: nn.Module, latents: torch.Tensor, timestep: float, cond: dict, uncond: dict,
             gate: LowRankGate | None = None, tokens=(), **shared) -> tuple[torch.Tensor, torch.Tensor]:
    """One classifier-free-guided model call: the batch ``[uncond * b, cond * b]`` of ``latents`` [b, ...].

    ``cond``/``uncond`` hold the per-row conditioning keywords (``encoder_hidden_states``, ``pooled_projections``,
    Flux's ``guidance``) with one row or b rows; ``shared`` the rest (Flux's ``img_ids``/``txt_ids``). With a
    ``gate`` the call gets the CFG plan: the conditional rows compute the concept's (``tokens``) maps, the
    unconditional rows borrow them, as our samplers do at every step. Returns the (uncond, cond) predictions."""
    b = latents.shape[0]
    batch = {key: torch.cat([_rows(uncond[key], b), _rows(cond[key], b)]) for key in cond}
    t = torch.full((2 * b,), float(timestep), device=latents.device)
    if gate is not None:
        gate.plan = cfg_plan(2 * b, [1, 0], tokens)
    out = transformer(hidden_states=torch.cat([latents, latents]), timestep=t, return_dict=False, **batch,
                      **shared)[0]
    return out[:b], out[b:]
