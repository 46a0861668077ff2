"""Problem sources: synthetic reproducibility and step values, every loader on the real files, rejects."""

import hashlib
import json
import re

import pytest

from pipelines.problems import load_file, load_problems, parse_number
from pipelines.synthetic import SyntheticConfig, synthetic_problem, synthetic_problems


def test_synthetic_is_reproducible_and_ids_are_stable():
    cfg = SyntheticConfig(n=30, seed=7, min_steps=1, max_steps=5)
    a, b = synthetic_problems(cfg), synthetic_problems(cfg)
    assert a == b
    assert len({p["id"] for p in a}) == 30
    # problem i alone equals problem i of the batch
    assert synthetic_problem(cfg, 12) == a[12]
    # another seed gives other problems with other ids
    c = synthetic_problems(SyntheticConfig(n=30, seed=8, min_steps=1, max_steps=5))
    assert {p["id"] for p in a}.isdisjoint({p["id"] for p in c})
    assert [p["question"] for p in a] != [p["question"] for p in c]


def _apply(a, op, b):
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_synthetic_step_values_are_the_arithmetic_of_the_question(steps):
    cfg = SyntheticConfig(n=40, seed=1, min_steps=steps, max_steps=steps)
    for p in synthetic_problems(cfg):
        meta = json.loads(p["meta"])
        assert meta["n_steps"] == steps == len(p["ref_steps"]) == len(p["ref_values"])
        q = p["quantities"]
        assert len(q) == steps + 1
        value = q[0]
        for i, (op, step) in enumerate(zip(meta["ops"], p["ref_steps"])):
            new = _apply(value, op, q[i + 1])
            assert new == int(new) and new >= 0, "exact division and no negative counts"
            assert p["ref_values"][i] == new
            a, sym, b, _, c = step.split()
            assert (float(a), sym, float(b), float(c)) == (value, op, q[i + 1], new)
            value = new
        assert p["answer"] == str(int(value))
        # every quantity is written in the question
        nums = [float(x) for x in re.findall(r"\d+", p["question"])]
        for x in q:
            assert x in nums


def test_synthetic_uses_many_templates_and_respects_ops():
    probs = synthetic_problems(SyntheticConfig(n=200, seed=0, min_steps=1, max_steps=1, ops=("+",)))
    openings = {p["question"].split(".")[0].split()[1] for p in probs}
    assert len(openings) >= 4
    shapes = {re.sub(r"\d+", "N", re.sub(r"\b[A-Z][a-z]+\b", "X", p["question"])) for p in probs}
    assert len(shapes) >= 30
    assert all(json.loads(p["meta"])["ops"] == ["+"] for p in probs)


def test_synthetic_phrasings_narrows_the_wording_only():
    wide = SyntheticConfig(n=200, seed=0, min_steps=1, max_steps=1, ops=("+",))
    narrow = SyntheticConfig(n=200, seed=0, min_steps=1, max_steps=1, ops=("+",), phrasings=1)
    # the default's ids are what they were before the knob existed (the hash of the same fields as then)
    old = json.dumps([0, 1, 1, ["+"], 50, 20, 5, 1000])
    assert wide.key() == hashlib.sha1(old.encode()).hexdigest()[:6] != narrow.key()
    items = r"toy cars|" + "|".join(["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps",
                                     "shells", "cards", "balloons"])

    def shape(q):  # names, pronouns, items and numbers out: what is left is the sentence shape
        return re.sub(r"\d+", "N", re.sub(r"\b[A-Z][a-z]+\b|\b(he|she|his|her)\b", "X", re.sub(items, "I", q)))

    assert len({shape(p["question"]) for p in synthetic_problems(narrow)}) == 1
    assert len({shape(p["question"]) for p in synthetic_problems(wide)}) >= 30
    for p in synthetic_problems(narrow):  # the arithmetic is the same kind: the answer follows from the quantities
        assert float(p["answer"]) == p["quantities"][0] + p["quantities"][1]


@pytest.mark.parametrize("kwargs, msg", [
    ({"phrasings": -1}, "phrasings"),
    ({"min_steps": 0}, "min_steps"), ({"max_steps": 6}, "max_steps"), ({"ops": ("^",)}, "ops"),
    ({"min_steps": 3, "max_steps": 2}, "min_steps"),
])
def test_synthetic_config_rejects_bad_values(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SyntheticConfig(**kwargs)


@pytest.mark.parametrize("text, value", [("1,080", 1080.0), ("-3.50", -3.5), ("$12", 12.0), ("7.", 7.0),
                                         ("12 apples", None), ("", None), ("1/2", None)])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.data
def test_gsm8k_loaders_on_the_real_files(data_dir):
    test = load_problems("gsm8k")
    assert len(test.problems) == 1319 and not test.rejects
    train = load_problems("gsm8k:train")
    assert len(train.problems) == 7473 and not train.rejects
    # commas stripped, steps without calculator annotations
    assert all("," not in p["answer"] and parse_number(p["answer"]) is not None for p in test.problems)
    assert not any("<<" in s for p in test.problems for s in p["ref_steps"])
    first = test.problems[0]
    assert first["id"] == "gsm8k-test-00000" and first["answer"] == "18" and first["kind"] == "numeric"


@pytest.mark.data
def test_math500_and_humaneval_loaders(data_dir):
    m = load_problems("math500")
    assert len(m.problems) == 500 and not m.rejects
    assert all(p["kind"] == "math" and p["answer"] for p in m.problems)
    assert len({p["id"] for p in m.problems}) == 500
    h = load_problems("humaneval")
    assert len(h.problems) == 164 and not h.rejects
    assert all(p["kind"] == "code" and "def check" in p["tests"] and p["entry_point"] for p in h.problems)


def test_user_file_rejects_malformed_rows_with_reasons(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join([
        json.dumps({"id": "a", "question": "What is 2+2?", "answer": "4"}),
        json.dumps({"id": "b", "question": "", "answer": "1"}),
        json.dumps({"id": "c", "question": "Half of one?", "answer": "\\frac{1}{2}"}),
        "{not json",
        json.dumps({"id": "d", "question": "No answer here"}),
        json.dumps({"id": "a", "question": "dup", "answer": "1"}),
        json.dumps({"id": "e", "question": "Number?", "answer": 3.0}),
        json.dumps(["a", "list"]),
    ]) + "\n")
    r = load_file(f)
    assert [p["id"] for p in r.problems] == ["a", "c", "e"]
    assert [p["kind"] for p in r.problems] == ["numeric", "math", "numeric"]
    assert r.problems[2]["answer"] == "3"
    reasons = {x["line"]: x["reason"].split(":")[0] for x in r.rejects}
    assert reasons == {2: "empty_question", 4: "unreadable", 5: "no_answer", 6: "duplicate_id", 8: "unreadable"}
    assert "3 problems, 5 rejected" in r.summary()


def test_user_file_column_mapping_and_numeric_kind(tmp_path):
    f = tmp_path / "other.jsonl"
    f.write_text(json.dumps({"problem": "2+3?", "target": "5"}) + "\n" +
                 json.dumps({"problem": "x?", "target": "five"}) + "\n")
    r = load_file(f, mapping={"question": "problem", "answer": "target"}, kind="numeric")
    assert [p["question"] for p in r.problems] == ["2+3?"]
    assert r.rejects[0]["reason"].startswith("unparseable_answer")


def test_code_rows_mbpp_shape(tmp_path):
    f = tmp_path / "mbpp.jsonl"
    f.write_text(json.dumps({"task_id": 1, "text": "Add two numbers.", "code": "def add(a,b): return a+b",
                             "test_list": ["assert add(1,2)==3"]}) + "\n" +
                 json.dumps({"task_id": 2, "text": "No tests", "test_list": []}) + "\n")
    r = load_file(f)
    assert len(r.problems) == 1 and r.problems[0]["kind"] == "code" and "assert add" in r.problems[0]["tests"]
    assert r.rejects[0]["reason"].startswith("no_tests")


def test_unknown_source_names_the_input():
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems("nope.jsonl")


def test_a_runs_problems_parquet_loads_as_it_was_written(tmp_path):
    """problems.parquet (what generate writes beside its samples) is a source: ground truth and kind kept."""
    from pipelines import runs

    probs = load_problems("synthetic", synthetic=SyntheticConfig(n=3, seed=8)).problems
    path = runs.write_problems(probs, tmp_path)
    got = load_problems(str(path)).problems
    assert got == probs


def test_planted_solutions_carry_exact_labels_the_step_checks_agree_with():
    """Planted solutions: half on the reference path (all 1, the right answer), half with one error at a known step
    and 0 from there on. Where the error is arithmetic or the final line the step checks see it at the same step;
    a planted operation keeps true arithmetic (the checks pass it) but ends on another answer."""
    from pipelines.synthetic import SyntheticConfig, planted_solutions, synthetic_problem
    from pipelines.verify import check_steps, extract_answer

    cfg = SyntheticConfig(n=40, min_steps=1, max_steps=3)
    seen_ok = seen_bad = 0
    for i in range(cfg.n):
        p = synthetic_problem(cfg, i)
        sols = planted_solutions(p, 6)
        assert len(sols) == 6 and sols == planted_solutions(p, 6)  # reproducible
        for steps, labels in sols:
            assert len(steps) == len(labels) == len(p["ref_steps"]) + 1
            assert labels == sorted(labels, reverse=True)  # prefix labels: no 1 after a 0
            answer = extract_answer(steps[-1]).answer
            checks = check_steps(steps, p["quantities"], p["answer"])
            if all(labels):
                seen_ok += 1
                assert answer == p["answer"] and all(checks)
            else:
                seen_bad += 1
                assert answer != p["answer"]
                first = labels.index(0)
                assert all(checks[:first])  # nothing wrong before the planted error
    assert seen_ok == seen_bad == 120


def test_step_truth_marks_the_last_step_of_a_wrong_answer():
    """A solution whose steps pass the checks but whose answer is wrong ends on a wrong step (it concludes that
    answer); an unfinished one (no answer) and a verified one keep the checks' truth."""
    from pipelines.synthetic import SyntheticConfig, synthetic_problem
    from pipelines.train.metrics import step_truth

    p = next(q for q in (synthetic_problem(SyntheticConfig(min_steps=1, max_steps=1), i) for i in range(50))
             if "*" in q["ref_steps"][0])
    v, b = (int(x) for x in p["quantities"])
    steps = [f"{v} + {b} = {v + b}", f"So there are {v + b} now."]
    assert step_truth(p, steps) == [True, True]  # the checks alone: true arithmetic over the question's numbers
    assert step_truth(p, steps, correct=False, answer=str(v + b)) == [True, False]
    assert step_truth(p, steps, correct=False, answer="") == [True, True]
    right = [f"{v} * {b} = {v * b}", f"The answer is {v * b}."]
    assert step_truth(p, right, correct=True, answer=str(v * b)) == [True, True]


@pytest.mark.parametrize("bad", [{"meta": "{not json"}, {"meta": '{"ops": ["^"]}'}, {"meta": '["*"]'},
                                 {"quantities": [2.5, 3.0]}, {"quantities": None}, {"meta": ""}])
def test_planted_solutions_skip_a_problem_without_a_usable_path(bad):
    """A malformed or foreign row gets no planted solutions (never an exception, never a guessed path)."""
    from pipelines.synthetic import SyntheticConfig, planted_solutions, synthetic_problem

    p = dict(synthetic_problem(SyntheticConfig(min_steps=1, max_steps=1), 0))
    assert planted_solutions(p, 2)
    assert planted_solutions({**p, **bad}, 2) == []
