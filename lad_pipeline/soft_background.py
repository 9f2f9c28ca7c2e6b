"""The background model of a soft record: the teacher's class logits of the entries a record does not store.

Per FPN level, ``logit[a, c] = mu[c] + sum_j z[a, j] W[j, c]``: ``W`` the level's leading principal
directions of the teacher's logits (the stored entries imputed from the model, so that the objects' top
classes do not pull them), ``z`` each anchor's coordinates, quantized to 4 or 8 bits, per-class gains on
``W`` so that the rebuilt entries' summed negative entropy is the teacher's, and offsets ``mu`` so that their
summed probability is. Everything runs in float64 on the CPU: the same outputs give the same bytes on any
machine. docs/cache-format.md ("Soft labels") states the rule and why.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

LOGIT_CLAMP = 30.0  # background offsets and fitted logits stay within +-30 (probabilities 1e-13 .. 1 - 1e-13)
CODE_BITS = (4, 8)  # per-anchor codes: two per byte, or one
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


def _solve_offsets(base: Tensor, unstored: Tensor, prob: Tensor) -> Tensor:
    """Per-class offsets ``mu [C]`` (float64) such that ``sum over unstored rows of sigmoid(mu + base)``
    equals the teacher's ``sum of prob`` there, column by column (Newton from the mean-prior start)."""
    count = unstored.sum(0)
    target = (prob * unstored).sum(0)
    mean = (base * unstored).sum(0) / count.clamp(min=1)
    mu = torch.logit((target / count.clamp(min=1)).clamp(1e-13, 1 - 1e-13)) - mean
    for _ in range(NEWTON_STEPS):
        q = torch.sigmoid(mu + base)
        slope = (q * (1 - q) * unstored).sum(0)
        step = (((q * unstored).sum(0) - target) / slope.clamp(min=1e-300)).clamp(-4.0, 4.0)
        mu = mu - step
        if float(step.abs().max()) < CONVERGED:
            break
    return torch.where(count > 0, mu, torch.zeros_like(mu)).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)


def _neg_entropy(p: Tensor) -> Tensor:
    """``p log p + (1 - p) log(1 - p)``: the part of ``KL(p || s)`` that does not depend on the student."""
    return torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)


def _solve_gains(base: Tensor, unstored: Tensor, prob: Tensor) -> Tensor:
    """Per-class gains ``g [C]`` of the coded part: with offsets ``mu``, ``sigmoid(mu + g * base)`` over the
    unstored rows matches the teacher's summed probability *and* summed negative entropy, column by column
    (damped 2-D Newton). A least-squares fit of the logits shrinks their spread; the entropy sum restores
    the spread the KL sees. Columns where it cannot be solved keep gain 1."""
    count = unstored.sum(0)
    target_p = (prob * unstored).sum(0)
    target_h = (_neg_entropy(prob) * unstored).sum(0)
    mean = (base * unstored).sum(0) / count.clamp(min=1)
    mu = torch.logit((target_p / count.clamp(min=1)).clamp(1e-13, 1 - 1e-13)) - mean
    gain = torch.ones_like(mu)
    for _ in range(NEWTON_STEPS):
        q = torch.sigmoid(mu + gain * base)
        dq = q * (1 - q) * unstored
        dh = dq * torch.logit(q.clamp(1e-15, 1 - 1e-15))  # d(neg entropy)/dx = logit(q) q (1 - q)
        f1 = (q * unstored).sum(0) - target_p
        f2 = (_neg_entropy(q) * unstored).sum(0) - target_h
        a11, a12 = dq.sum(0), (dq * base).sum(0)
        a21, a22 = dh.sum(0), (dh * base).sum(0)
        det = a11 * a22 - a12 * a21
        ok = det.abs() > 1e-30 * (a11.abs() * a22.abs()).clamp(min=1e-300)
        safe = torch.where(ok, det, torch.ones_like(det))
        step_mu = torch.where(ok, (a22 * f1 - a12 * f2) / safe, f1 / a11.clamp(min=1e-300)).clamp(-2.0, 2.0)
        step_gain = torch.where(ok, (a11 * f2 - a21 * f1) / safe, torch.zeros_like(det)).clamp(-0.5, 0.5)
        mu, gain = mu - step_mu, (gain - step_gain).clamp(0.0, 4.0)
        if float(torch.maximum(step_mu.abs(), step_gain.abs()).max()) < CONVERGED:
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
    for _ in range(IMPUTE_ROUNDS):
        mean = filled.mean(0)
        centred = filled - mean
        _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        axis = vectors[:, -rank:].flip(1).T.contiguous()
        # a deterministic sign: the largest component of each direction is positive
        sign = torch.sign(axis.gather(1, axis.abs().argmax(1, keepdim=True)))
        axis = axis * torch.where(sign == 0, torch.ones_like(sign), sign)
        gram = torch.einsum("nc,rc,sc->nrs", unstored, axis, axis) + 1e-9 * torch.eye(rank, dtype=values.dtype)
        z = torch.linalg.solve(gram, torch.einsum("nc,rc->nr", unstored * (values - mean), axis))
        filled = torch.where(unstored > 0, values, mean + z @ axis)
    return axis, z


def fit_level(logits: Tensor, unstored: Tensor, rank: int, bits: int):
    """The background model of one level: ``(mu [C], axis [r, C] fp16-rounded, low [r], step [r] float32,
    code [n, r] uint8 < 2**bits)``, all from the level's teacher logits ``[n, C]`` (float64)."""
    levels = 2 ** bits - 1
    x = logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    num, num_classes = x.shape
    base = torch.zeros_like(x)
    axis = x.new_zeros(rank, num_classes)
    low = x.new_zeros(rank)
    step = x.new_zeros(rank)
    code = torch.zeros(num, rank, dtype=torch.uint8)
    if rank and num > 1:
        axis, z = _principal_directions(x, unstored, rank)
        axis = axis.half().double()  # as stored
        low = z.min(0).values.float().double()
        step = ((z.max(0).values - low) / levels).float().double()
        q = torch.round((z - low) / step.clamp(min=1e-30)).clamp(0, levels)
        code = torch.where(step > 0, q, torch.zeros_like(q)).to(torch.uint8)
        z = low + code.double() * step
        gain = _solve_gains(z @ axis, unstored, torch.sigmoid(logits))
        axis = (axis * gain).half().double()  # the gains live in the stored directions
        base = z @ axis
    mu = _solve_offsets(base, unstored, torch.sigmoid(logits))
    return mu, axis, low, step, code
