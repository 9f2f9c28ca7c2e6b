"""Two-component 1-D Gaussian mixtures for PAA's split, fitted for every candidate set of a batch at once.

mmdetection fits ``sklearn.mixture.GaussianMixture(2, covariance_type='diag', weights_init=[.5, .5],
means_init=[[min], [max]], precisions_init=[[1], [1]])`` once per GT, on CPU, on the GT's sorted float32
candidate scores. ``fit_gmm`` runs that same EM on a padded ``[N, M]`` batch in float64 on any device;
``fit_gmm_sklearn`` is the per-set loop through sklearn itself, kept as the reference.

What the batched fit reproduces from sklearn 1.9.1 (``_gaussian_mixture.py``, ``_base.py``):

* updates: ``nk = sum(resp) + 10 * eps``, ``mean = resp.x / nk``, ``var = resp.x^2 / nk - mean^2 + reg_covar``,
  ``weights = nk / sum(nk)``, precision Cholesky ``1 / sqrt(var)``;
* the float32 quirks of mmdetection's call: ``X * X`` and ``means_init ** 2`` are squared in float32 and
  only then mixed with float64 parameters (the rounding of ``x^2`` moves log-likelihoods by ~1e-5, enough
  to move the split, so it is emulated rather than improved);
* the log-density in sklearn's expanded form ``mu^2 p - 2 x mu p + x^2 p``;
* stopping: the lower bound is the mean log-likelihood of the E-step that precedes each M-step;
  ``|change| < tol`` stops after that M-step; ``n_iter`` and ``converged`` as sklearn reports them;
* ``predict`` = argmax of the weighted log-probabilities (component 0 on a tie), ``score_samples`` = their
  log-sum-exp.

Numbers agree with sklearn to rounding (BLAS and libm differ in the last bits), not bit for bit; a split
decided within that rounding (sets spread less than ~sqrt(reg_covar), whose two components coincide) can
come out either way, as it does for sklearn itself when the same samples come in another order.

Deliberate differences, both where sklearn fails and mmdetection's training step would crash or go NaN:
* a variance ``<= 0`` (identical scores whose float32 squares round down by more than ``reg_covar``;
  sklearn raises "ill-defined empirical covariance") becomes ``reg_covar``, what exact arithmetic gives;
* a square that overflows float32 (scores above ~1.8e19; sklearn returns NaN) is taken in float64.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

REG_COVAR = 1e-6
TOL = 1e-3
MAX_ITER = 100
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_EPS64 = float(np.finfo(np.float64).eps)


class GMMFit(NamedTuple):
    """Fitted mixtures of ``N`` candidate sets, padded to ``M`` samples (float64 unless said otherwise).

    ``variances`` include ``reg_covar`` (sklearn's ``covariances_``). ``predict`` is the component of each
    sample (int64, 0 = the component started at the minimum); ``score_samples`` the log-likelihood of each
    sample under the mixture. Both are meaningless where the mask is False.
    """

    means: Tensor  # [N, 2]
    variances: Tensor  # [N, 2]
    weights: Tensor  # [N, 2]
    n_iter: Tensor  # [N] int64
    converged: Tensor  # [N] bool
    predict: Tensor  # [N, M] int64
    score_samples: Tensor  # [N, M]


def _log_densities(weights: Tensor, means: Tensor, variances: Tensor, x: Tensor, sq: Tensor,
                   means_sq: Tensor | None = None) -> Tensor:
    """Weighted log-density of each component at every sample: ``[2, N, M]`` (component-major).

    Parameters are ``[2, N, 1]``, ``weights`` already divided by sqrt(2 pi); ``x`` and ``sq`` (its square)
    ``[2, N, M]``. sklearn's form, ``-0.5 (log 2pi + mu^2 p - 2 x mu p + x^2 p) + log(chol) + log(w)`` with
    ``chol = 1/sqrt(var)`` and ``p = chol^2``, evaluated as ``a + b x + c x^2``. Element-wise on purpose: as a
    bmm this product takes the multi-threaded BLAS path, 5-60x slower at this size on a busy machine.
    """
    chol = variances.rsqrt()
    prec = chol * chol
    b = means * prec
    mu2p = (means_sq * prec) if means_sq is not None else means * b
    a = torch.log(weights * chol).add_(mu2p, alpha=-0.5)
    return (x * b).add_(a).addcmul_(prec * -0.5, sq)  # x first: the result takes its contiguous layout


def _features(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """float64 samples padded with a finite value, sklearn's float32 square, min and max."""
    big = torch.finfo(x.dtype).max
    lo = x.masked_fill(~mask, big).amin(dim=1)
    hi = x.masked_fill(~mask, -big).amax(dim=1)
    x = torch.where(mask, x, lo[:, None])  # padding stays finite and in range
    x64 = x.double()
    return x64, _square(x, x64), lo, hi


def _square(x: Tensor, x64: Tensor) -> Tensor:
    """sklearn's square of float32 data: rounded to float32 (exact square where that overflows)."""
    sq = x * x
    return torch.where(torch.isfinite(sq), sq.double(), x64 * x64)


def _empty_fit(n_sets: int, width: int, dev: torch.device) -> GMMFit:
    z = torch.zeros(n_sets, 2, dtype=torch.float64, device=dev)
    return GMMFit(z, z, z, torch.zeros(n_sets, dtype=torch.int64, device=dev),
                  torch.zeros(n_sets, dtype=torch.bool, device=dev),
                  torch.zeros(n_sets, width, dtype=torch.int64, device=dev),
                  torch.zeros(n_sets, width, dtype=torch.float64, device=dev))


def fit_gmm(
    x: Tensor, mask: Tensor, *, reg_covar: float = REG_COVAR, tol: float = TOL, max_iter: int = MAX_ITER
) -> GMMFit:
    """Fit every row of ``x [N, M]`` (valid where ``mask``; at least 2 samples per row) at once.

    ``x`` float32 (as mmdetection passes it; squares are then rounded as sklearn rounds them) or float64.
    Runs on ``x``'s device; every set keeps the parameters of its own convergence iteration, as sklearn.
    """
    if x.ndim != 2 or x.shape != mask.shape:
        raise ValueError(f"x and mask must both be [N, M], got {tuple(x.shape)} and {tuple(mask.shape)}")
    if max_iter < 1:
        raise ValueError("max_iter must be at least 1")
    n_sets, width = x.shape
    dev = x.device
    if n_sets == 0:
        return _empty_fit(0, width, dev)
    with torch.inference_mode():  # ~12% faster than no_grad at these sizes; outputs are cloned out of it
        count = mask.sum(dim=1)
        if bool((count < 2).any()):
            raise ValueError("every candidate set needs at least 2 samples (sklearn's requirement)")
        x64, sq64, lo, hi = _features(x, mask)
        valid = mask.double()
        xs, sqs = (t.expand(2, n_sets, width).contiguous() for t in (x64, sq64))  # padding included
        feats = torch.stack((valid, x64 * valid, sq64 * valid), dim=2)  # [N, M, 3], padding zero
        mean_weight = (valid / count[:, None])[..., None]  # [N, M, 1]: the bound is a mean over samples
        # weights = nk / sum(nk), and sum(nk) = n + 20 eps; folded with log-density's 1/sqrt(2 pi)
        weight_scale = (_INV_SQRT_2PI / (count.double() + 20 * _EPS64))[None, :, None]

        init_means = torch.stack((lo, hi))[..., None]  # input dtype, as mmdetection's means_init
        w = _log_densities(
            torch.full((2, n_sets, 1), 0.5 * _INV_SQRT_2PI, dtype=torch.float64, device=dev),
            init_means.double(),
            torch.ones(2, n_sets, 1, dtype=torch.float64, device=dev),
            xs, sqs,
            means_sq=_square(init_means, init_means.double()),
        )
        history: tuple[list[Tensor], ...] = ([], [], [])  # weight / sqrt(2 pi), mean, var after each M-step
        bounds: list[Tensor] = []  # lower bound of each E-step, [N, 1, 1]
        check_every = 1 if dev.type == "cpu" else 4  # each look is a host sync: cheap on CPU only
        reg = torch.full((), reg_covar, dtype=torch.float64, device=dev)
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        seen = torch.zeros(n_sets, 1, 1, dtype=torch.bool, device=dev)  # converged at some iteration so far
        for it in range(max_iter):
            # E-step: log-odds (w0 - w1, w1 - w0) -> responsibilities; log-sum-exp -> lower bound
            odds = w - w.flip(0)  # (w0 - w1, w1 - w0)
            resp = torch.sigmoid(odds)  # [2, N, M]
            lse = F.softplus(odds[0], threshold=40.0).add_(w[1])
            bounds.append(torch.bmm(lse[:, None], mean_weight))
            # M-step, on [2, N, 1] columns
            stats = torch.bmm(resp.transpose(0, 1), feats).transpose(0, 1)  # sum r, sum r x, sum r x^2
            nk = stats[..., :1] + 10 * _EPS64
            moments = stats / nk
            means = moments[..., 1:2]
            var = torch.addcmul(moments[..., 2:], means, means, value=-1.0).add_(reg_covar)
            var = torch.where(torch.gt(var, zero), var, reg)  # sklearn raises here; see the module docstring
            weights = nk * weight_scale
            for column, value in zip(history, (weights, means, var)):
                column.append(value)
            w = _log_densities(weights, means, var, xs, sqs)
            if it > 0:
                seen |= (bounds[-1] - bounds[-2]).abs_() < tol
            if (it + 1) % check_every == 0 and bool(seen.all()):
                break
        first = _first_converged(torch.stack(bounds)[:, :, 0, 0], tol)
        converged = first >= 0
        n_iter = torch.where(converged, first + 1, torch.full_like(first, len(bounds)))
        pick = (n_iter - 1).view(1, 1, n_sets, 1).expand(1, 2, n_sets, 1)
        best_w, best_mean, best_var = (torch.stack(column).gather(0, pick)[0] for column in history)  # [2, N, 1]
        w = _log_densities(best_w, best_mean, best_var, xs, sqs)
        predict = (w[1] > w[0]).long()  # argmax, component 0 on a tie
        score = F.softplus(w[0] - w[1], threshold=40.0).add_(w[1])
        weights, means, var = (t[..., 0].t() for t in (best_w, best_mean, best_var))  # [N, 2] each
        weights = weights / _INV_SQRT_2PI
    outputs = (means, var, weights, n_iter, converged, predict, score)
    return GMMFit(*(t.clone(memory_format=torch.contiguous_format) for t in outputs))


def _first_converged(bounds: Tensor, tol: float) -> Tensor:
    """Per set, the 0-based iteration whose lower-bound change is first below ``tol``; -1 if none."""
    change = bounds[1:] - bounds[:-1]  # iteration 0 compares with -inf: never converged
    if change.shape[0] == 0:
        return torch.full(bounds.shape[1:], -1, dtype=torch.int64, device=bounds.device)
    hit = change.abs() < tol
    first = hit.int().argmax(dim=0) + 1
    return torch.where(hit.any(dim=0), first, torch.full_like(first, -1)).long()


def fit_gmm_sklearn(
    x: Tensor, mask: Tensor, *, reg_covar: float = REG_COVAR, tol: float = TOL, max_iter: int = MAX_ITER
) -> GMMFit:
    """The reference: one ``sklearn.mixture.GaussianMixture`` per row, exactly as mmdetection builds it.

    A row sklearn fails on is fitted by ``fit_gmm`` instead: a variance <= 0 (sklearn raises and mmdetection's
    step crashes) or scores above ~1.8e19 (their float32 squares overflow and sklearn returns NaN).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    n_sets, width = x.shape
    means = np.zeros((n_sets, 2))
    variances = np.zeros((n_sets, 2))
    weights = np.zeros((n_sets, 2))
    n_iter = np.zeros(n_sets, dtype=np.int64)
    converged = np.zeros(n_sets, dtype=bool)
    predict = np.zeros((n_sets, width), dtype=np.int64)
    score = np.full((n_sets, width), -np.inf)
    xs, ms = x.detach().cpu().numpy(), mask.cpu().numpy()
    for i in range(n_sets):
        sample = xs[i][ms[i]].reshape(-1, 1)
        gmm = GaussianMixture(
            2,
            weights_init=np.array([0.5, 0.5]),
            means_init=np.array([sample.min(), sample.max()]).reshape(2, 1),
            precisions_init=np.array([1.0, 1.0]).reshape(2, 1),
            covariance_type="diag",
            reg_covar=reg_covar,
            tol=tol,
            max_iter=max_iter,
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", (ConvergenceWarning, RuntimeWarning))
                gmm.fit(sample)
            failed = not np.isfinite(gmm.means_).all()  # float32 squares overflowed: NaN parameters
        except ValueError:  # "ill-defined empirical covariance"
            failed = True
        if failed:
            row = fit_gmm(x[i : i + 1].cpu(), mask[i : i + 1].cpu(), reg_covar=reg_covar, tol=tol, max_iter=max_iter)
            means[i], variances[i], weights[i] = row.means[0].numpy(), row.variances[0].numpy(), row.weights[0].numpy()
            n_iter[i], converged[i] = int(row.n_iter[0]), bool(row.converged[0])
            predict[i], score[i] = row.predict[0].numpy(), row.score_samples[0].numpy()
            continue
        means[i], variances[i], weights[i] = gmm.means_[:, 0], gmm.covariances_[:, 0], gmm.weights_
        n_iter[i], converged[i] = gmm.n_iter_, gmm.converged_
        predict[i][ms[i]] = gmm.predict(sample)
        score[i][ms[i]] = gmm.score_samples(sample)
    dev = x.device
    outputs = (means, variances, weights, n_iter, converged, predict, score)
    return GMMFit(*(torch.from_numpy(a).to(dev) for a in outputs))


def split_positives(fit: GMMFit, mask: Tensor) -> Tensor:
    """PAA's separation scheme (c) on ascending-sorted sets: ``[N, M]`` bool positives.

    Among the samples predicted as component 0, the prefix up to and including the one with the highest
    ``score_samples``; nothing when no sample is predicted 0. A tie for the highest score resolves to the
    first (mmdetection's ``topk(1)`` picks an implementation-defined one).
    """
    fg = (fit.predict == 0) & mask
    best = fit.score_samples.masked_fill(~fg, -math.inf).argmax(dim=1, keepdim=True)
    rank = fg.long().cumsum(dim=1)
    return fg & (rank <= rank.gather(1, best)) & fg.any(dim=1, keepdim=True)
