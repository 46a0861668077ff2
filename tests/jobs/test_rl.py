"""`stepray rl` (GRPO) end to end on the tiny model: vLLM samples, Ray Train updates, the engine reloads the policy
every step; the reward rises on a toy task it must learn, and a second run resumes from the first one's checkpoint
with the engine given the restored policy (were it given the starting policy, the reward would fall back).

The toy task (tests/toy_rewards.repeat_share): the share of sampled tokens that repeat the previous token. The random
tiny model never solves a word problem, so the verifier's reward would stay 0 for it; at temperature 0.2 it repeats
a token now and then, and a policy gradient teaches it to copy within a few steps. Settings that make the toy
reproducible here: the engine in float32 (a random model's logits differ by ~1e-3, and bf16 rounding would sample
from another policy than the one trained) and a small KL weight (once every sample scores 1 the groups carry no
signal and only the KL term is left; Adam turns even a small gradient into a full-size step, so a large weight pulls
the policy back to the reference at once)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--base", "tiny", "--reward", "tests.toy_rewards:repeat_share", "--no-mlflow", "problems_per_step=4",
        "group_size=8", "max_tokens=16", "temperature=0.2", "lr=1e-3", "beta=0.001", "eval_limit=8",
        "checkpoint_every=2", "engine.max_model_len=512", "engine.gpu_memory_utilization=0.02", "engine.threads=1",
        "engine.num_cpus=0.5", "engine.dtype=float32", "cpus_per_worker=1", "prompt.few_shot=false"]


def _run(out: Path, steps: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")  # the toy reward imports on Ray's workers
    return subprocess.run([sys.executable, "-m", "jobs.train_policy", "--out", str(out), "--steps", str(steps), *ARGS],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_grpo_reward_rises_on_a_toy_task_and_a_second_run_resumes_with_the_restored_policy(tmp_path):
    out = tmp_path / "grpo"
    first = _run(out, 4)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _run(out, 8)  # the same run folder, more steps: resumes at step 4
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "found checkpoint_step_000004" in second.stdout

    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 9))
    rewards = [h["reward"] for h in history]
    assert sum(rewards[-3:]) / 3 > 0.8, rewards
    assert sum(rewards[-3:]) / 3 > rewards[0] + 0.4, rewards
    assert history[-1]["kl"] > 0  # the policy moved away from the reference, and the KL term saw it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["steps"] == 8
    assert summary["greedy"]["n"] == 8  # held-out greedy accuracy before (first run) and after (second run)
    assert (out / "reward_curve.png").stat().st_size > 0
    assert (out / "model" / "config.json").exists() and (out / "policy_weights" / "config.json").exists()


def test_rl_refuses_bad_input_before_anything_starts(tmp_path):
    bad_reward = subprocess.run(
        [sys.executable, "-m", "jobs.train_policy", "--base", "tiny", "--out", str(tmp_path / "a"),
         "--reward", "no_such_module:f"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad_reward.returncode == 2 and "no_such_module" in bad_reward.stderr
    no_model = subprocess.run(
        [sys.executable, "-m", "jobs.train_policy", "--base", "tiny", "--out", str(tmp_path / "b"),
         "--reward", "prm"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert no_model.returncode == 2 and "reward_model" in no_model.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "jobs.train_policy", "--base", "tiny", "--out", str(tmp_path / "c"),
         "--reward", "orm", "--reward-model", str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True,
        timeout=120)
    assert missing.returncode == 2 and "nowhere" in missing.stderr
