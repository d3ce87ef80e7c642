"""LEACE: perfect linear concept erasure in closed form (Belrose et al., NeurIPS 2023), on text conditioning.

From features X [n, d] and concept labels Z [n, k]: with the covariance Sigma_XX, the whitening
W = (Sigma_XX^{1/2})^+ and P the orthogonal projection onto the column space of W Sigma_XZ, the eraser

    r(x) = x - W^+ P W (x - mu)

makes the cross-covariance of r(X) with Z exactly zero (so no linear probe beats a constant predictor) while
moving X as little as possible in the mean-squared (Mahalanobis) sense. The cross-covariance does not depend on
where the projection is centred: r(x) = x - W^+ P W (x - b) erases as perfectly for any b. LEACE takes b = the
mean of all X (least movement); b = the mean of the examples without the concept (``centre="neutral"``) leaves
their mean exactly in place and moves the concept examples' mean onto it, all the way to "without the concept"
instead of part of the way (the concept examples' share of the mean). Nor does it depend on the whitening being
Sigma's own: any invertible W gives W^+ P W Sigma_XZ = Sigma_XZ. ``shrinkage`` s whitens with Sigma + s * mean
eigenvalue * I instead: no longer the least change on the fitting data, but bounded on inputs the fit never saw
(with few fitting prompts Sigma has near-zero directions, and plain LEACE's oblique projection can move an unseen
prompt's rows without bound along them). Text conditioning [B, L, D] is erased row by row with one eraser fitted
on the rows of every token position pooled (a concept word changes its own row and, through the causal text
encoder, every later row), one per position (``per_position``), or one pooled eraser whose labels are each row's
offset from the concept word (``fit_by_word``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LeaceEraser:
    """x -> x - (x - mean) @ projection^T, with ``projection`` = W^+ P W (rank = the concept's rank).

    Pooled: mean [d], projection [d, d], the same for every row. Per position: mean [L, d], projection [L, d, d],
    row i of a conditioning erased by eraser i (rows past L are left alone).
    """

    mean: torch.Tensor
    projection: torch.Tensor

    @property
    def rank(self) -> int:
        """The rank of the edit (per position: the largest over positions)."""
        return int(torch.linalg.matrix_rank(self.projection.double(), rtol=1e-6).max().item())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Erase the last dimension of ``x`` (any leading shape); returns a new tensor of x's dtype."""
        if x.shape[-1] != self.mean.shape[-1]:
            raise ValueError(f"the eraser was fitted on {self.mean.shape[-1]}-wide features but these are "
                             f"{x.shape[-1]} wide: fit it with the same text encoder")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        p = self.projection.to(x.device, work)
        mu = self.mean.to(x.device, work)
        xf = x.to(work)
        if self.mean.dim() == 1:
            return (xf - (xf - mu) @ p.T).to(x.dtype)
        n = min(mu.shape[0], x.shape[-2])
        head = xf[..., :n, :]
        erased = head - torch.einsum("...ld,lkd->...lk", head - mu[:n], p[:n])
        return torch.cat([erased, xf[..., n:, :]], dim=-2).to(x.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"leace.mean": self.mean.contiguous(), "leace.projection": self.projection.contiguous()}

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> LeaceEraser:
        return cls(sd["leace.mean"], sd["leace.projection"])


def as_labels(z: torch.Tensor) -> torch.Tensor:
    """Labels [n] (classes or a 0/1 concept flag) or [n, k] -> float64 [n, k]."""
    return (z[:, None] if z.dim() == 1 else z).double()


CENTRES = ("mean", "neutral")


def fit_leace(x: torch.Tensor, z: torch.Tensor, rtol: float = 1e-8, centre: str = "mean",
              shrinkage: float = 0.0) -> LeaceEraser:
    """Fit the LEACE eraser (Belrose et al. 2023, Thm. 4.3) to features ``x`` [n, d] and labels ``z`` [n] / [n, k];
    ``centre`` "neutral": centred on the mean of the rows whose labels are all zero; ``shrinkage``: the whitening's
    covariance is Sigma + shrinkage * (its mean eigenvalue) * I (see the module docstring)."""
    if centre not in CENTRES:
        raise ValueError(f"unknown centre {centre!r}; use one of {CENTRES}")
    if shrinkage < 0:
        raise ValueError(f"shrinkage must be 0 or more, not {shrinkage}")
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {z.shape[0]} labels")
    if x.shape[0] < 2:
        raise ValueError("fit LEACE on at least two examples, with and without the concept")
    xd, zd = x.double(), as_labels(z)
    if (zd.std(0) == 0).all():
        raise ValueError("every example has the same concept label: give examples with and without the concept")
    mu = xd.mean(0)
    xc, zc = xd - mu, zd - zd.mean(0)
    if centre == "neutral":
        without = (zd == 0).all(1)
        if not without.any():
            raise ValueError("centre 'neutral' needs examples without the concept (labels all zero)")
        mu = xd[without].mean(0)
    n = xd.shape[0]
    sigma = xc.T @ xc / (n - 1)
    cross = xc.T @ zc / (n - 1)  # [d, k]
    evals, evecs = torch.linalg.eigh(sigma)
    if evals.max() <= 1e-12 * (mu.abs().max() ** 2).clamp_min(1e-300):  # constant features (e.g. the start token)
        return LeaceEraser(mu.float(), torch.zeros_like(sigma, dtype=torch.float32))
    if shrinkage > 0:
        evals = evals.clamp_min(0) + shrinkage * evals.clamp_min(0).mean()
    keep = evals > rtol * evals.max()
    v, lam = evecs[:, keep], evals[keep]
    whiten = v @ torch.diag(lam.rsqrt()) @ v.T  # (Sigma^{1/2})^+
    unwhiten = v @ torch.diag(lam.sqrt()) @ v.T  # Sigma^{1/2} = W^+
    u, s, _ = torch.linalg.svd(whiten @ cross, full_matrices=False)
    u = u[:, s > rtol ** 0.5 * s.max().clamp_min(1e-300)]
    projection = unwhiten @ (u @ u.T) @ whiten
    return LeaceEraser(mu.float(), projection.float())


def conditioning_rows(cond: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning [B, L, D] with one label per prompt -> every token row [B*L, D] with its prompt's label."""
    b, length, _ = cond.shape
    z = as_labels(labels)
    if z.shape[0] != b:
        raise ValueError(f"{b} prompts but {z.shape[0]} labels")
    return cond.reshape(b * length, -1), z.repeat_interleave(length, 0)


def fit_on_conditioning(concept: torch.Tensor, neutral: torch.Tensor, per_position: bool = False,
                        centre: str = "mean", shrinkage: float = 0.0) -> LeaceEraser:
    """An eraser from encodings of prompts with the concept [B1, L, D] and without it [B2, L, D].

    Pooled (default): one eraser for the rows of every position, for prompts of any wording. ``per_position``:
    one eraser per token position, much stronger when the prompts to erase follow the fitting prompts' template
    (the same words at the same positions), meaningless otherwise. ``centre``, ``shrinkage``: see ``fit_leace``.
    """
    if concept.shape[1:] != neutral.shape[1:]:
        raise ValueError("the prompts with and without the concept must be encoded to the same shape")
    cond = torch.cat([concept, neutral])
    labels = torch.cat([torch.ones(concept.shape[0]), torch.zeros(neutral.shape[0])])
    if not per_position:
        return fit_leace(*conditioning_rows(cond, labels), centre=centre, shrinkage=shrinkage)
    erasers = [fit_leace(cond[:, i], labels, centre=centre, shrinkage=shrinkage) for i in range(cond.shape[1])]
    return LeaceEraser(torch.stack([e.mean for e in erasers]), torch.stack([e.projection for e in erasers]))


def offset_labels(length: int, start: int) -> torch.Tensor:
    """[length, length] labels of one prompt's rows: row ``start`` + j is class j (the concept word's first token
    and every row after it, each offset its own class); rows before the word are all zero."""
    z = torch.zeros(length, length, dtype=torch.float64)
    j = torch.arange(length - start)
    z[start + j, j] = 1.0
    return z


def fit_by_word(concept: torch.Tensor, neutral: torch.Tensor, word_starts: list[int], centre: str = "neutral",
                shrinkage: float = 0.0) -> LeaceEraser:
    """One pooled eraser for prompts of any wording: every row of the prompts with the concept [B1, L, D] labelled
    by its offset from the concept word (``word_starts``: the word's first token position in each), the rows
    before the word and every row without the concept [B2, L, D] unlabelled; applied to every row of a prompt.

    A causal text encoder writes the word into its own row and every later one, each differently (one label for
    all of them leaves the later rows' concept in place; docs/erase.md has the measurement); the rank of the
    edit is at most the number of offsets (L)."""
    if concept.shape[1:] != neutral.shape[1:]:
        raise ValueError("the prompts with and without the concept must be encoded to the same shape")
    if len(word_starts) != concept.shape[0]:
        raise ValueError(f"{concept.shape[0]} concept prompts but {len(word_starts)} word positions")
    length = concept.shape[1]
    labels = [offset_labels(length, s) for s in word_starts] + [torch.zeros(length, length, dtype=torch.float64)
                                                                 for _ in range(neutral.shape[0])]
    rows = torch.cat([concept, neutral]).reshape(-1, concept.shape[-1])
    return fit_leace(rows, torch.cat(labels), centre=centre, shrinkage=shrinkage)


def least_squares_probe(x: torch.Tensor, z: torch.Tensor, rcond: float = 1e-6) -> torch.Tensor:
    """Weights [d + 1, k] of the least-squares probe z ~ [x, 1] (the attacker LEACE is optimal against).

    Minimum-norm solution at numerical rank ``rcond``: the direction LEACE collapses keeps a rounding-level
    remnant of the labels, which an unregularised solve would blow up by 1e13.
    """
    xd = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    return torch.linalg.lstsq(xd, as_labels(z), rcond=rcond, driver="gelsd").solution


def probe_predict(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1) @ weights
