"""LEACE (Belrose et al. 2023): zero cross-covariance, no linear signal left, minimal change without a concept."""
import pytest
import torch

from core import leace as L


def concept_data(n, d=16, signal=3.0, seed=0):
    """Correlated Gaussian features; label-1 rows are shifted along a fixed random direction."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(100)) / d ** 0.5
    direction = torch.randn(d, generator=torch.Generator().manual_seed(101))
    z = (torch.rand(n, generator=gen) < 0.5).double()
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix.double() + signal * z[:, None] * direction
    return x, z


def probe_r2(train_x, train_z, test_x, test_z):
    """Held-out R^2 of the least-squares probe: 0 is the constant predictor (chance), 1 reads z perfectly."""
    w = L.least_squares_probe(train_x, train_z)
    mse = ((L.probe_predict(w, test_x)[:, 0] - test_z) ** 2).mean()
    return (1 - mse / ((test_z - train_z.mean()) ** 2).mean()).item()


def test_erased_features_have_zero_cross_covariance_with_the_labels():
    x, z = concept_data(2000)
    eraser = L.fit_leace(x, z)
    xe = eraser(x.float()).double()
    cross = (xe - xe.mean(0)).T @ (z - z.mean())[:, None] / (len(z) - 1)
    assert cross.abs().max() < 1e-4 * x.abs().max()
    assert eraser.rank == 1  # one binary concept: a rank-1 edit


def test_a_least_squares_probe_does_no_better_than_chance_on_held_out_data():
    x, z = concept_data(4000, seed=1)
    test_x, test_z = concept_data(4000, seed=2)
    assert probe_r2(x, z, test_x, test_z) > 0.8  # the concept is linearly readable before
    eraser = L.fit_leace(x, z)
    assert probe_r2(eraser(x), z, eraser(test_x), test_z) < 0.01  # ... and not after, on unseen data


def test_an_eraser_fitted_without_concept_signal_changes_little():
    """Without signal LEACE still removes one whitened direction, picked by noise: about 1/d of the variance,
    which is what any rank-1 projection costs; with signal it removes the concept's large shift."""
    d = 64
    x, _ = concept_data(4000, d=d, signal=0.0, seed=3)
    z = (torch.rand(4000, generator=torch.Generator().manual_seed(4)) < 0.5).double()  # independent labels
    centred = ((x - x.mean(0)) ** 2).sum(1).mean()
    change = ((L.fit_leace(x, z)(x) - x) ** 2).sum(1).mean() / centred
    xs, zs = concept_data(4000, d=d, seed=3)
    change_signal = ((L.fit_leace(xs, zs)(xs) - xs) ** 2).sum(1).mean() / centred
    assert change < 2.0 / d and change_signal > 4 * change, (change, change_signal)


def test_conditioning_eraser_removes_a_word_from_text_encodings(tokenizer, text_encoder):
    from core.patching.diffusers import encode_text

    colours = ["red", "blue", "green"]
    things = ["dog", "cat", "toy", "mug", "hat", "table"]
    places = ["beach", "snow", "city", "forest", "grass"]
    with_red = encode_text(tokenizer, text_encoder, [f"a {t} on the {p}" .replace("a ", "a red ", 1)
                                                     for t in things for p in places])
    without = encode_text(tokenizer, text_encoder, [f"a {c} {t} on the {p}" for c in colours[1:]
                                                    for t in things for p in places])
    eraser = L.fit_on_conditioning(with_red, without)
    rows, labels = L.conditioning_rows(torch.cat([with_red, without]),
                                       torch.cat([torch.ones(len(with_red)), torch.zeros(len(without))]))
    erased = eraser(rows).double()
    cross = (erased - erased.mean(0)).T @ (labels - labels.mean(0)) / (len(labels) - 1)
    assert cross.abs().max() < 1e-5 * rows.abs().max()
    assert eraser(with_red).shape == with_red.shape and eraser(with_red).dtype == with_red.dtype


def test_bad_inputs_get_clear_messages():
    x, _ = concept_data(10)
    with pytest.raises(ValueError, match="same concept label"):
        L.fit_leace(x, torch.ones(10))
    with pytest.raises(ValueError, match="labels"):
        L.fit_leace(x, torch.ones(9))
    with pytest.raises(ValueError, match="wide"):
        L.fit_leace(x, (torch.arange(10) % 2).double())(torch.zeros(2, 5))


def test_per_position_eraser_zeroes_the_cross_covariance_at_every_position():
    """One eraser per token position: at each position the rows carry no linear concept signal; a constant
    position (the start token) is left exactly as it is."""
    n, length, d = 400, 3, 8
    x, z = concept_data(n * length, d=d, seed=5)
    cond = x.reshape(n, length, d).clone()
    z = z.reshape(n, length)[:, 0]
    cond[:, 1] += 3.0 * z[:, None] * torch.linspace(-1, 1, d, dtype=torch.float64)  # a position-specific signal
    cond[:, 0] = 1.5  # the start row: the same in every prompt
    eraser = L.fit_on_conditioning(cond[z == 1], cond[z == 0], per_position=True)
    labels = torch.cat([torch.ones(int(z.sum())), torch.zeros(n - int(z.sum()))]).double()
    erased = eraser(torch.cat([cond[z == 1], cond[z == 0]]))
    for i in range(length):
        rows = erased[:, i]
        cross = (rows - rows.mean(0)).T @ (labels - labels.mean()) / (n - 1)
        assert cross.abs().max() < 1e-6 * cond.abs().max(), i  # the eraser is stored in float32
    assert torch.equal(erased[:, 0], torch.full_like(erased[:, 0], 1.5))
    assert eraser(torch.zeros(2, length + 2, d))[:, length:].abs().max() == 0  # rows past the fit are untouched


def test_neutral_centre_keeps_the_neutral_mean_and_moves_the_concept_mean_onto_it():
    """r(x) = x - P (x - mean of the concept-free rows): still no linear signal (the cross-covariance ignores the
    centre), the concept-free rows' mean stays where it was, and the concept rows' mean lands on it, whereas plain
    LEACE leaves both class means at the overall mean."""
    x, z = concept_data(3000, seed=6)
    neutral_mean, concept_mean = x[z == 0].mean(0), x[z == 1].mean(0)
    eraser = L.fit_leace(x, z, centre="neutral")
    xe = eraser(x)
    cross = (xe - xe.mean(0)).T @ (z - z.mean())[:, None] / (len(z) - 1)
    assert cross.abs().max() < 1e-4 * x.abs().max()
    scale = (concept_mean - neutral_mean).norm()
    assert (xe[z == 0].mean(0) - neutral_mean).norm() < 1e-5 * scale
    assert (xe[z == 1].mean(0) - neutral_mean).norm() < 1e-5 * scale
    plain = L.fit_leace(x, z)(x)
    assert (plain[z == 1].mean(0) - x.mean(0)).norm() < 1e-5 * scale  # LEACE: both onto the overall mean
    assert torch.equal(eraser.projection, L.fit_leace(x, z).projection)  # the same projection, another centre
    with pytest.raises(ValueError, match="centre"):
        L.fit_leace(x, z, centre="middle")
    with pytest.raises(ValueError, match="without the concept"):
        L.fit_leace(x, torch.stack([z, 1 - z], 1), centre="neutral")  # every row carries one of two labels


def test_shrinkage_keeps_the_erasure_and_bounds_the_edit_of_an_unseen_input():
    """Fitting data that barely vary in some directions (few prompts) make plain LEACE's oblique projection move
    an input off those data without bound; whitening with Sigma + s * mean eigenvalue * I keeps the cross-covariance
    exactly zero (any invertible whitening does) and moves that input less than its own offset."""
    gen = torch.Generator().manual_seed(8)
    n, d = 400, 16
    z = (torch.rand(n, generator=gen) < 0.5).double()
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, 4:] *= 1e-3  # directions the fitting data barely vary in (still above the rank cut-off)
    x[:, 0] += 2.0 * z
    x[:, 5] += 1e-3 * z  # the concept shifts the data a little along one of them too
    edits = {}
    for shrinkage in (0.0, 0.01):
        eraser = L.fit_leace(x, z, centre="neutral", shrinkage=shrinkage)
        xe = eraser(x).double()
        cross = (xe - xe.mean(0)).T @ (z - z.mean())[:, None] / (n - 1)
        assert cross.abs().max() < 1e-6, shrinkage
        unseen = eraser.mean.double().clone()
        unseen[5] += 1.0  # one unit off the fitted data, along a barely-varying direction
        edits[shrinkage] = (eraser(unseen[None]).double()[0] - unseen).norm().item()
    assert edits[0.0] > 100.0  # plain LEACE: a hundred times the input's own offset
    assert edits[0.01] < 1.0
    with pytest.raises(ValueError, match="shrinkage"):
        L.fit_leace(x, z, shrinkage=-1.0)


def test_by_word_eraser_leaves_no_linear_signal_at_any_offset_from_the_word():
    """Rows labelled by their offset from the concept word (each offset a class): after erasure no offset's rows
    are linearly told apart from the unlabelled rows; rows before the word are unlabelled."""
    assert torch.equal(L.offset_labels(4, 1), torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0],
                                                            [0, 0, 1, 0]], dtype=torch.float64))
    gen = torch.Generator().manual_seed(9)
    n, length, d = 300, 5, 24
    concept = torch.randn(n, length, d, generator=gen, dtype=torch.float64)
    neutral = torch.randn(n, length, d, generator=gen, dtype=torch.float64)
    starts = torch.randint(1, 3, (n,), generator=gen).tolist()
    shift = torch.randn(length, d, generator=gen, dtype=torch.float64) * 2.0  # the word's trace, per offset
    for b, s in enumerate(starts):
        concept[b, s:] += shift[: length - s]
    eraser = L.fit_by_word(concept, neutral, starts, shrinkage=0.01)
    labels = torch.cat([torch.stack([L.offset_labels(length, s) for s in starts]).reshape(-1, length),
                        torch.zeros(n * length, length, dtype=torch.float64)])
    rows = torch.cat([concept, neutral]).reshape(-1, d)
    erased = eraser(rows)
    cross = (erased - erased.mean(0)).T @ (labels - labels.mean(0)) / (len(rows) - 1)
    before = (rows - rows.mean(0)).T @ (labels - labels.mean(0)) / (len(rows) - 1)
    assert before.abs().max() > 0.05 and cross.abs().max() < 1e-6
    with pytest.raises(ValueError, match="word positions"):
        L.fit_by_word(concept, neutral, starts[:-1])
