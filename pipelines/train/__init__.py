"""Training on Ray Train: generator SFT on verified samples (ReST-EM / STaR), process and outcome reward models.

    parquet ──read_examples──> examples (pure: selection, labels, hold-out)  ──tokenize_examples──> token rows
            ──ray.data.from_items──> TorchTrainer(train_loop_per_worker, datasets={"train": ...}) ──> checkpoints
            ──export_model──> <out>/model  (a transformers folder: the generator, or a RewardModel folder)

Data (driver side, pure functions tested as tables). Rejection sampling keeps only verified samples; what is
kept for the generator (`select_sft`): correct, no generation error, finished by a stop (not cut at max_tokens)
when `select.require_stop`, deduplicated per problem on whitespace-normalised text, at most `select.k` per
problem (in sample order: samples are i.i.d., so the first k are as good as any k), and, with `select.balance`,
weighted 1/n_p so every problem with a kept sample weighs the same (easy problems would otherwise dominate with k
samples each). Trajectory rows are used as given. Process labels come from (`labels.source`):
    step_label    StepLabel rows (Monte-Carlo annotation): soft_labels (NaN = no estimate) or hard_labels (-1 = none)
    prm800k       PRM800K ratings per step, -1 / 0 / 1: flat rows {question, steps, ratings} or PRM800K's own
                  jsonl ({question: {problem}, label: {steps: [{completions, chosen_completion, ...}]}})
    processbench  ProcessBench rows {problem, steps, label}: label = index of the first wrong step, -1 if none
All become prefix values (what Monte-Carlo labels estimate): c_t = 1 while no error has occurred up to step t;
after the first wrong step later steps are 0 (`labels.after_error="zero"`) or carry no label ("drop").
PRM800K's neutral rating 0 maps to `labels.neutral` (1.0 by default: a neutral step is not an error, so the
prefix is still correct; 0.5 reads it as uncertain). Outcome labels are Sample.correct.
Problems whose hashed id falls in `eval.holdout_fraction` are kept out of PRM/ORM training for evaluation.

Token rows (`tokenize_examples`): SFT rows are `prompt + completion + <eos>` with the loss on the completion and
<eos> only (the end-of-turn token teaches the model to stop); PRM rows use `reward_model.encode_steps` (the score at
the separator ending each step); ORM rows `encode_outcome`. Rows whose prompt alone fills max_len are set aside.

Ray Train (V2, the default on Ray 2.60). One function runs on every worker: `prepare_model` (DDP: gloo on CPU,
nccl on GPU), data from `get_dataset_shard("train").iter_torch_batches` (equal streaming split, drop_last, so every
rank takes the same number of steps), `ray.train.report(metrics, checkpoint=...)` every `checkpoint_every` steps
and at the end, `FailureConfig(max_failures)` retries from the latest checkpoint. Resume after a crash or a kill:
re-run with the same `run_name` and `storage_path` (the defaults derive both from `out`); `ray.train.get_checkpoint()`
then returns the latest checkpoint, and the loop restores model, optimizer, LR schedule and step, and skips the
batches of the interrupted epoch it already trained on (the same number of batches: which rows they hold may differ,
since Ray Data's streaming split hands out blocks dynamically). A run that already finished resumes at its last step
and ends at once.

MLflow (rank 0 only): the driver creates the run (params, so a re-run can reopen it), rank 0 reopens it by id and
logs loss, learning rate and tokens/s per logged step, and at the end the loss curve PNG and the final model as
artifacts. Why not `ray.air.integrations.mlflow.setup_mlflow` (it works on 2.60 inside a V2 train function):
it always starts a new MLflow run, so a resumed training would split one loss curve over two runs.

Seeds: the run seed S seeds the model/head init (torch.manual_seed(S) on every rank, so all ranks build the same
model before DDP also broadcasts rank 0's), the driver's row shuffle (random.Random(S)), each epoch's local
shuffle buffer (seed S * 1000 + epoch; ranks read different shards, so they need no separate seed) and, after the
model is built, torch's RNG on rank r (S * 1000 + 1 + r: LoRA dropout masks differ between ranks).

Files: config.py (the configs, MALLOC_ENV), data.py (rows -> examples -> token rows, pure), worker.py (what runs on
every Ray Train worker: collation, loss, model, `train_loop_per_worker`), trainer.py (driver: the TorchTrainer,
resume, export, MLflow), metrics.py (evaluation metrics and runners), evaluation.py (what `stepray train` measures
after training, per task). This module re-exports their names.
"""

from pipelines.train.config import (CURVE_FILE, HISTORY_FILE, LABEL_SOURCES, MALLOC_ENV, STATE_FILE, TASKS,
                                    EvalConfig, LabelConfig, LoraConfig, SelectConfig, TrainConfig, malloc_tuned)
from pipelines.train.data import (DATA_HINT, Examples, _prm800k_native, build_examples, data_files,
                                  correction_pairs, detect_kind, encode_sft, genrm_examples, genrm_prompt, in_holdout,
                                  stream_of_search, tree_stream,
                                  preference_pairs, read_examples, read_rows,
                                  select_sft,
                                  targets_from_first_error, targets_from_ratings, targets_from_step_label,
                                  tokenize_examples)
from pipelines.train.metrics import (auc, fit_threshold, flag_all_f1, greedy_accuracy, predicted_first_error,
                                     problems_by_id, processbench_f1, scored_rows, step_f1, step_truth,
                                     truth_scores_metrics)
from pipelines.train.trainer import (build_trainer, checkpoint_dtype, export_model,
                                     latest_checkpoint_step, mlflow_run, plan_steps)
from pipelines.train.worker import (build_model, collate_batch, compute_loss, freeze_lower, lr_factor, param_groups,
                                    plot_loss_curve, resolve_precision, save_final_model, train_loop_per_worker,
                                    trainable_state)

__all__ = ["CURVE_FILE", "HISTORY_FILE", "LABEL_SOURCES", "MALLOC_ENV", "STATE_FILE", "TASKS", "EvalConfig",
           "LabelConfig", "LoraConfig", "SelectConfig", "TrainConfig", "malloc_tuned", "DATA_HINT", "Examples",
           "_prm800k_native", "build_examples", "correction_pairs", "data_files", "detect_kind", "encode_sft",
           "genrm_examples", "genrm_prompt", "in_holdout", "preference_pairs", "stream_of_search", "tree_stream",
           "read_examples", "read_rows", "select_sft", "targets_from_first_error", "targets_from_ratings",
           "targets_from_step_label", "tokenize_examples", "auc", "fit_threshold", "truth_scores_metrics",
           "flag_all_f1", "greedy_accuracy",
           "predicted_first_error", "problems_by_id", "processbench_f1", "scored_rows", "step_f1", "step_truth",
           "build_trainer", "checkpoint_dtype", "export_model", "latest_checkpoint_step", "mlflow_run", "plan_steps",
           "build_model", "collate_batch", "compute_loss", "lr_factor", "param_groups", "plot_loss_curve",
           "save_final_model", "train_loop_per_worker", "trainable_state", "freeze_lower", "resolve_precision"]
