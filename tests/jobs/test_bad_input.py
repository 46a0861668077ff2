"""A user's mistake gets one line naming the input and exit 2, before Ray, an engine or a trainer starts; bad rows
beside good ones get a verdict or a reject each, and every good row goes on.

The table runs each command's `main` in this process with Ray's start replaced by a failure (so a check that comes
too late fails the case); a few cases also run as `stepray` processes to see what a user sees (no traceback).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import schema

REPO = Path(__file__).resolve().parents[2]
JOBS = ("jobs.list_problems", "jobs.verify_samples", "jobs.generate_samples", "jobs.train_model",
        "jobs.annotate_steps", "jobs.evaluate_search", "jobs.serve_endpoint", "jobs.iterate")


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """One file or folder per class of bad input."""
    d = tmp_path_factory.mktemp("bad")
    f = {"dir": d / "a_folder", "empty_dir": d / "empty_folder", "missing": d / "missing.jsonl"}
    f["dir"].mkdir()
    f["empty_dir"].mkdir()
    (f["dir"] / "notes.txt").write_text("not data\n")
    f["not_parquet"] = d / "rows.parquet"
    f["not_parquet"].write_text('{"question": "1+1?", "answer": "2"}\n')
    good = pa.table({"question": ["What is 2+2?"] * 40, "answer": ["4"] * 40})
    pq.write_table(good, d / "whole.parquet")
    data = (d / "whole.parquet").read_bytes()
    f["truncated"] = d / "truncated.parquet"
    f["truncated"].write_bytes(data[: len(data) // 2])
    f["wrong_parquet"] = d / "wrong.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), f["wrong_parquet"])
    f["wrong_jsonl"] = d / "wrong.jsonl"
    f["wrong_jsonl"].write_text('{"a": 1}\n{"b": 2}\n')
    f["empty_file"] = d / "empty.jsonl"
    f["empty_file"].write_text("")
    f["bad_json"] = d / "broken.json"
    f["bad_json"].write_text('[{"question": "1+1?", "answer": ')
    f["binary"] = d / "binary.jsonl"
    f["binary"].write_bytes(bytes(range(256)) * 4)
    f["csv"] = d / "problems.csv"
    f["csv"].write_text('question,answer\nWhat is 2+2?,4\n"Half of 1, as a fraction?",1/2\n,7\n')
    f["not_yaml"] = d / "config.yaml"
    f["not_yaml"].write_text("rounds: [1, 2\n")
    f["samples_bad_part"] = d / "samples"  # a generate-like folder: one good part, one cut short
    f["samples_bad_part"].mkdir()
    pq.write_table(schema.to_table([{"problem_id": "p", "sample_id": "s", "mode": "sample", "steps": ["x"]}],
                                   "sample"), f["samples_bad_part"] / "part-0.parquet")
    (f["samples_bad_part"] / "part-1.parquet").write_bytes(data[: len(data) // 3])
    f["samples_ok"] = d / "samples_ok"
    f["samples_ok"].mkdir()
    pq.write_table(schema.to_table([{
        "problem_id": "p0", "sample_id": "p0-0", "sample_idx": 0, "mode": "sample", "prompt": "What is 2+2?",
        "completion": "2 + 2 = 4. The answer is 4.", "steps": ["2 + 2 = 4.", "The answer is 4."], "answer": "4",
        "answer_method": "answer_is", "gold": "4", "kind": "numeric", "correct": True, "reason": "correct",
        "finish_reason": "stop"}], "sample"), f["samples_ok"] / "part-0.parquet")
    f["not_model"] = d / "not_a_model"
    f["not_model"].mkdir()
    (f["not_model"] / "weights.bin").write_bytes(b"\0" * 16)
    f["prm_meta"] = d / "a_prm"  # the metadata of a PRM folder (kind prm): passed as --orm it is the wrong kind
    f["prm_meta"].mkdir()
    (f["prm_meta"] / "reward_model.json").write_text(json.dumps({"kind": "prm", "step_sep": "\n"}))
    f["serve_bad_prm"] = d / "serve.yaml"
    f["serve_bad_prm"].write_text(
        "applications:\n- name: stepray\n  import_path: pipelines.serve:build_app\n"
        f"  args:\n    engine:\n      model: {tiny_model}\n    prm: {f['not_model']}\n")
    return f


def cases() -> list[tuple[str, list[str], str, list[str]]]:
    """(case, argv with {name} placeholders, the input the message must name, other words it must hold)."""
    out = "{out}"
    return [
        ("problems: a folder for a file", ["problems", "--source", "{dir}"], "dir", ["is a folder"]),
        ("problems: missing file", ["problems", "--source", "{missing}"], "missing", ["does not exist"]),
        ("problems: text named .parquet", ["problems", "--source", "{not_parquet}"], "not_parquet",
         ["not a readable parquet"]),
        ("problems: truncated parquet", ["problems", "--source", "{truncated}"], "truncated", ["parquet"]),
        ("problems: wrong columns", ["problems", "--source", "{wrong_parquet}"], "wrong_parquet",
         ["none of its 2 rows", "question"]),
        ("problems: no row has a question", ["problems", "--source", "{wrong_jsonl}"], "wrong_jsonl",
         ["none of its 2 rows", "--map"]),
        ("problems: empty file", ["problems", "--source", "{empty_file}"], "empty_file", ["no rows"]),
        ("problems: broken JSON", ["problems", "--source", "{bad_json}"], "bad_json", ["not JSON"]),
        ("problems: binary file", ["problems", "--source", "{binary}"], "binary", ["none of its"]),
        ("verify: a folder", ["verify", "{dir}", "--kind", "math"], "dir", ["is a folder"]),
        ("verify: missing file", ["verify", "{missing}", "--kind", "math"], "missing", ["does not exist"]),
        ("verify: a parquet file", ["verify", "{not_parquet}", "--kind", "math"], "not_parquet", ["JSON lines"]),
        ("verify: binary file", ["verify", "{binary}", "--kind", "numeric"], "binary", ["is a JSON object"]),
        ("generate: wrong problem file", ["generate", "--problems", "{wrong_jsonl}", "--model", "tiny",
                                          "--out", out], "wrong_jsonl", ["none of its"]),
        ("generate: missing model", ["generate", "--problems", "synthetic", "--model", "{missing}", "--out", out],
         "missing", ["does not exist"]),
        ("generate: folder that is not a model", ["generate", "--model", "{not_model}", "--out", out], "not_model",
         ["config.json"]),
        ("train prm: empty folder", ["train", "prm", "--data", "{empty_dir}", "--base", "tiny", "--out", out],
         "empty_dir", ["no .parquet files"]),
        ("train sft: text named .parquet", ["train", "sft", "--data", "{not_parquet}", "--base", "tiny",
                                            "--out", out], "not_parquet", ["not a readable parquet"]),
        ("train sft: truncated parquet", ["train", "sft", "--data", "{truncated}", "--base", "tiny", "--out", out],
         "truncated", ["not a readable parquet"]),
        ("train sft: wrong columns", ["train", "sft", "--data", "{wrong_parquet}", "--base", "tiny", "--out", out],
         "wrong_parquet", ["needs sample or trajectory rows"]),
        ("train orm: broken JSON", ["train", "orm", "--data", "{bad_json}", "--base", "tiny", "--out", out],
         "bad_json", ["not JSON"]),
        ("train sft: a CSV", ["train", "sft", "--data", "{csv}", "--base", "tiny", "--out", out], "csv",
         ["unsupported file type"]),
        ("train prm: a part cut short", ["train", "prm", "--data", "{samples_bad_part}", "--base", "tiny",
                                         "--out", out], "samples_bad_part", ["part-1.parquet"]),
        ("train sft: missing base model", ["train", "sft", "--data", "{samples_ok}", "--base", "{missing}",
                                           "--out", out], "missing", ["does not exist"]),
        ("annotate: text named .parquet", ["annotate", "--samples", "{not_parquet}", "--out", out], "not_parquet",
         ["not a readable parquet"]),
        ("annotate: empty folder", ["annotate", "--samples", "{empty_dir}", "--out", out], "empty_dir",
         ["no .parquet files"]),
        ("annotate: wrong columns", ["annotate", "--samples", "{wrong_parquet}", "--out", out], "wrong_parquet",
         ["not sample rows"]),
        ("annotate: one part cut short", ["annotate", "--samples", "{samples_bad_part}", "--out", out],
         "samples_bad_part", ["part-1.parquet", "not a readable parquet"]),
        ("annotate: missing samples", ["annotate", "--samples", "{missing}", "--out", out], "missing",
         ["does not exist"]),
        ("evaluate: --prm not a reward model", ["evaluate", "--model", "tiny", "--prm", "{not_model}", "--out", out],
         "not_model", ["not a reward model folder"]),
        ("evaluate: --orm given a PRM", ["evaluate", "--model", "tiny", "--orm", "{prm_meta}", "--out", out],
         "prm_meta", ["is a PRM folder", "train orm"]),
        ("evaluate: missing model", ["evaluate", "--model", "{missing}", "--out", out], "missing",
         ["does not exist"]),
        ("evaluate: CSV problems with a bad model", ["evaluate", "--problems", "{csv}", "--model", "{dir}",
                                                     "--out", out], "dir", ["config.json"]),
        ("serve: a folder for the config", ["serve", "--config", "{dir}"], "dir", ["is a folder"]),
        ("serve: not YAML", ["serve", "--config", "{not_yaml}"], "not_yaml", ["not a Ray Serve config"]),
        ("serve: prm not a reward model", ["serve", "--config", "{serve_bad_prm}"], "not_model",
         ["not a reward model folder"]),
        ("iterate: a folder for the config", ["iterate", "--config", "{dir}", "--out", out], "dir", ["is a folder"]),
        ("iterate: not YAML", ["iterate", "--config", "{not_yaml}", "--out", out], "not_yaml", ["not YAML"]),
        ("iterate: missing base model", ["iterate", "base_model={missing}", "--out", out], "missing",
         ["does not exist"]),
    ]


def _fill(argv: list[str], files: dict[str, Path], out: Path) -> list[str]:
    return [a.format(out=out, **{k: str(v) for k, v in files.items()}) for a in argv]


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray fails the case: every check must come before it."""
    def boom(*a, **k):
        raise AssertionError("Ray was started before the bad input was refused")

    import pipelines.runtime

    modules = [importlib.import_module(name) for name in JOBS]  # imported first: they bind init_ray at import
    monkeypatch.setattr(pipelines.runtime, "init_ray", boom)
    for module in modules:
        if hasattr(module, "init_ray"):
            monkeypatch.setattr(module, "init_ray", boom)
    monkeypatch.setattr(os, "execv", boom)  # `stepray serve` hands over to `serve run` only when all is well


@pytest.mark.parametrize("case,argv,names,words", cases(), ids=[c[0] for c in cases()])
def test_bad_input_is_one_line_and_exit_2(case, argv, names, words, bad, tmp_path, no_ray, capsys):
    from jobs.cli import main

    out = tmp_path / "out"
    rc = main(_fill(argv, bad, out))
    err = capsys.readouterr().err.strip()
    assert rc == 2, (case, err)
    assert "\n" not in err and err.startswith(f"stepray {argv[0]}: "), err
    assert str(bad[names]) in err, (case, err)
    for word in words:
        assert word in err, (case, word, err)
    assert not out.exists(), f"{case}: wrote {out} for an input it refused"


@pytest.mark.parametrize("argv,names", [
    (["problems", "--source", "{dir}"], "dir"),  # IsADirectoryError before
    (["train", "prm", "--data", "{empty_dir}", "--base", "tiny"], "empty_dir"),  # FileNotFoundError before
    (["train", "sft", "--data", "{not_parquet}", "--base", "tiny"], "not_parquet"),  # ArrowInvalid before
    (["annotate", "--samples", "{not_parquet}"], "not_parquet"),
    (["evaluate", "--model", "tiny", "--prm", "{not_model}"], "not_model"),  # 46 s and a wrapped error before
], ids=["problems-folder", "train-empty", "train-not-parquet", "annotate-not-parquet", "evaluate-prm"])
def test_a_user_sees_no_traceback(argv, names, bad, tmp_path):
    cmd = [str(Path(sys.executable).parent / "stepray"), *_fill(argv, bad, tmp_path / "out"), "--out",
           str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().count("\n") == 0 and str(bad[names]) in r.stderr, r.stderr


def test_problems_csv_is_read_and_bad_rows_set_aside(bad, tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "problems.jsonl"
    assert main(["problems", "--source", str(bad["csv"]), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["question"], r["answer"], r["kind"]) for r in rows] == [
        ("What is 2+2?", "4", "numeric"), ("Half of 1, as a fraction?", "1/2", "math")]
    rejects = [json.loads(line) for line in Path(str(out) + ".rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(3, "empty_question")]
    assert "2 problems, 1 rejected" in capsys.readouterr().err


def test_problem_file_keeps_good_rows_beside_undecodable_and_unencodable_ones(tmp_path, capsys):
    from jobs.cli import main

    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b'{"question": "What is 1+1?", "answer": "2"}\n'
                    b'\xff\xfe{"question": "latin-1 bytes", "answer": "3"}\n'
                    b'{"question": "a lone \\ud800 surrogate", "answer": "4"}\n'
                    b'{"question": "What is 2+3?", "answer": 5}\n')
    out = tmp_path / "p.parquet"
    assert main(["problems", "--source", str(src), "--out", str(out)]) == 0
    assert pq.read_table(out).column("question").to_pylist() == ["What is 1+1?", "What is 2+3?"]
    rejects = [json.loads(line) for line in Path(str(out) + ".rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejects] == [(2, "unreadable"), (3, "unencodable")]


def test_verify_writes_a_verdict_for_every_row(tmp_path, capsys):
    """Good rows beside undecodable, unencodable, hostile and non-JSON ones: one verdict per line, in order."""
    from jobs.cli import main

    lines = [
        json.dumps({"id": "add", "program": "def add(a, b):\n    return a + b\n", "tests": "assert add(1, 2) == 3"}),
        json.dumps({"id": "surrogate-program", "program": "print('\ud800')\n", "tests": "assert True"}),
        json.dumps({"id": "always-equal", "program": "class A:\n    def __eq__(self, o):\n        return True\n"
                    "def add(a, b):\n    return A()\n", "tests": "assert add(1, 2) == 3"}),
        json.dumps({"id": "surrogate-tests", "program": "def f():\n    return 1\n",
                    "tests": "assert f() == 1 # \udfff"}),
        "this line is not JSON",
        json.dumps({"id": "exit-zero", "program": "import sys\nsys.exit(0)\n", "tests": "assert False"}),
        json.dumps({"id": "math", "kind": "math", "pred": "\\frac{1}{2}", "gold": "1/2"}),
        json.dumps({"id": "numeric-surrogate", "kind": "numeric", "pred": "7 \ud83d", "gold": "7"}),
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(("\n".join(lines[:5]) + "\n").encode() + b"\xc3\x28 not utf-8\n"
                    + ("\n".join(lines[5:]) + "\n").encode())
    out = tmp_path / "graded.jsonl"
    assert main(["verify", str(src), "--kind", "code", "--out", str(out), "--workers", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    got = [(r.get("id", r.get("line")), r["correct"], r["reason"]) for r in rows]
    assert [g[:2] for g in got] == [("add", True), ("surrogate-program", False), ("always-equal", False),
                                    ("surrogate-tests", False), (5, False), (6, False), ("exit-zero", False),
                                    ("math", True), ("numeric-surrogate", True)]
    assert [g[2] for g in got[:6]] == ["passed", "error:UnicodeEncodeError", "failed_test", "error:UnicodeEncodeError",
                                       "unreadable", "unreadable"]
    assert got[6][2] != "passed" and got[7][2] == got[8][2] == "correct"
    assert rows[-1]["pred"] == "7 \ud83d"  # the row comes back as it went in (JSON escapes for the surrogate)
    assert "9 rows, 3 correct" in capsys.readouterr().err
