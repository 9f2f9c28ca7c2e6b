"""The batched torch GMM against sklearn 1.9.1 (mmdetection's GMM) and against mmdetection's own fits."""
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from golden_data import GOLDEN
from lad_pipeline.assign.gmm import fit_gmm, fit_gmm_sklearn, split_positives

EPS = np.finfo(np.float64).eps


def pad(sets: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sets)
    x = torch.zeros(len(sets), width, dtype=torch.float32)
    mask = torch.zeros(len(sets), width, dtype=torch.bool)
    for i, s in enumerate(sets):
        x[i, : len(s)] = torch.from_numpy(s)
        mask[i, : len(s)] = True
    return x, mask


def sklearn_gmm(sample: np.ndarray, max_iter: int = 100) -> GaussianMixture:
    """mmdetection's call (``paa_head.py``), on a float32 column."""
    x = sample.reshape(-1, 1)
    gmm = GaussianMixture(2, weights_init=np.array([0.5, 0.5]), means_init=np.array([x.min(), x.max()]).reshape(2, 1),
                          precisions_init=np.array([1.0, 1.0]).reshape(2, 1), covariance_type="diag", max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow on purpose in test_huge_scores
        return gmm.fit(x)


def rounding_margin(sample: np.ndarray) -> float:
    """How close sklearn's own split of ``sample`` is to a coin toss, in float64 ulps.

    The smallest distance of a decision (a sample's component, or which component-0 sample is the most likely)
    from its threshold, relative to the largest term sklearn adds up in that log-density (``x^2 / var``).
    Below ~16 the decision is made by rounding: another BLAS, libm or sample order may take it either way.
    """
    g = sklearn_gmm(sample)
    x = sample.astype(np.float64)[:, None]
    prec, mu, w = 1 / g.covariances_[:, 0], g.means_[:, 0], g.weights_
    logp = -0.5 * (math.log(2 * math.pi) + mu**2 * prec - 2 * x * mu * prec + x**2 * prec) + 0.5 * np.log(prec) + np.log(w)
    scale = (prec * np.maximum(x**2, mu**2)).max(axis=1) * EPS
    margins = list(np.abs(logp[:, 0] - logp[:, 1]) / scale)
    fg = logp[:, 0] >= logp[:, 1]
    if fg.sum() >= 2:
        score = np.logaddexp(logp[fg, 0], logp[fg, 1])
        top = np.argsort(score)[::-1][:2]
        margins.append((score[top[0]] - score[top[1]]) / scale[fg][top].max())
    return float(min(margins))


# --- golden fits: mmdetection's own sklearn calls ---------------------------------------------------


@pytest.mark.parametrize("fit", [fit_gmm, fit_gmm_sklearn], ids=["torch", "sklearn"])
@pytest.mark.parametrize("model", ["r50", "small"])
def test_golden_fits(model, fit):
    with np.load(GOLDEN / f"assign_{model}.npz") as f:
        ref = {k: f[k] for k in f.files}
    off = ref["gmm_offsets"]
    sets = [ref["gmm_cand_loss"][off[g]:off[g + 1]] for g in range(len(off) - 1)]
    x, mask = pad(sets)
    out = fit(x, mask)
    np.testing.assert_allclose(out.means.numpy(), ref["gmm_means"], rtol=1e-12)
    np.testing.assert_allclose(out.variances.numpy(), ref["gmm_vars"], rtol=1e-9)
    np.testing.assert_allclose(out.weights.numpy(), ref["gmm_weights"], rtol=1e-10)
    assert np.array_equal(out.n_iter.numpy(), ref["gmm_n_iter"])
    assert np.array_equal(out.converged.numpy(), ref["gmm_converged"].astype(bool))
    assert np.array_equal(out.predict[mask].numpy(), ref["gmm_predict"])
    np.testing.assert_allclose(out.score_samples[mask].numpy(), ref["gmm_score_samples"], rtol=0, atol=1e-10)
    assert out.score_samples.dtype == torch.float64 and out.predict.dtype == torch.int64
    assert np.array_equal(split_positives(out, mask).sum(1).numpy(), ref["gmm_num_pos"])


# --- random candidate sets against sklearn ---------------------------------------------------------

KINDS = ["bimodal", "unimodal", "ties", "outliers", "near_degenerate", "all_but_one_equal", "identical",
         "heavy_tail", "tiny"]


def random_sets(count: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """PAA-like candidate scores (float32, sorted, 2..45 samples) of several shapes."""
    rng = np.random.default_rng(seed)
    sets, kinds = [], []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        m = int(rng.integers(2, 5)) if kind == "tiny" else int(rng.integers(2, 46))
        c = rng.uniform(0.5, 5.0)
        if kind == "bimodal":
            a = int(rng.integers(1, m)) if m > 1 else 1
            v = np.concatenate([rng.normal(c, rng.uniform(0.05, 0.3), a),
                                rng.normal(c + rng.uniform(0.1, 2.0), rng.uniform(0.05, 0.6), m - a)])
        elif kind == "unimodal":
            v = rng.normal(c, rng.uniform(0.01, 1.0), m)
        elif kind == "ties":  # scores on a coarse grid: many exact duplicates
            v = np.round(rng.normal(c, 0.3, m) / 0.05) * 0.05
        elif kind == "outliers":  # far values above and below the bulk
            v = rng.normal(c, 0.1, m)
            k = int(rng.integers(1, 3))
            v[:k] = c + rng.choice([-1, 1], k) * rng.uniform(1, 20, k)
        elif kind == "near_degenerate":  # spread 1e-3..3e-2, just above sqrt(reg_covar)
            v = c + rng.normal(0, 1, m) * 10 ** rng.uniform(-3, -1.5)
        elif kind == "all_but_one_equal":
            v = np.full(m, c)
            v[int(rng.integers(0, m))] += rng.uniform(-1, 1)
        elif kind == "identical":
            v = np.full(m, c)
        elif kind == "heavy_tail":
            v = c + rng.exponential(0.5, m)
        else:
            v = rng.normal(c, 0.5, m)
        sets.append(np.sort(np.abs(v)).astype(np.float32))
        kinds.append(kind)
    return sets, kinds


def compare(sets: list[np.ndarray]) -> tuple[list[int], object, object, torch.Tensor]:
    x, mask = pad(sets)
    ours, ref = fit_gmm(x, mask), fit_gmm_sklearn(x, mask)
    differ = (split_positives(ours, mask) != split_positives(ref, mask)).any(dim=1)
    return differ.nonzero().squeeze(1).tolist(), ours, ref, mask


def test_random_sets_match_sklearn():
    """2,700 sets: identical positives on >= 99.9%; each difference must be a rounding-decided split."""
    sets, kinds = random_sets(2700, seed=0)
    differ, ours, ref, mask = compare(sets)
    listing = [(i, kinds[i], len(sets[i]), round(rounding_margin(sets[i]), 2)) for i in differ]
    # Expected: none. Observed on the development machine (sklearn 1.9.1, OpenBLAS): none.
    assert 1 - len(differ) / len(sets) >= 0.999, listing
    assert all(margin < 16 for *_, margin in listing), f"differences not explained by rounding: {listing}"
    same = ~torch.tensor([i in differ for i in range(len(sets))])
    assert (ours.n_iter == ref.n_iter)[same].float().mean() >= 0.999
    assert torch.equal(ours.converged, ref.converged)
    assert torch.equal(ours.predict[mask & same[:, None]], ref.predict[mask & same[:, None]])
    np.testing.assert_allclose(ours.means[same].numpy(), ref.means[same].numpy(), rtol=1e-9)
    np.testing.assert_allclose(ours.score_samples[mask & same[:, None]].numpy(),
                               ref.score_samples[mask & same[:, None]].numpy(), rtol=1e-6, atol=1e-6)
    assert set(kinds) == set(KINDS) and min(len(s) for s in sets) == 2 and max(len(s) for s in sets) == 45


def test_rounding_floor_sets_are_a_coin_toss_for_sklearn_too():
    """Spread below ~sqrt(reg_covar): both components sit on the same point and the split is rounding noise.

    Here no implementation can match sklearn set by set: sklearn disagrees with itself when the same samples
    come in another order. We require only that every difference is decided within rounding, and that we
    differ from sklearn no more often than sklearn differs from itself.
    """
    rng = np.random.default_rng(1)
    sets = [np.sort((rng.uniform(0.5, 5) + rng.normal(0, 1, m) * 10 ** rng.uniform(-7, -3.5)).astype(np.float32))
            for m in rng.integers(2, 46, size=400)]
    differ, *_ = compare(sets)
    unexplained = [(i, rounding_margin(sets[i])) for i in differ if rounding_margin(sets[i]) >= 16]
    assert not unexplained, unexplained

    def positives(sample, order):  # sklearn fitted on the samples in ``order``, split in ascending order
        g = sklearn_gmm(sample[order])
        back = np.argsort(order)
        return split_positives_np(g.predict(sample[order, None])[back], g.score_samples(sample[order, None])[back])

    orders = np.random.default_rng(2)
    unstable = 0  # sets whose sklearn split changes when the samples come reversed or shuffled (twice)
    for s in sets:
        base = positives(s, np.arange(len(s)))
        shuffles = [np.arange(len(s))[::-1].copy(), orders.permutation(len(s)), orders.permutation(len(s))]
        unstable += any(not np.array_equal(base, positives(s, o)) for o in shuffles)
    # development machine: we differ on 10 of 400, sklearn from itself on 11
    assert unstable > 0 and len(differ) <= 2 * unstable, (len(differ), unstable)


def split_positives_np(predict: np.ndarray, score: np.ndarray) -> np.ndarray:
    fg = np.nonzero(predict == 0)[0]
    pos = np.zeros(len(predict), dtype=bool)
    if len(fg):
        pos[fg[: int(np.argmax(score[fg])) + 1]] = True
    return pos


# --- degenerate sets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [2.5, 5.710039])
def test_identical_scores(value):
    """All candidates equal: one component, zero spread. Defined outcome: exactly one positive, the first.

    reg_covar keeps the variance finite (1e-6). At 5.710039 the float32 square rounds down by 1.4e-6 and
    sklearn raises "ill-defined empirical covariance" (mmdetection's step would crash); we clamp the
    variance to reg_covar and fit_gmm_sklearn falls back to that. mmdetection's own tie-break would take a
    ``topk(1)``-dependent prefix (torch 2.14's CPU topk returns index 7 of 9 equal values: 8 positives).
    """
    sample = np.full(9, value, dtype=np.float32)
    if value > 5:
        with pytest.raises(ValueError, match="ill-defined empirical covariance"):
            sklearn_gmm(sample)
    x, mask = pad([sample])
    for fit in (fit_gmm, fit_gmm_sklearn):
        out = fit(x, mask)
        assert out.predict.tolist() == [[0] * 9]
        assert torch.isfinite(out.score_samples).all() and len(set(out.score_samples[0].tolist())) == 1
        np.testing.assert_allclose(out.variances.numpy(), 1e-6, rtol=0.5)
        assert split_positives(out, mask).tolist() == [[True] + [False] * 8]


@pytest.mark.parametrize("scale", [1e6, 1e15, 1e20, 1e37])
def test_huge_scores(scale):
    """The split is scale-invariant; above ~1.8e19 sklearn's float32 squares overflow to NaN, ours do not."""
    rng = np.random.default_rng(3)
    base = np.sort(np.concatenate([rng.normal(2, 0.2, 10), rng.normal(3, 0.3, 12)])).astype(np.float32)
    x, mask = pad([base, (base * scale).astype(np.float32)])
    out = fit_gmm(x, mask)
    assert torch.isfinite(out.score_samples).all() and torch.isfinite(out.means).all()
    pos = split_positives(out, mask)
    assert torch.equal(pos[0], pos[1]) and 0 < int(pos[0].sum()) < 22
    assert torch.equal(split_positives(fit_gmm_sklearn(x, mask), mask), pos)
    if scale > 1e19:
        assert not np.isfinite(sklearn_gmm(x[1].numpy()).means_).all()


def test_two_samples_and_outlier_below():
    x, mask = pad([np.array([1.0, 1.5], np.float32), np.array([0.2, 3.0, 3.01, 3.02, 3.05, 3.1], np.float32)])
    out, ref = fit_gmm(x, mask), fit_gmm_sklearn(x, mask)
    assert torch.equal(split_positives(out, mask), split_positives(ref, mask))
    assert torch.equal(out.predict[mask], ref.predict[mask])


def test_not_converged_within_max_iter():
    sets, _ = random_sets(90, seed=7)
    x, mask = pad(sets)
    out, ref = fit_gmm(x, mask, max_iter=2), fit_gmm_sklearn(x, mask, max_iter=2)
    assert torch.equal(out.n_iter, ref.n_iter) and torch.equal(out.converged, ref.converged)
    assert not out.converged.all() and int(out.n_iter.max()) == 2
    np.testing.assert_allclose(out.means.numpy(), ref.means.numpy(), rtol=1e-9)


def test_batch_is_the_sum_of_its_rows():
    """Padding and batch-mates do not change a set's fit."""
    sets, _ = random_sets(40, seed=11)
    x, mask = pad(sets)
    batch = fit_gmm(x, mask)
    for i in range(0, 40, 7):
        n = len(sets[i])
        alone = fit_gmm(x[i:i + 1, :n], mask[i:i + 1, :n])
        np.testing.assert_allclose(alone.means.numpy(), batch.means[i:i + 1].numpy(), rtol=1e-13)
        assert torch.equal(alone.n_iter, batch.n_iter[i:i + 1])
        assert torch.equal(split_positives(alone, mask[i:i + 1, :n]), split_positives(batch, mask)[i:i + 1, :n])


def test_input_checks_and_float64():
    x, mask = pad([np.array([1.0, 2.0, 2.1], np.float32)])
    with pytest.raises(ValueError, match="at least 2"):
        fit_gmm(x[:, :1], mask[:, :1])
    with pytest.raises(ValueError, match=r"\[N, M\]"):
        fit_gmm(x[0], mask[0])
    empty = fit_gmm(x[:0], mask[:0])
    assert empty.means.shape == (0, 2) and empty.predict.shape == (0, 3)
    assert split_positives(fit_gmm(x.double(), mask), mask).tolist() == split_positives(fit_gmm(x, mask), mask).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    sets, _ = random_sets(300, seed=5)
    x, mask = pad(sets)
    cpu, gpu = fit_gmm(x, mask), fit_gmm(x.cuda(), mask.cuda())
    assert torch.equal(split_positives(cpu, mask), split_positives(gpu, mask.cuda()).cpu())
    np.testing.assert_allclose(gpu.means.cpu().numpy(), cpu.means.numpy(), rtol=1e-9)
