"""GenerativeVerifierScorer: a GenRM verifier (a causal LM trained by `stepray train genrm`) as a scorer.

    score_outcome(questions, completions) -> p(Yes) / (p(Yes) + p(No)) per solution

The verifier reads the verification prompt of its training (`pipelines.train.data.genrm_prompt`: the problem, the
proposed solution, "Is the answer correct? Answer Yes or No.") and its next-token distribution gives the score: the
probability of "Yes" renormalised over the two verdict tokens (GenRM's p(Yes); renormalising keeps the score a
probability when the model puts mass elsewhere). One forward pass per solution, logits at the last position only.
Unlike the PRM and the V-STaR verifier it takes the problem's question, not the generator's rendered prompt (the
evaluation passes questions to it).

GenRM-CoT (a verifier trained with `genrm_cot=true`; its verifier.json says "cot"): the verifier first writes a
verification rationale, so scoring runs on vLLM (a VLLMGenerator in this process, the project's engine; no
hand-rolled sampling loop): k rationales are sampled per solution (the prompt ends with GENRM_QUESTION_COT, sampling
stops at GENRM_VERDICT), then for each the engine's next-token log-probabilities after "rationale Verdict:" give
p(Yes) / (p(Yes) + p(No)) over the two verdict tokens; the score is the mean over the k rationales (GenRM's
majority over verification chains, with probabilities instead of counts). A verdict token outside the engine's
top-20 gets the 20th log-probability (an upper bound on its probability).

Used like the ORM: a Ray actor (actors/start.scorer_actor with kind "genrm"), whose score_outcome the evaluation
turns into a step scorer with `search.orm_as_step_scorer`; the device and dtype follow PRMScorer's rules.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

COT_VOTES = 4  # GenRM-CoT: rationales sampled per solution when neither the caller nor the verifier says


class GenerativeVerifierScorer:
    def __init__(self, model_path: str, device: str = "cpu", batch_size: int = 8, max_len: int = 2048,
                 threads: int = 0, dtype: str = "auto", votes: int = 0, engine: dict | None = None,
                 temperature: float = 0.7, rationale_tokens: int = 192):
        """votes, engine, temperature, rationale_tokens: GenRM-CoT only (rationales per solution, 0 = the verifier's
        own default or COT_VOTES; vLLM kwargs; sampling temperature; most tokens per rationale)."""
        from actors.vstar_scorer import VERIFIER_FILE

        path = Path(model_path)
        meta_path = path / VERIFIER_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if meta.get("kind") != "genrm":
            raise FileNotFoundError(f"{model_path} is not a GenRM verifier folder ({VERIFIER_FILE} with kind genrm); "
                                    f"train one with `stepray train genrm --data <generate run>`")
        self.meta, self.kind, self.cot = meta, "genrm", bool(meta.get("cot"))
        self.batch_size, self.max_len, self.model_path = batch_size, max_len, str(model_path)
        t0 = time.time()
        if self.cot:
            self._start_engine(path, votes or int(meta.get("votes") or COT_VOTES), engine, threads, temperature,
                               rationale_tokens)
            self.load_s = time.time() - t0
            return
        from actors.prm_scorer import torch_setup

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
        self.load_s = time.time() - t0

    def _start_engine(self, path: Path, votes: int, engine: dict | None, threads: int, temperature: float,
                      rationale_tokens: int) -> None:
        from actors.vllm_generator import VLLMGenerator
        from pipelines.train.data import GENRM_VERDICT

        if votes < 1 or rationale_tokens < 1:
            raise ValueError(f"GenRM-CoT needs votes >= 1 and rationale_tokens >= 1, got {votes}, {rationale_tokens}")
        self.votes, self.dtype, self.device = votes, "engine", "engine"
        self.engine = VLLMGenerator(str(path), {"max_model_len": self.max_len, "gpu_memory_utilization": 0.1,
                                                "enable_prefix_caching": True, **(engine or {})}, threads=threads)
        self.tokenizer = self.engine.tokenizer
        # the verdict as training wrote it: "... Verdict: Yes" -> the first token of " Yes" / " No"
        self.yes, self.no = (self.tokenizer.encode(f" {w}", add_special_tokens=False)[0] for w in ("Yes", "No"))
        if self.yes == self.no:
            raise ValueError(f"{path}: ' Yes' and ' No' start with the same token; cannot score")
        self.sampling = {"n": votes, "temperature": temperature, "max_tokens": rationale_tokens,
                         "stop": [GENRM_VERDICT]}

    def ready(self) -> dict[str, Any]:
        return {"model": self.model_path, "kind": self.kind, "prompt": self.meta.get("prompt"),
                "load_s": self.load_s, "dtype": self.dtype, "cot": self.cot,
                **({"votes": self.votes} if self.cot else {})}

    def score_outcome(self, questions: list[str], completions: list[str]) -> list[float]:
        """p(Yes) / (p(Yes) + p(No)) after each (question, solution)'s verification prompt; NaN when the prompt does
        not fit max_len."""
        from pipelines.reward_model import pad_batch
        from pipelines.train.data import genrm_prompt

        if len(questions) != len(completions):
            raise ValueError(f"score_outcome: {len(questions)} questions but {len(completions)} completions")
        if self.cot:
            return self._score_cot(questions, completions)
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

    def _score_cot(self, questions: list[str], completions: list[str]) -> list[float]:
        """GenRM-CoT: the mean over `votes` sampled rationales of p(Yes) / (p(Yes) + p(No)) after each rationale and
        GENRM_VERDICT; NaN when the verification prompt does not fit max_len."""
        from pipelines.train.data import genrm_prompt

        prompts = [genrm_prompt(self.tokenizer, q, c, cot=True) for q, c in zip(questions, completions)]
        fits = [i for i, p in enumerate(prompts)
                if len(self.tokenizer.encode(p, add_special_tokens=False)) + self.sampling["max_tokens"] < self.max_len]
        out = [float("nan")] * len(prompts)
        if not fits:
            return out
        chains = self.engine.generate([prompts[i] for i in fits], self.sampling)  # per prompt: `votes` rationales
        p_yes = self.verdict_p_yes([prompts[i] for i, cs in zip(fits, chains) for _ in cs],
                                   [c["text"] for cs in chains for c in cs])
        for j, i in enumerate(fits):
            votes = p_yes[j * self.votes:(j + 1) * self.votes]
            out[i] = float(sum(votes) / len(votes))
        return out

    def verdict_p_yes(self, prompts: list[str], rationales: list[str]) -> list[float]:
        """p(Yes) / (p(Yes) + p(No)) of the verdict after each CoT verification prompt + rationale + GENRM_VERDICT:
        one greedy engine step with its top-20 log-probabilities per rationale."""
        import math

        import vllm

        from pipelines.train.data import GENRM_VERDICT

        asks = [p + r.rstrip().removesuffix(GENRM_VERDICT).rstrip() + "\n" + GENRM_VERDICT
                for p, r in zip(prompts, rationales)]
        sp = vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
        out = []
        for v in self.engine.llm.generate(asks, sp, use_tqdm=False):
            top = v.outputs[0].logprobs[0]  # token id -> Logprob at the verdict position
            floor = min(x.logprob for x in top.values())
            y, n = (top[t].logprob if t in top else floor for t in (self.yes, self.no))
            out.append(1.0 / (1.0 + math.exp(n - y)))
        return out
