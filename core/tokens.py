"""Finding a concept's words among a prompt's tokens."""
from __future__ import annotations

import torch

DEFAULT_TOKEN = "sks"  # a rare CLIP token, as DreamBooth and the paper's V* use


class TokenNotFoundError(ValueError):
    """A word that should be in the prompt is not."""


def find_subsequence(haystack: list[int], needle: list[int]) -> list[int]:
    """Positions covered by every occurrence of ``needle`` in ``haystack``."""
    found = []
    n = len(needle)
    if n == 0:
        return found
    for i in range(len(haystack) - n + 1):
        if haystack[i:i + n] == needle:
            found.extend(range(i, i + n))
    return found


TOKENIZER_NAMES = {"l": "CLIP-L", "g": "CLIP-G", "h": "OpenCLIP-H", "t5xxl": "T5"}


def word_positions(prompt_ids: list[int], words: dict[str, list[int]], prompt: str = "",
                   tokenizer: str = "") -> list[int]:
    """Sorted positions of all sub-tokens of every word; raises naming the missing word and the prompt."""
    positions: set[int] = set()
    for word, ids in words.items():
        hits = find_subsequence(prompt_ids, ids)
        if not hits and tokenizer == "t5xxl" and word in prompt:
            raise TokenNotFoundError(
                f"T5 splits the word '{word}' into pieces ({len(ids)} tokens) that do not appear as such in the "
                f"prompt \"{prompt}\" (T5 tokenizes a word differently next to punctuation or inside another "
                "word): put spaces around it, or choose a token that is one plain word")
        if not hits:
            raise TokenNotFoundError(
                f"the word '{word}' is not in the prompt \"{prompt}\"; write it into the prompt "
                "(for a learned concept: 'a photo of a <token> <class word>') or change the token/class word")
        positions.update(hits)
    return sorted(positions)


def same_prompt(row: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether a conditioning row [L', D] starts with the encoded reference prompt [L, D] (fp16 rounding tolerated):
    how nodes recognise, inside the sampler, the prompt whose token positions they know."""
    n = reference.shape[0]
    if row.shape[0] < n or row.shape[-1] != reference.shape[-1]:
        return False
    ref = reference.to(row.device, row.dtype)
    return bool(torch.allclose(row[:n], ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max().clamp_min(1e-6))))
