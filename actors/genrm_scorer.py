"""GenerativeVerifierScorer: a GenRM verifier (a causal LM trained by `stepray train genrm`) as a scorer.

    score_outcome(questions, completions) -> p(Yes) / (p(Yes) + p(No)) per solution

The verifier reads the verification prompt of its training (`pipelines.train.data.genrm_prompt`: the problem, the
proposed solution, "Is the answer correct? Answer Yes or No.") and its next-token distribution gives the score: the
probability of "Yes" renormalised over the two verdict tokens (GenRM's p(Yes); renormalising keeps the score a
probability when the model puts mass elsewhere). One forward pass per solution, logits at the last position only.
Unlike the PRM and the V-STaR verifier it takes the problem's question, not the generator's rendered prompt (the
evaluation passes questions to it). The chain-of-thought variant (a verification rationale before the verdict,
averaged over k sampled rationales) is not implemented.

Used like the ORM: a Ray actor (actors/start.scorer_actor with kind "genrm"), whose score_outcome the evaluation
turns into a step scorer with `search.orm_as_step_scorer`; the device and dtype follow PRMScorer's rules.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class GenerativeVerifierScorer:
    def __init__(self, model_path: str, device: str = "cpu", batch_size: int = 8, max_len: int = 2048,
                 threads: int = 0, dtype: str = "auto"):
        from actors.vstar_scorer import VERIFIER_FILE

        path = Path(model_path)
        meta_path = path / VERIFIER_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if meta.get("kind") != "genrm":
            raise FileNotFoundError(f"{model_path} is not a GenRM verifier folder ({VERIFIER_FILE} with kind genrm); "
                                    f"train one with `stepray train genrm --data <generate run>`")
        from actors.prm_scorer import torch_setup

        t0 = time.time()
        self.torch, self.device, self.dtype = torch_setup(threads, device, dtype)
        torch = self.torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, self.dtype)
                                                          ).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id
        # the first token of each verdict as training wrote it (encode_sft: the verdict right after the prompt)
        self.yes, self.no = (self.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No"))
        if self.yes == self.no:
            raise ValueError(f"{model_path}: 'Yes' and 'No' start with the same token; cannot score")
        self.meta, self.kind = meta, "genrm"
        self.batch_size, self.max_len, self.model_path = batch_size, max_len, str(model_path)
        self.load_s = time.time() - t0

    def ready(self) -> dict[str, Any]:
        return {"model": self.model_path, "kind": self.kind, "prompt": self.meta.get("prompt"),
                "load_s": self.load_s, "dtype": self.dtype}

    def score_outcome(self, questions: list[str], completions: list[str]) -> list[float]:
        """p(Yes) / (p(Yes) + p(No)) after each (question, solution)'s verification prompt; NaN when the prompt does
        not fit max_len."""
        from pipelines.reward_model import pad_batch
        from pipelines.train.data import genrm_prompt

        if len(questions) != len(completions):
            raise ValueError(f"score_outcome: {len(questions)} questions but {len(completions)} completions")
        torch = self.torch
        seqs = [self.tokenizer.encode(genrm_prompt(self.tokenizer, q, c), add_special_tokens=False)
                for q, c in zip(questions, completions)]
        out = [float("nan")] * len(seqs)
        order = sorted((i for i in range(len(seqs)) if len(seqs[i]) <= self.max_len), key=lambda i: len(seqs[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start: start + self.batch_size]
                ids, mask = pad_batch([seqs[i] for i in idx], self.pad_id)  # (b, T), (b, T) right-padded
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                last = mask.long().sum(dim=1) - 1  # (b,) each row's last real token
                pick = logits[torch.arange(len(idx)), last.to(self.device)][:, [self.yes, self.no]].float()  # (b, 2)
                p_yes = torch.softmax(pick, dim=-1)[:, 0].cpu().tolist()
                for i, p in zip(idx, p_yes):
                    out[i] = float(p)
        return out
