"""Training losses (torch only): SFT on completion tokens, PRM binary cross-entropy at step ends, ORM at the last
token. Formulas as in docs/methods.md; every function takes already-computed logits, so each is testable with
hand-built tensors and no model.

- SFT: L = sum_b w_b sum_t m_{b,t} * -log p(x_{b,t+1} | x_{b,<=t}) / sum_b w_b sum_t m_{b,t}: a weighted mean over
  completion tokens (m marks the tokens that are targets: the completion and its end-of-turn token, never the
  prompt). Normalising by the weighted token count, not the batch size, keeps a long solution from outweighing
  many short ones token for token, and makes the weights scale-free (only their ratios matter).
- PRM: r_t = sigmoid(s_t) read at the last token of step t; L = mean over labelled steps of
  -[c_t log r_t + (1 - c_t) log(1 - r_t)], c_t in [0, 1] (soft Monte-Carlo values) or {0, 1} (hard labels).
  The mean (not the sum of methods.md) over all labelled steps in the batch keeps the learning rate independent
  of solution length; steps without a label (mask 0) contribute nothing.
- ORM: the same binary cross-entropy on one logit per sequence (the last token), c = Ver(y).

All reductions return a zero that is still connected to the graph when nothing is labelled, so a DDP step on an
empty batch still all-reduces gradients on every rank (a rank that skipped backward would hang the others).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _weighted_mean(values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None,
                   anchor: torch.Tensor) -> torch.Tensor:
    """sum(values * mask * w) / sum(mask * w); values, mask: (B, N); weights: (B,) or None; anchor keeps the graph."""
    m = mask.to(values.dtype)  # (B, N)
    if weights is not None:
        m = m * weights.to(values.dtype)[:, None]
    denom = m.sum()
    if denom <= 0:
        return anchor.sum() * 0.0
    return (values * m).sum() / denom


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy on the tokens where loss_mask is 1 (a weighted token mean; see the module docstring).

    logits: (B, T, V) from the model on input_ids; input_ids: (B, T); loss_mask: (B, T), 1 on target tokens
    (completion + end-of-turn), 0 on prompt and padding; weights: (B,) per-sequence weights or None.
    Position t of the logits predicts token t + 1, so the mask is read at the target's position.
    """
    targets = input_ids[:, 1:]  # (B, T-1)
    mask = loss_mask[:, 1:].bool()  # (B, T-1)
    if not mask.any():
        return logits.sum() * 0.0
    # Cross-entropy only where a target is counted: (N, V) instead of a log-softmax over all B*T positions.
    picked = logits[:, :-1][mask]  # (N, V)
    nll = F.cross_entropy(picked.float(), targets[mask], reduction="none")  # (N,)
    w = torch.ones_like(nll) if weights is None else weights.to(nll.dtype)[:, None].expand_as(mask)[mask]  # (N,)
    denom = w.sum()
    if denom <= 0:
        return logits.sum() * 0.0
    return (nll * w).sum() / denom


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, soft or hard targets, averaged over mask (weighted per sequence).

    logits, targets, mask: (B, N) (N steps, or N = 1 for an outcome); targets in [0, 1]; weights: (B,) or None.
    Masked-out entries may hold any target value (NaN included): they are replaced before the loss is taken.
    """
    mask = mask.bool()
    # fp32 targets whatever the logits' dtype: a bf16 autocast forward must not round soft labels (1/3 -> 0.3340)
    safe = torch.where(mask, targets.float(), torch.zeros_like(targets, dtype=torch.float32))  # (B, N): no NaN
    per = F.binary_cross_entropy_with_logits(logits.float(), safe, reduction="none")  # (B, N)
    return _weighted_mean(per, mask, weights, anchor=logits)


def prm_loss(step_logits: torch.Tensor, step_targets: torch.Tensor, step_mask: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """PRM loss: BCE of the head's logit at each step end against the step label.

    step_logits: (B, S) logits gathered at the last token of each step; step_targets: (B, S) in [0, 1];
    step_mask: (B, S), 1 where the step exists and has a label (padding and unlabelled steps are 0).
    """
    return bce_loss(step_logits, step_targets, step_mask, weights)


def orm_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """ORM loss: BCE of the head's logit at each sequence's last token against its verdict.

    logits: (B,) ; targets: (B,) in {0, 1} (or soft); weights: (B,) or None.
    """
    return bce_loss(logits[:, None], targets[:, None], torch.ones_like(logits[:, None], dtype=torch.bool), weights)


def gather_positions(values: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values at given token positions: values (B, T), positions (B, S) with -1 as padding -> (B, S), mask (B, S)."""
    mask = positions >= 0  # (B, S)
    picked = values.gather(1, positions.clamp(min=0))  # (B, S)
    return picked, mask


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a right-padded batch: attention_mask (B, T) -> (B,)."""
    return attention_mask.long().sum(dim=1) - 1
