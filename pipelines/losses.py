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
- DPO (the V-STaR verifier): for a pair of solutions to one problem, y+ verified and y- not,
  L = -log sigmoid(beta * [(log pi(y+|x) - log pi_ref(y+|x)) - (log pi(y-|x) - log pi_ref(y-|x))]), where
  log pi(y|x) is the sum of the completion tokens' log-probabilities (`sequence_logps`) and pi_ref the model
  training started from (the SFT generator); a weighted mean over pairs. The trained verifier scores a solution by
  beta * (log pi(y|x) - log pi_ref(y|x)).
- GRPO (online RL against the verifier, DeepSeekMath): for G samples o_1..o_G of one problem with rewards r_i,
  the advantage of every token of o_i is A_i = (r_i - mean(r)) / (std(r) + eps) (`group_advantages`); with
  rho_t = pi(o_t | .) / pi_old(o_t | .),
  L = -1/G sum_i 1/|o_i| sum_t [min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) - beta KL_t], where
  KL_t = pi_ref/pi - log(pi_ref/pi) - 1 (the k3 estimator, >= 0, unbiased for KL(pi || pi_ref)).

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


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum over each row's target tokens of log p(token | what precedes it): (B, T, V), (B, T), (B, T) -> (B,).

    loss_mask marks the target tokens as in `sft_loss` (the completion and its end-of-turn token). Like sft_loss it
    takes the log-softmax only at the N counted positions ((N, V), not all B*T)."""
    targets = input_ids[:, 1:]  # (B, T-1)
    mask = loss_mask[:, 1:].bool()  # (B, T-1)
    out = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=logits.device)  # (B,)
    if not mask.any():
        return out + logits.sum() * 0.0
    picked = logits[:, :-1][mask]  # (N, V)
    logp = -F.cross_entropy(picked.float(), targets[mask], reduction="none")  # (N,)
    rows = mask.nonzero(as_tuple=True)[0]  # (N,) the row of each counted token
    return out.index_add(0, rows, logp)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """DPO: -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), a weighted mean over pairs.

    All four are (B,) sequence log-probabilities (`sequence_logps`); the reference's carry no gradient."""
    margin = beta * ((policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach()))  # (B,)
    per = -F.logsigmoid(margin.float())  # (B,)
    w = torch.ones_like(per) if weights is None else weights.to(per.dtype)
    denom = w.sum()
    if denom <= 0:
        return per.sum() * 0.0
    return (per * w).sum() / denom


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


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log p(token | what precedes it) at every target position: (B, T, V), (B, T), (B, T) -> (B, T-1), 0 where
    loss_mask is 0 (read at the target's position, as in `sft_loss`). The log-softmax is taken at the counted
    positions only ((N, V), not all B*T)."""
    targets = input_ids[:, 1:]  # (B, T-1)
    mask = loss_mask[:, 1:].bool()  # (B, T-1)
    out = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)  # (B, T-1)
    if not mask.any():
        return out + logits.sum() * 0.0
    picked = logits[:, :-1][mask]  # (N, V)
    logp = -F.cross_entropy(picked.float(), targets[mask], reduction="none")  # (N,)
    return out.masked_scatter(mask, logp)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-normalised advantages: rewards (B*G,) in groups of G consecutive samples of one problem ->
    (r - group mean) / (group std + eps), or r - group mean with scale=False (Dr. GRPO: no std division, which
    otherwise up-weights groups that are nearly all right or all wrong). A group whose rewards are all equal gets 0:
    it carries no signal. The std is the population std over the G samples."""
    r = rewards.float().view(-1, group_size)  # (B, G)
    centred = r - r.mean(dim=1, keepdim=True)  # (B, G)
    if scale:
        centred = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss (see the module docstring) and its parts for logging.

    logps, old_logps, ref_logps: (B, T) per-token log-probabilities of the sampled tokens under the policy being
    trained, the policy that sampled them (detached) and the frozen reference (None or beta = 0: no KL term);
    advantages: (B,); mask: (B, T), 1 on completion tokens. Each sequence's tokens are averaged, then sequences are
    averaged (GRPO's 1/G sum_i 1/|o_i| sum_t). Returns (loss, {"kl", "clip_frac", "ratio"}: token means, detached).
    """
    m = mask.to(logps.dtype)  # (B, T)
    ratio = torch.exp(logps - old_logps.detach())  # (B, T)
    adv = advantages.to(logps.dtype)[:, None]  # (B, 1)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)  # (B, T)
    per_token = -surrogate
    kl = torch.zeros_like(logps)
    if ref_logps is not None and beta:
        delta = ref_logps.detach() - logps  # (B, T) log(pi_ref / pi)
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + beta * kl
    lengths = m.sum(dim=1)  # (B,)
    has = lengths > 0
    if not has.any():
        return logps.sum() * 0.0, {"kl": torch.tensor(0.0), "clip_frac": torch.tensor(0.0),
                                   "ratio": torch.tensor(1.0)}
    per_seq = (per_token * m).sum(dim=1)[has] / lengths[has]  # (B',)
    n_tok = m.sum()
    clipped = ((ratio - 1.0).abs() > clip_eps).to(m.dtype)
    stats = {"kl": ((kl * m).sum() / n_tok).detach(), "clip_frac": ((clipped * m).sum() / n_tok).detach(),
             "ratio": ((ratio * m).sum() / n_tok).detach()}
    return per_seq.mean(), stats
