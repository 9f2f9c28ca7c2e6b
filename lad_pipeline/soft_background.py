"""The background model of a soft record: the teacher's class logits of the entries a record does not store.

Per FPN level, ``logit[a, c] = mu[c] + sum_j z[a, j] W[j, c]``: ``W`` the level's leading principal
directions of the teacher's logits (the stored entries imputed from the model, so that the objects' top
classes do not pull them), ``z`` each anchor's coordinates, quantized to 4 or 8 bits, per-class gains on
``W`` so that the rebuilt entries' summed negative entropy is the teacher's, and offsets ``mu`` so that their
summed probability is. Everything runs in float64 on the teacher's device, all levels of a view together: the
same outputs give the same bytes on one device type; a CPU and a GPU agree to float64 rounding (docs/cache-format.md,
"Soft labels", states the rule and why).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

LOGIT_CLAMP = 30.0  # background offsets and fitted logits stay within +-30 (probabilities 1e-13 .. 1 - 1e-13)
NEWTON_STEPS = 60  # at most, of the per-(level, class) solves; they converge in < 15 from the mean-prior start
CONVERGED = 1e-10  # a Newton solve stops once no step is larger (logit units)
IMPUTE_ROUNDS = 3  # fits of the background directions, the stored entries imputed from the previous one


def code_bits(num_bytes: int, num_codes: int) -> int:
    """Bits per code of ``num_codes`` codes packed in ``num_bytes`` (8 or 4; 8 when there are none)."""
    if num_bytes == num_codes:
        return 8
    if num_bytes == -(-num_codes // 2):
        return 4
    raise ValueError(f"{num_bytes} code bytes cannot hold {num_codes} codes of 4 or 8 bits")


def pack_codes(codes: Tensor, bits: int) -> np.ndarray:
    """``codes`` (uint8 values < 2**bits, any shape) flattened and packed into bytes."""
    flat = codes.reshape(-1).to(torch.uint8).cpu().numpy()
    if bits == 8:
        return np.ascontiguousarray(flat)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return np.ascontiguousarray(flat[0::2] | (flat[1::2] << 4))


def unpack_codes(data: np.ndarray, num_codes: int) -> np.ndarray:
    """The ``num_codes`` codes packed by ``pack_codes`` (uint8)."""
    data = np.asarray(data, np.uint8)
    if code_bits(data.shape[0], num_codes) == 8:
        return data
    return np.stack([data & 0x0F, data >> 4], axis=1).reshape(-1)[:num_codes]


def _solve_offsets(base: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    """Per-(level, class) offsets ``mu [L, C]`` (float64) such that ``sum_k weight[k] sigmoid(mu + base[k])``
    equals the teacher's summed probability ``target`` of the unstored entries, column by column (Newton from
    the mean-prior start). ``base``/``weight`` ``[L, K, C]``: the distinct coded logits of a level's unstored
    entries and how many entries have each (``_coded_groups``)."""
    count = weight.sum(1)
    mean = (base * weight).sum(1) / count.clamp(min=1)
    mu = torch.logit((target / count.clamp(min=1)).clamp(1e-13, 1 - 1e-13)) - mean
    active = torch.ones(mu.shape[0], 1, dtype=torch.bool, device=mu.device)  # levels still iterating
    for _ in range(NEWTON_STEPS):
        q = torch.sigmoid(mu[:, None] + base)
        slope = (q * (1 - q) * weight).sum(1)
        step = (((q * weight).sum(1) - target) / slope.clamp(min=1e-300)).clamp(-4.0, 4.0)
        mu = torch.where(active, mu - step, mu)
        active &= step.abs().amax(1, keepdim=True) >= CONVERGED
        if not bool(active.any()):  # one look per step for every level of the view
            break
    return torch.where(count > 0, mu, torch.zeros_like(mu)).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)


def _neg_entropy(p: Tensor) -> Tensor:
    """``p log p + (1 - p) log(1 - p)``: the part of ``KL(p || s)`` that does not depend on the student."""
    return torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)


def _solve_gains(base: Tensor, weight: Tensor, target_p: Tensor, target_h: Tensor) -> Tensor:
    """Per-(level, class) gains ``g [L, C]`` of the coded part: with offsets ``mu``, ``sigmoid(mu + g * base)``
    over the unstored entries matches the teacher's summed probability ``target_p`` *and* summed negative
    entropy ``target_h``, column by column (damped 2-D Newton); ``base``/``weight`` as in ``_solve_offsets``. A
    least-squares fit of the logits shrinks their spread; the entropy sum restores the spread the KL sees.
    Columns where it cannot be solved keep gain 1."""
    count = weight.sum(1)
    mean = (base * weight).sum(1) / count.clamp(min=1)
    mu = torch.logit((target_p / count.clamp(min=1)).clamp(1e-13, 1 - 1e-13)) - mean
    gain = torch.ones_like(mu)
    active = torch.ones(mu.shape[0], 1, dtype=torch.bool, device=mu.device)
    for _ in range(NEWTON_STEPS):
        q = torch.sigmoid(mu[:, None] + gain[:, None] * base)
        dq = q * (1 - q) * weight
        dh = dq * torch.logit(q.clamp(1e-15, 1 - 1e-15))  # d(neg entropy)/dx = logit(q) q (1 - q)
        f1 = (q * weight).sum(1) - target_p
        f2 = (_neg_entropy(q) * weight).sum(1) - target_h
        a11, a12 = dq.sum(1), (dq * base).sum(1)
        a21, a22 = dh.sum(1), (dh * base).sum(1)
        det = a11 * a22 - a12 * a21
        ok = det.abs() > 1e-30 * (a11.abs() * a22.abs()).clamp(min=1e-300)
        safe = torch.where(ok, det, torch.ones_like(det))
        step_mu = torch.where(ok, (a22 * f1 - a12 * f2) / safe, f1 / a11.clamp(min=1e-300)).clamp(-2.0, 2.0)
        step_gain = torch.where(ok, (a11 * f2 - a21 * f1) / safe, torch.zeros_like(det)).clamp(-0.5, 0.5)
        mu = torch.where(active, mu - step_mu, mu)
        gain = torch.where(active, (gain - step_gain).clamp(0.0, 4.0), gain)
        active &= torch.maximum(step_mu.abs(), step_gain.abs()).amax(1, keepdim=True) >= CONVERGED
        if not bool(active.any()):
            break
    solved = (count > 1) & torch.isfinite(gain)
    return torch.where(solved, gain, torch.ones_like(gain))


def _principal_directions(values: Tensor, unstored: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(axis [r, C], z [n, r])``: the level's leading directions of the logits of the unstored entries
    and each anchor's coordinates on them (least squares over its unstored entries).

    The stored entries (an anchor's top classes) are not background and would pull the directions towards
    the objects, so they are imputed from the model itself and the fit repeated (a few EM rounds).
    """
    filled = torch.where(unstored > 0, values, (values * unstored).sum(0) / unstored.sum(0).clamp(min=1))
    eye = torch.eye(rank, dtype=values.dtype, device=values.device)
    for _ in range(IMPUTE_ROUNDS):
        mean = filled.mean(0)
        centred = filled - mean
        _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        axis = vectors[:, -rank:].flip(1).T.contiguous()
        # a deterministic sign: the largest component of each direction is positive
        sign = torch.sign(axis.gather(1, axis.abs().argmax(1, keepdim=True)))
        axis = axis * torch.where(sign == 0, torch.ones_like(sign), sign)
        gram = torch.einsum("nc,rc,sc->nrs", unstored, axis, axis) + 1e-9 * eye
        z = torch.linalg.solve(gram, torch.einsum("nc,rc->nr", unstored * (values - mean), axis))
        filled = torch.where(unstored > 0, values, mean + z @ axis)
    return axis, z


def fit_levels(logits: Tensor, unstored: Tensor, level_sizes: Sequence[int], rank: int, bits: int, *,
               group_codes: bool = True) -> list[tuple]:
    """The background model of every level of one view: per level ``(mu [C], axis [r, C] fp16-rounded,
    low [r], step [r] float32, code [n, r] uint8 < 2**bits)``, from the teacher logits ``[A, C]`` (float64, on
    any device; levels one after the other, ``level_sizes`` anchors each) and the unstored mask.

    The directions are fitted level by level. The gain and offset solves sum over a level's distinct code
    tuples (at most ``2**(bits * rank)`` of them) rather than over its anchors, all levels at once; when there
    can be more tuples than anchors they sum over the anchors, level by level (``group_codes=False``: always,
    the reference the grouping reproduces).
    """
    levels = 2 ** bits - 1
    x = logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    prob = torch.sigmoid(logits)
    num_classes, dev = x.shape[1], x.device
    num_keys = 2 ** (bits * rank)
    grouped = group_codes and num_keys <= max(level_sizes, default=0)  # rank 0: one group, the offset alone
    keys = torch.arange(num_keys, device=dev)
    key_codes = (torch.stack([(keys >> (bits * j)) & levels for j in range(rank)], dim=1) if rank
                 else keys.new_zeros(num_keys, 0)).double()  # [K, r]: each key's code tuple
    fits, weights, targets_p, targets_h = [], [], [], []
    for xs, us, ps in zip(x.split(level_sizes), unstored.split(level_sizes), prob.split(level_sizes)):
        n = xs.shape[0]
        axis, low, step = x.new_zeros(rank, num_classes), x.new_zeros(rank), x.new_zeros(rank)
        code = torch.zeros(n, rank, dtype=torch.uint8, device=dev)
        if rank and n > 1:
            axis, z = _principal_directions(xs, us, rank)
            axis = axis.half().double()  # as stored
            low = z.min(0).values.float().double()
            step = ((z.max(0).values - low) / levels).float().double()
            q = torch.round((z - low) / step.clamp(min=1e-30)).clamp(0, levels)
            code = torch.where(step > 0, q, torch.zeros_like(q)).to(torch.uint8)
        fits.append([axis, low, step, code])
        weights.append(_coded_weight(code, us, bits, num_keys) if grouped else us)
        targets_p.append((ps * us).sum(0))
        targets_h.append((_neg_entropy(ps) * us).sum(0))

    def coded_logits(fit) -> Tensor:  # each group's coded logits on the level's directions
        axis, low, step, code = fit
        return (low + (key_codes if grouped else code.double()) * step) @ axis

    def solve(solver, *per_level) -> Tensor:  # [L, C]: all levels in one solve, or level by level
        if grouped:
            return solver(*(torch.stack(t) for t in per_level))
        return torch.cat([solver(*(t[lvl][None] for t in per_level)) for lvl in range(len(level_sizes))])

    if rank:
        gain = solve(_solve_gains, [coded_logits(f) for f in fits], weights, targets_p, targets_h)
        for fit, g, n in zip(fits, gain, level_sizes):
            if n > 1:
                fit[0] = (fit[0] * g).half().double()  # the gains live in the stored directions
    mu = solve(_solve_offsets, [coded_logits(f) for f in fits], weights, targets_p)
    return [(m, *fit) for m, fit in zip(mu, fits)]


def _coded_weight(code: Tensor, unstored: Tensor, bits: int, num_keys: int) -> Tensor:
    """``[K, C]``: a level's unstored entries per code tuple (key ``sum_j code[:, j] << bits * j``) and class.
    Anchors with one code tuple have one coded logit per class, so the solves need only these counts."""
    key = torch.zeros(code.shape[0], dtype=torch.int64, device=code.device)
    for j in range(code.shape[1]):
        key += code[:, j].long() << (bits * j)
    return unstored.new_zeros(num_keys, unstored.shape[1]).index_add_(0, key, unstored)
