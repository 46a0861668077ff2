"""Reward models: a causal-LM backbone with a scalar head, read at each step end (PRM) or at the last token (ORM).

    RewardModel.from_base("smollm2 path", kind="prm")  -> train -> .save(folder) -> RewardModel.load(folder)

Folder layout (a normal transformers folder plus two small files, so any tool that loads the backbone can):
    config.json, model.safetensors, tokenizer files   the backbone (AutoModel: the decoder without its LM head)
    reward_head.safetensors                          the head: weight (1, hidden), bias (1,)
    reward_model.json                                {"kind", "step_sep", "prompt", "base", "max_len", ...}

Where the score is read (the step separator strategy). A solution is tokenized segment by segment:
`prompt`, then `step_1 + sep`, `step_2 + sep`, ... each segment encoded on its own and concatenated, and step t's
score is the head's output at the last token of its segment, i.e. at the separator that ends it ("\\n" by
default, a single token `Ċ` in SmolLM2's tokenizer). Why this and not a special tag (Math-Shepherd's "ки") or the
text tokenized as a whole:
  - no new token: the vocabulary and embeddings of the base stay as they are, so the backbone remains a plain
    checkpoint, and a fresh tag's random embedding need not be learned from few labels;
  - the score sits exactly where step-level generation stops (`stop=["\\n"]`), so a search can score a step as soon
    as it is generated, from the same text it was generated from;
  - per-segment encoding makes the step boundary a token boundary by construction: tokenizing the joined text
    could merge a step's last characters with the separator (e.g. ".\\n\\n" into one token) and lose the position.
Training (`encode_steps` in pipelines/train/data.py) and scoring (actors/prm_scorer.py) call the same
`encode_steps`, so they agree. The ORM reads the head at the last token of `prompt + completion` (its segments
encoded the same way), the PRM's last-step position when the completion ends with the separator.

Steps that do not fit in `max_len` tokens get no position (their scores come back as NaN from the scorer, and
they carry no loss in training); an ORM input that is too long loses the start of its prompt instead, so the last
token is still the end of the completion.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.inputs import REWARD_MODEL_META as META_FILE

HEAD_FILE = "reward_head.safetensors"
KINDS = ("prm", "orm")


def encode_steps(tokenizer, prompt: str, steps: list[str], sep: str, max_len: int) -> tuple[list[int], list[int]]:
    """prompt + steps -> (token ids, position of the last token of each step that fits in max_len).

    Each step is encoded as `step + sep` on its own (see the module docstring). Returns fewer positions than steps
    when the text is cut at max_len; the ids are cut after the last whole step that fits.
    """
    ids = tokenizer.encode(prompt, add_special_tokens=False)[:max_len]
    positions: list[int] = []
    for step in steps:
        seg = tokenizer.encode(step + sep, add_special_tokens=False)
        if not seg or len(ids) + len(seg) > max_len:
            break
        ids.extend(seg)
        positions.append(len(ids) - 1)
    return ids, positions


def encode_outcome(tokenizer, prompt: str, completion: str, max_len: int) -> tuple[list[int], bool]:
    """prompt + completion -> (token ids ending at the completion's last token, whether the prompt was cut).

    Too long: the start of the prompt is dropped (the end of the completion is what the ORM reads).
    """
    p = tokenizer.encode(prompt, add_special_tokens=False)
    c = tokenizer.encode(completion, add_special_tokens=False)[-max_len:]
    keep = max_len - len(c)
    cut = len(p) > keep
    return (p[len(p) - keep:] if keep > 0 else []) + c, cut


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> input_ids (B, T), attention_mask (B, T)."""
    width = max((len(s) for s in seqs), default=1) or 1
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class RewardModel(nn.Module):
    """backbone (decoder, no LM head) -> hidden (B, T, H) -> Linear(H, 1) -> per-token logit (B, T)."""

    def __init__(self, backbone: nn.Module, kind: str = "prm", step_sep: str = "\n", meta: dict | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"reward model kind {kind!r} is not one of {list(KINDS)}")
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        # Small init: the first scores sit near sigmoid(0) = 0.5, so early BCE gradients are not saturated.
        nn.init.normal_(self.head.weight, std=1.0 / hidden)
        nn.init.zeros_(self.head.bias)
        self.kind = kind
        self.step_sep = step_sep
        self.meta = dict(meta or {})

    @classmethod
    def from_base(cls, path: str | Path, kind: str = "prm", step_sep: str = "\n", dtype: torch.dtype = torch.float32,
                  meta: dict | None = None) -> "RewardModel":
        """A fresh head on the decoder of a causal-LM checkpoint (its LM head is not loaded)."""
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(str(path), dtype=dtype)
        return cls(backbone, kind=kind, step_sep=step_sep, meta={"base": str(path), **(meta or {})})

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "RewardModel":
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{path} is not a reward model folder (no {META_FILE}); train one with "
                                    f"`stepray train prm|orm ...`")
        meta = json.loads(meta_path.read_text())
        backbone = AutoModel.from_pretrained(str(path), dtype=dtype)
        model = cls(backbone, kind=meta["kind"], step_sep=meta.get("step_sep", "\n"), meta=meta)
        head = load_file(str(path / HEAD_FILE))
        model.head.load_state_dict({k: v.to(dtype) for k, v in head.items()})
        return model.to(dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, T) -> logits (B, T) (sigmoid gives the score at every position)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)  # (B, T)

    def save(self, path: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
             extra_meta: dict[str, Any] | None = None) -> Path:
        """Write the folder (see the module docstring). dtype: cast the backbone for saving (the head stays fp32)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        backbone = self.backbone
        if dtype is not None:
            backbone = backbone.to(dtype)
        backbone.save_pretrained(str(path), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
        head = {k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(head, str(path / HEAD_FILE))
        meta = {**self.meta, **(extra_meta or {}), "kind": self.kind, "step_sep": self.step_sep,
                "hidden_size": int(self.head.in_features)}
        (path / META_FILE).write_text(json.dumps(meta, indent=1))
        return path


def is_reward_model(path: str | Path) -> bool:
    return (Path(path) / META_FILE).exists()
