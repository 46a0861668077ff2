"""LikelihoodRatioScorer: a V-STaR verifier (a causal LM trained with DPO, `stepray train dpo`) as a scorer.

    log_ratio(prompts, completions)     -> beta * (log pi(y|x) - log pi_ref(y|x)) per solution (V-STaR's score)
    score_outcome(prompts, completions) -> sigmoid of that, in (0, 1): the same order, usable as a vote weight

pi is the trained verifier, pi_ref the model its training started from (the SFT generator), both read from the
verifier's folder (VERIFIER_FILE: reference path, beta, the prompt format of its training rows). log pi(y|x) is the
sum of the completion tokens' log-probabilities, the completion encoded exactly as in training (prompt + completion
+ end-of-turn, `pipelines.train.data.encode_sft`) and summed by the training loss's own `losses.sequence_logps`.

Used like PRMScorer's outcome side: a Ray actor (actors/start.scorer_actor with kind "vstar"), whose score_outcome
the evaluation turns into a step scorer with `search.orm_as_step_scorer`. Each solution costs two forward passes
(verifier and reference). The device and dtype follow PRMScorer's rules ("auto": bf16 where the device computes it
natively).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

VERIFIER_FILE = "verifier.json"


def is_vstar_verifier(path: str | Path) -> bool:
    return (Path(path) / VERIFIER_FILE).exists()


class LikelihoodRatioScorer:
    def __init__(self, model_path: str, device: str = "cpu", batch_size: int = 8, max_len: int = 2048,
                 threads: int = 0, dtype: str = "auto"):
        path = Path(model_path)
        if not is_vstar_verifier(path):
            raise FileNotFoundError(f"{model_path} is not a V-STaR verifier folder (no {VERIFIER_FILE}); train one "
                                    f"with `stepray train dpo --data <generate run> base=<the SFT generator>`")
        self.meta: dict[str, Any] = json.loads((path / VERIFIER_FILE).read_text())
        reference = self.meta.get("reference") or ""
        if not Path(reference).exists():
            raise FileNotFoundError(f"{model_path}: its reference model {reference!r} (the model DPO started from) "
                                    f"is not there; the verifier's score needs both")
        from actors.prm_scorer import torch_setup

        t0 = time.time()
        self.torch, self.device, self.dtype = torch_setup(threads, device, dtype)  # before transformers loads torch
        torch, dtype = self.torch, self.dtype
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.models = [AutoModelForCausalLM.from_pretrained(str(p), dtype=getattr(torch, dtype)).to(self.device).eval()
                       for p in (path, reference)]
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id
        self.beta = float(self.meta.get("beta", 0.1))
        self.kind = "vstar"
        self.batch_size, self.max_len, self.model_path = batch_size, max_len, str(model_path)
        self.load_s = time.time() - t0

    def ready(self) -> dict[str, Any]:
        return {"model": self.model_path, "kind": self.kind, "reference": self.meta.get("reference"),
                "beta": self.beta, "prompt": self.meta.get("prompt"), "load_s": self.load_s, "dtype": self.dtype}

    def _logps(self, model, rows: list[tuple[list[int], int]]) -> list[float]:
        """Sequence log-probabilities of the completion part of each (ids, n_prompt), in length-sorted batches."""
        from pipelines.losses import sequence_logps
        from pipelines.reward_model import pad_batch

        torch = self.torch
        out = [float("nan")] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start: start + self.batch_size]
                ids, mask = pad_batch([rows[i][0] for i in idx], self.pad_id)  # (b, T), (b, T)
                pos = torch.arange(ids.shape[1])[None, :]  # (1, T)
                targets = (pos >= torch.tensor([rows[i][1] for i in idx])[:, None]) & mask.bool()  # (b, T)
                ids, mask = ids.to(self.device), mask.to(self.device)
                logits = model(input_ids=ids, attention_mask=mask).logits  # (b, T, V)
                for j, v in zip(idx, sequence_logps(logits, ids, targets.to(self.device)).tolist()):
                    out[j] = v
        return out

    def log_ratio(self, prompts: list[str], completions: list[str]) -> list[float]:
        """beta * (log pi(y|x) - log pi_ref(y|x)) per (prompt, completion); NaN when the prompt leaves no room."""
        from pipelines.train.data import encode_sft

        if len(prompts) != len(completions):
            raise ValueError(f"score_outcome: {len(prompts)} prompts but {len(completions)} completions")
        enc = [encode_sft(self.tokenizer, p, c, self.max_len) for p, c in zip(prompts, completions)]
        ok = [i for i, e in enumerate(enc) if e is not None]
        rows = [enc[i] for i in ok]
        policy, ref = (self._logps(m, rows) for m in self.models)
        out = [float("nan")] * len(prompts)
        for i, a, b in zip(ok, policy, ref):
            out[i] = self.beta * (a - b)
        return out

    def score_outcome(self, prompts: list[str], completions: list[str]) -> list[float]:
        """sigmoid(log_ratio): in (0, 1), ordered as V-STaR's score (NaN where it is NaN)."""
        return [x if math.isnan(x) else 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))
                for x in self.log_ratio(prompts, completions)]
