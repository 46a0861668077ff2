"""PRMScorer on a real RewardModel folder (the tiny model's decoder + a head): scores read where training reads
them, independent of batching and of later steps, and the same whether called locally, as a Ray actor or as a
Ray Data callable class."""

from __future__ import annotations

import math

import pytest
import torch

from actors.prm_scorer import PRMScorer
from pipelines.reward_model import RewardModel, encode_outcome, encode_steps, pad_batch

PROMPT = "<|im_start|>user\nTom has 3 apples and buys 4 more. How many?<|im_end|>\n<|im_start|>assistant\n"
STEPS = [["3 + 4 = 7", "The answer is 7."],
         ["3 + 4 = 8", "8 * 1 = 8", "The answer is 8."],
         ["Tom starts with 3 apples.", "He buys 4 more, so 3 + 4 = 7 apples.", "7", "The answer is 7."]]


@pytest.fixture(scope="module")
def rm_folders(tmp_path_factory, tiny_model):
    """A PRM and an ORM folder with a head large enough that scores differ from token to token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    out = {}
    for kind in ("prm", "orm"):
        torch.manual_seed(1)
        model = RewardModel.from_base(tiny_model, kind=kind, meta={"prompt": {"format": "lines"}})
        torch.nn.init.normal_(model.head.weight, std=0.05)  # logits of order 1
        out[kind] = model.save(tmp_path_factory.mktemp(kind) / "model", tokenizer=tok)
    return out, tok


def _direct(model: RewardModel, ids: list[int]) -> list[float]:
    """Sigmoid of the head at every position, one unpadded sequence at a time (the reference)."""
    with torch.inference_mode():
        x, m = pad_batch([ids], 0)
        return torch.sigmoid(model(x, m))[0].tolist()


def test_scores_are_read_at_step_ends_and_do_not_depend_on_batching(rm_folders):
    folders, tok = rm_folders
    # 3 solutions: two micro-batches, sorted by length
    scorer = PRMScorer(str(folders["prm"]), batch_size=2, dtype="float32")
    assert scorer.ready()["kind"] == "prm" and scorer.meta["prompt"] == {"format": "lines"}
    together = scorer.score([PROMPT] * 3, STEPS)
    reference = RewardModel.load(folders["prm"]).eval()
    for steps, got in zip(STEPS, together):
        ids, pos = encode_steps(tok, PROMPT, steps, "\n", 2048)
        expected = [_direct(reference, ids)[p] for p in pos]
        assert got == pytest.approx(expected, abs=1e-5)
        assert all(0.0 <= s <= 1.0 for s in got)
        assert scorer.score([PROMPT], [steps])[0] == pytest.approx(got, abs=1e-5)  # alone == in a padded batch
    # scores vary from token to token (so reading one position off would fail the 1e-5 checks above)
    all_tokens = _direct(reference, encode_steps(tok, PROMPT, STEPS[2], "\n", 2048)[0])
    assert max(all_tokens) - min(all_tokens) > 0.1 and max(together[2]) - min(together[2]) > 1e-3


def test_a_shared_prompt_runs_once_and_gives_the_same_scores(rm_folders):
    """share_prompt (the default): solutions with one prompt reuse its key/value cache; mixed prompts, a prompt cut
    by max_len and a lone solution go through full passes; every score equals the full-pass scorer's."""
    folders, _ = rm_folders
    other = PROMPT.replace("3 apples", "5 apples")
    prompts = [PROMPT, other, PROMPT, other, PROMPT, "x"]
    steps = [STEPS[0], STEPS[1], STEPS[2], STEPS[0], STEPS[1], STEPS[0]]
    shared = PRMScorer(str(folders["prm"]), batch_size=2, dtype="float32")
    full = PRMScorer(str(folders["prm"]), batch_size=2, share_prompt=False, dtype="float32")
    calls = []
    forward = shared.model.backbone.forward

    def spy(*a, **k):
        kind = "prompt" if k.get("use_cache") and k.get("past_key_values") is None else \
            "suffix" if k.get("past_key_values") is not None else "full"
        calls.append((kind, tuple(k["input_ids"].shape)))
        return forward(*a, **k)

    shared.model.backbone.forward = spy
    got, want = shared.score(prompts, steps), full.score(prompts, steps)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)
    # one pass per shared prompt; its 3 and 2 solutions in suffix micro-batches of <= 2; the lone "x" in full
    n_prompt = len(shared.tokenizer.encode(PROMPT, add_special_tokens=False))
    assert sorted(c for c in calls if c[0] == "prompt") == [("prompt", (1, n_prompt))] * 2
    assert sorted(c[1][0] for c in calls if c[0] == "suffix") == [1, 2, 2]
    assert [c[1][0] for c in calls if c[0] == "full"] == [1]
    a, b = shared.score([PROMPT] * 2, [STEPS[0]] * 2), full.score([PROMPT] * 2, [STEPS[0]] * 2)
    assert a[0] == pytest.approx(b[0], abs=1e-5) and a[1] == pytest.approx(b[1], abs=1e-5)


def test_dtype_auto_takes_bf16_where_the_device_computes_it_and_stays_near_fp32(rm_folders):
    """The scorer's default dtype: bf16 on a CPU with avx512_bf16/AMX (or a bf16 GPU), else fp32; the exactness
    tests here pin fp32. bf16 scores stay within 0.02 of fp32's, step by step."""
    from pipelines.models import bf16_native

    folders, _ = rm_folders
    auto = PRMScorer(str(folders["prm"]))
    assert auto.dtype == ("bfloat16" if bf16_native("cpu") else "float32") == auto.ready()["dtype"]
    fp32 = PRMScorer(str(folders["prm"]), dtype="float32")
    got, want = auto.score([PROMPT] * 3, STEPS), fp32.score([PROMPT] * 3, STEPS)
    assert [x for g in got for x in g] == pytest.approx([x for w in want for x in w], abs=0.02)


def test_a_step_score_ignores_later_steps_and_cut_steps_are_nan(rm_folders):
    folders, tok = rm_folders
    scorer = PRMScorer(str(folders["prm"]), dtype="float32")
    full = scorer.score([PROMPT], [STEPS[2]])[0]
    assert scorer.score([PROMPT], [STEPS[2][:2]])[0] == pytest.approx(full[:2], abs=1e-5)  # causal
    ids, pos = encode_steps(tok, PROMPT, STEPS[2], "\n", 4096)
    short = PRMScorer(str(folders["prm"]), max_len=pos[1] + 1, dtype="float32")  # room for two steps only
    cut = short.score([PROMPT], [STEPS[2]])[0]
    assert cut[:2] == pytest.approx(full[:2], abs=1e-5) and all(math.isnan(s) for s in cut[2:])


def test_score_outcome_reads_the_last_token(rm_folders):
    folders, tok = rm_folders
    scorer = PRMScorer(str(folders["orm"]), dtype="float32")
    completions = ["\n".join(s) for s in STEPS]
    got = scorer.score_outcome([PROMPT] * 3, completions)
    reference = RewardModel.load(folders["orm"]).eval()
    for c, g in zip(completions, got):
        ids, cut = encode_outcome(tok, PROMPT, c, 2048)
        assert not cut and g == pytest.approx(_direct(reference, ids)[-1], abs=1e-5)
    ids, cut = encode_outcome(tok, PROMPT, completions[0], 8)  # too long: the prompt's start goes, not the end
    assert cut and len(ids) == 8 and ids[-1] == tok.encode(completions[0], add_special_tokens=False)[-1]


def test_bad_inputs_say_what_is_wrong(rm_folders, tiny_model):
    folders, _ = rm_folders
    scorer = PRMScorer(str(folders["prm"]))
    with pytest.raises(ValueError, match="2 prompts but 1 step lists"):
        scorer.score([PROMPT, PROMPT], [STEPS[0]])
    with pytest.raises(FileNotFoundError, match="not a reward model folder"):
        PRMScorer(tiny_model)
    with pytest.raises(ValueError, match="needs a `steps` or a `completion` column"):
        scorer({"prompt": [PROMPT]})
    out = scorer({"prompt": [PROMPT], "steps": [STEPS[0]]})  # a dict-of-columns batch (Ray Data numpy format)
    assert out["score"][0] == pytest.approx(min(out["step_scores"][0]))


@pytest.mark.slow
def test_as_a_ray_actor_and_a_ray_data_callable_class(rm_folders, ray_session):
    import ray.data

    folders, _ = rm_folders
    local = PRMScorer(str(folders["prm"]), dtype="float32")  # exact comparisons: fp32 everywhere
    expected = local.score([PROMPT] * 3, STEPS)
    actor = ray_session.remote(num_cpus=1)(PRMScorer).remote(str(folders["prm"]), dtype="float32")
    try:
        remote = ray_session.get(actor.score.remote([PROMPT] * 3, STEPS))
        assert [x for r in remote for x in r] == pytest.approx([x for e in expected for x in e], abs=1e-6)
    finally:
        ray_session.kill(actor)

    items = [{"i": i, "prompt": PROMPT, "steps": s, "completion": "\n".join(s)} for i, s in enumerate(STEPS)]
    for kind in ("prm", "orm"):
        rows = ray.data.from_items(items).map_batches(
            PRMScorer, fn_constructor_kwargs={"model_path": str(folders[kind]), "dtype": "float32"},
            batch_format="pyarrow",
            batch_size=2, num_cpus=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1)).take_all()
        rows = sorted(rows, key=lambda r: r["i"])
        if kind == "prm":
            for r, e in zip(rows, expected):
                assert list(r["step_scores"]) == pytest.approx(e, abs=1e-6)
                assert r["score"] == pytest.approx(min(e), abs=1e-6)  # reduce="min" (Let's Verify)
        else:
            orm = PRMScorer(str(folders["orm"]), dtype="float32")
            want = orm.score_outcome([PROMPT] * 3, [it["completion"] for it in items])
            assert [r["score"] for r in rows] == pytest.approx(want, abs=1e-6)
            assert "step_scores" not in rows[0]
