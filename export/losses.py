"""Segmentation training losses: class-weighted cross-entropy, optionally label-smoothed, and
online hard example mining (OHEM) over pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore: int,
                      label_smoothing: float = 0.0, ohem_p: float = 0.0, ohem_min_frac: float = 1 / 16) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels.

    ``ohem_p`` > 0 keeps only the hard pixels, those whose true class has probability below
    ``ohem_p``, and at least ``ohem_min_frac`` of the labelled pixels (the hardest), as in
    PSPNet/BiSeNet's OHEM: easy sky and road stop dominating the gradient.
    """
    if not ohem_p:
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore, label_smoothing=label_smoothing)
    per_pixel = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore, reduction="none",
                                label_smoothing=label_smoothing).flatten()
    valid = (target != ignore).flatten()
    n_valid = int(valid.sum())
    if n_valid == 0:
        return logits.sum() * 0.0
    with torch.no_grad():
        safe = target.clamp_max(logits.shape[1] - 1)
        p_true = torch.softmax(logits.float(), 1).gather(1, safe[:, None])[:, 0].flatten()
        p_true = torch.where(valid, p_true, torch.full_like(p_true, 2.0))  # void never hard
        min_kept = max(1, int(n_valid * ohem_min_frac))
        hard = p_true < ohem_p
        if int(hard.sum()) < min_kept:
            threshold = p_true.kthvalue(min_kept).values
            hard = p_true <= threshold
        hard &= valid
    # Normalised like cross_entropy's weighted mean, so OHEM changes which pixels count, not the scale.
    denom = weight[target.flatten()[hard]].sum() if weight is not None else hard.sum()
    return per_pixel[hard].sum() / denom.clamp_min(1e-12)
