"""Activation memory of nested adapters (``sb``, ``nora``) vs peft LoRA at the same rank and targets.

Why nested adapters can save activation memory: LoRA trains its input factor A, so ``lora_A(x)`` must keep
the layer input x (k floats per token) for A's gradient. A nested adapter's outer factor A is a frozen
buffer: ``A·x`` keeps nothing but A, and only the r-dimensional projection h = A·x (plus, in ``nora``, the
q-dimensional Q·h) is kept for the trainable inner part. The frozen base linear layer keeps only its weight
in both cases. Per adapted layer and token LoRA keeps k + r floats (inputs shared by several adapted layers,
like the input of q/k/v, once), ``sb`` r, ``nora`` r + q.

Variants, on every ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`` of every layer:
``lora`` (peft ``LoraConfig(r, lora_alpha=r, lora_dropout=0)``), ``nested-sb`` and ``nested-nora``
(``apply_nested``, q = r/4 unless ``--q``). Models: ``llama-512``, a random Llama-shaped model (see
:data:`LLAMA_512`), and SmolLM2-135M (alias ``smollm2``, real weights, offline). Input: random token ids
(seed 0, no padding), labels = input ids, causal-LM loss computed by the model, training mode, sdpa
attention, fp32 unless ``--dtype``.

What is counted (CPU, deterministic): every tensor that autograd saves for backward during one forward,
seen through ``torch.autograd.graph.saved_tensors_hooks``; de-duplicated by storage (a storage saved
several times, or through several views, counts once, with its full ``nbytes``). Storages of the model's
parameters and buffers (frozen weights, the nested A/B/R0 buffers saved for the input gradient) are not
activations: they are excluded and reported apart (``param_saved_bytes``). Each activation storage is
attributed to where it was saved, the outermost place winning:

* ``adapter``: only inside adapted layers (LoRA / nested wrappers) — what the adapters add;
* ``base``: inside the decoder blocks, outside adapted layers — what backprop through the frozen base
  keeps whatever the adapter (norms, attention, activation functions);
* ``other``: outside the decoder blocks — embeddings, final norm, LM head, loss (the logits and their
  log-softmax over the vocabulary are large, and the same for every variant).

``act_bytes`` = adapter + base + other; ``decoder_bytes`` = adapter + base. Ratios to LoRA are given for
all three: the total ratio depends on how much the base and the head keep (vocabulary size, attention
kernel, sequence length), the decoder ratio is free of the head, the adapter ratio is the adapters' own.
For fp32 the adapter bytes are also computed from the shapes (``expected_adapter_bytes``).

GPU (``--gpu``, or whenever CUDA is available): after one warm-up step, ``torch.cuda.reset_peak_memory_stats()``;
``gpu_fwd_bytes`` = memory allocated after the forward minus before it (what the forward leaves for
backward, plus the loss), ``gpu_peak_bytes`` = ``max_memory_allocated()`` during forward + backward minus
the memory before the forward (includes the parameter gradients and backward temporaries).

    python -m bench.memory            # llama-512 and smollm2, seq 128/512/1024, r 16/64, batch 4
    python -m bench.memory --quick    # a tiny Llama, seconds
"""

from __future__ import annotations

import copy
import gc
import json
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

from bench._common import bench_parser, format_table, start, verdict, write_csv

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("lora", "nested-sb", "nested-nora")
TARGET_RATIO = 0.78  # nested / LoRA activation bytes at seq >= TARGET_MIN_SEQ
TARGET_MIN_SEQ = 512
#: the random Llama-shaped model (LlamaConfig keywords)
LLAMA_512 = {
    "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
#: the ``--quick`` model
LLAMA_TINY = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
REGIONS = ("adapter", "base", "other")


# ------------------------------------------------------------------------------------- counting
class SavedTensorCounter:
    """Context manager: bytes of the tensors autograd saves inside it, de-duplicated by storage.

    ``model``'s parameters and buffers are excluded (counted apart in ``param_bytes``). Saves made while a
    module of ``adapted`` runs are attributed to ``"adapter"``, else while a module of ``blocks`` runs to
    ``"base"``, else to ``"other"``; a storage saved in several places goes to the outermost one
    (other > base > adapter). Saved storages are kept alive until the context exits, so a freed storage's
    address can never be taken for another's."""

    def __init__(
        self, model: Any = None, adapted: Iterable[Any] = (), blocks: Iterable[Any] = ()
    ) -> None:
        self._model = model
        self._adapted, self._blocks = list(adapted), list(blocks)
        self._depth = [0, 0]  # adapted, blocks
        self._handles: list[Any] = []
        self._ctx: Any = None
        self._exclude: set[int] = set()
        self._storages: dict[int, list[Any]] = {}  # data_ptr -> [storage, nbytes, region index]
        self._params: dict[int, int] = {}
        self.saved_tensors = 0
        self.result: dict[str, int] = {}

    def __enter__(self) -> SavedTensorCounter:
        import torch

        if self._model is not None:
            tensors = chain(self._model.parameters(), self._model.buffers())
            self._exclude = {t.untyped_storage().data_ptr() for t in tensors}
        for i, mods in enumerate((self._adapted, self._blocks)):
            for m in mods:
                self._handles.append(m.register_forward_pre_hook(lambda *_a, i=i: self._enter(i)))
                self._handles.append(m.register_forward_hook(lambda *_a, i=i: self._leave(i)))
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)  # packs detached views
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.result = self.summary()
        self._storages.clear()  # release the storages

    def _enter(self, i: int) -> None:
        self._depth[i] += 1

    def _leave(self, i: int) -> None:
        self._depth[i] -= 1

    def _pack(self, t: Any) -> Any:
        """Record ``t``'s storage; return ``t`` detached (the same storage): returning ``t`` itself would
        make a saved output, its ``grad_fn`` and the node holding it a reference cycle that is never freed."""
        self.saved_tensors += 1
        st = t.untyped_storage()
        ptr, nbytes = st.data_ptr(), st.nbytes()
        if ptr in self._exclude:
            self._params[ptr] = nbytes
            return t.detach()
        region = 0 if self._depth[0] > 0 else 1 if self._depth[1] > 0 else 2
        rec = self._storages.get(ptr)
        if rec is None:
            self._storages[ptr] = [st, nbytes, region]
        else:
            rec[1], rec[2] = max(rec[1], nbytes), max(rec[2], region)
        return t.detach()

    def summary(self) -> dict[str, int]:
        """``act_bytes``, ``{adapter,base,other}_bytes``, ``param_saved_bytes``, ``saved_tensors``,
        ``storages`` so far (after the context: :attr:`result`)."""
        per = [0, 0, 0]
        for _, nbytes, region in self._storages.values():
            per[region] += nbytes
        out = {f"{name}_bytes": per[i] for i, name in enumerate(REGIONS)}
        out.update(act_bytes=sum(per), param_saved_bytes=sum(self._params.values()),
                   saved_tensors=self.saved_tensors, storages=len(self._storages))
        return out


def adapted_layers(model: Any) -> list[Any]:
    """The adapter wrappers of ``model``: nested ``NestedLinear`` and peft ``LoraLayer`` modules."""
    from peft.tuners.lora import LoraLayer

    from fedlora.nested import NestedLinear

    return [m for m in model.modules() if isinstance(m, (NestedLinear, LoraLayer))]


def decoder_blocks(model: Any) -> list[Any]:
    """The decoder blocks: the elements of the ``nn.ModuleList`` holding the most parameters."""
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    best = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(best)


def count_saved(model: Any, batch: dict[str, Any]) -> dict[str, int]:
    """:class:`SavedTensorCounter` summary of one training-mode forward (with the loss) of ``model``."""
    model.train()
    with SavedTensorCounter(model, adapted_layers(model), decoder_blocks(model)) as counter:
        out = model(**batch)
    del out
    return counter.result


def cuda_peak(model: Any, batch: dict[str, Any]) -> dict[str, int]:
    """GPU bytes of one forward + backward after a warm-up step (see the module docstring)."""
    import torch

    model.train()
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = model(**batch).loss
    torch.cuda.synchronize()
    fwd = torch.cuda.memory_allocated() - before
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del loss
    model.zero_grad(set_to_none=True)
    return {"gpu_fwd_bytes": fwd, "gpu_peak_bytes": peak}


def expected_adapter_bytes(cfg: Any, variant: str, r: int, q: int, tokens: int, itemsize: int) -> int:
    """Adapter bytes a Llama-family decoder with sdpa attention keeps with all 7 projections adapted (see
    the module docstring): per layer and token LoRA keeps 3 layer inputs (q/k/v share the attention norm's
    output, gate/up the MLP norm's; down's is the gated product) and 7 r-vectors, ``sb`` 7 r-vectors,
    ``nora`` 7 (r + q)-vectors. LoRA's ``o_proj`` input costs nothing extra: it is a view of the attention
    output, which sdpa keeps for its own backward (with eager attention it would be a copy)."""
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    per_token = {"lora": 2 * hidden + inter + 7 * r, "nested-sb": 7 * r, "nested-nora": 7 * (r + q)}
    return per_token[variant] * cfg.num_hidden_layers * tokens * itemsize


# ------------------------------------------------------------------------------------- models
def load_base(name: str, dtype: Any, seed: int = 0) -> Any:
    """``llama-512`` / ``llama-tiny`` (random, seeded, sdpa) or a causal LM by alias/path (``smollm2``)."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if name in ("llama-512", "llama-tiny"):
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**(LLAMA_512 if name == "llama-512" else LLAMA_TINY), attn_implementation="sdpa")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(cfg)
        return model.to(dtype)
    from fedlora.models import load_model

    return load_model(name, task="causal-lm", dtype=dtype, seed=seed)


def adapt(model: Any, variant: str, r: int, q: int) -> Any:
    """``variant`` at rank ``r`` (inner rank ``q`` for ``nested-nora``) on :data:`TARGETS`; returns the
    model to train (peft wraps it), in training mode. Outer factors: seeded randomized SVD with one
    subspace iteration (activation memory does not depend on their values), cached in memory."""
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS)
        with warnings.catch_warnings():  # peft calls a deprecated transformers property
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, cfg)
    else:
        from fedlora.nested import NestedLoraConfig, apply_nested

        mode = {"nested-sb": "sb", "nested-nora": "nora"}[variant]
        apply_nested(model, NestedLoraConfig(
            r=r, mode=mode, inner_rank=q if mode == "nora" else None, target_modules=TARGETS,
            svd_method="randomized", svd_niter=1, cache_dir="",
        ))
    return model.train()


def make_batch(vocab: int, batch: int, seq: int, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Random token ids in ``[0, vocab)`` (seeded), labels = ids, no attention mask (no padding)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


# ------------------------------------------------------------------------------------- running
def measure(
    model_name: str, dtype: Any, seqs: Sequence[int], ranks: Sequence[int], batch: int, max_tokens: int,
    q: int | None, variants: Sequence[str], device: str,
) -> list[dict[str, Any]]:
    """One row per (seq, r, variant) of ``model_name`` on ``device``; ratios to ``lora`` of the same cell."""
    import torch

    base = load_base(model_name, dtype)
    cfg = base.config
    rows: list[dict[str, Any]] = []
    for r in ranks:
        qq = q if q is not None else max(1, r // 4)
        for v in variants:
            t0 = time.perf_counter()
            model = adapt(copy.deepcopy(base), v, r, qq).to(device)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            for seq in seqs:
                b = max(1, min(batch, max_tokens // seq))
                data = make_batch(cfg.vocab_size, b, seq, device)
                row: dict[str, Any] = {
                    "model": model_name, "dtype": str(dtype).removeprefix("torch."), "device": device,
                    "seq": seq, "batch": b, "r": r, "q": qq if v == "nested-nora" else "", "variant": v,
                    "trainable_params": trainable, **count_saved(model, data),
                }
                row["decoder_bytes"] = row["adapter_bytes"] + row["base_bytes"]
                row["expected_adapter_bytes"] = (
                    expected_adapter_bytes(cfg, v, r, qq, b * seq, 4) if dtype == torch.float32 else ""
                )
                if device.startswith("cuda"):
                    row.update(cuda_peak(model, data))
                rows.append(row)
                gc.collect()
            print(f"{model_name} r={r} {v}: {len(seqs)} seq lengths in {time.perf_counter() - t0:.1f} s", flush=True)
            del model
            gc.collect()
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``*_ratio_vs_lora`` columns: each byte figure over LoRA's in the same (model, dtype, device, seq, r)."""
    def cell(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row[k] for k in ("model", "dtype", "device", "seq", "r", "batch"))

    lora = {cell(row): row for row in rows if row["variant"] == "lora"}
    for row in rows:
        ref = lora.get(cell(row))
        for key, col in (("act_bytes", "ratio_vs_lora"), ("decoder_bytes", "decoder_ratio_vs_lora"),
                         ("adapter_bytes", "adapter_ratio_vs_lora"), ("gpu_peak_bytes", "gpu_peak_ratio_vs_lora")):
            if ref is not None and ref.get(key) and key in row:
                row[col] = row[key] / ref[key]


def parse_args(argv: list[str] | None) -> Any:
    ap = bench_parser(__doc__, "a tiny random Llama (hidden 64, 2 layers), seq 32/64, r 4, batch 2: seconds")
    ap.add_argument("--models", default="llama-512,smollm2", help="comma-separated: llama-512, smollm2, ...")
    ap.add_argument("--seqs", default=None, help="sequence lengths (default 128,512,1024)")
    ap.add_argument("--ranks", default=None, help="ranks r (default 16,64)")
    ap.add_argument("--q", type=int, default=None, help="inner rank of nested-nora (default r/4)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 4)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="cap batch*seq (the batch shrinks at long seq; default: no cap)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--gpu", action="store_true", help="also measure on CUDA (default: when available)")
    ap.add_argument("--no-gpu", action="store_true", help="never measure on CUDA")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.seqs, a.ranks, a.batch = "llama-tiny", a.seqs or "32,64", a.ranks or "4", a.batch or 2
    a.seqs = [int(s) for s in (a.seqs or "128,512,1024").split(",")]
    a.ranks = [int(s) for s in (a.ranks or "16,64").split(",")]
    a.batch = a.batch or 4
    a.max_tokens = a.max_tokens or a.batch * max(a.seqs)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    return a


def write_outputs(
    dest: Path, rows: list[dict[str, Any]], info: dict[str, Any], meta: dict[str, Any]
) -> tuple[Path, Path]:
    """``memory.csv`` (rows + machine columns) and ``memory.json`` (``meta`` + rows) under ``dest``."""
    csv_path = write_csv(dest / "memory.csv", rows, info)
    json_path = dest / "memory.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    return csv_path, json_path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dest, info = start(a.out_dir)
    dtype = getattr(torch, a.dtype)
    devices = ["cpu"]
    if not a.no_gpu and (a.gpu or torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: CUDA is not available")
        devices.append("cuda")
    meta = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:] if argv is None else argv, "machine": info,
            "dtype": a.dtype, "targets": TARGETS, "llama_512": LLAMA_512, "llama_tiny": LLAMA_TINY,
            "input": "random token ids (seed 0), labels = ids, no padding"}
    rows: list[dict[str, Any]] = []
    for name in a.models:
        for dev in devices:
            rows += measure(name, dtype, a.seqs, a.ranks, a.batch, a.max_tokens, a.q, VARIANTS, dev)
            csv_path, json_path = write_outputs(dest, rows, info, meta)  # after every model: partial results

    order = {name: i for i, name in enumerate(a.models)}
    rows.sort(key=lambda r: (order[r["model"]], r["device"], r["seq"], r["r"], VARIANTS.index(r["variant"])))
    mib = 1024.0 ** 2
    table = [{
        "model": r["model"], "dev": r["device"], "seq": r["seq"], "batch": r["batch"], "r": r["r"],
        "variant": r["variant"] + (f" q={r['q']}" if r["q"] != "" else ""),
        "act_MiB": r["act_bytes"] / mib, "adapter_MiB": r["adapter_bytes"] / mib, "base_MiB": r["base_bytes"] / mib,
        "other_MiB": r["other_bytes"] / mib, "ratio": r.get("ratio_vs_lora", ""),
        "decoder_ratio": r.get("decoder_ratio_vs_lora", ""), "adapter_ratio": r.get("adapter_ratio_vs_lora", ""),
        **({"gpu_peak_MiB": r["gpu_peak_bytes"] / mib, "gpu_ratio": r.get("gpu_peak_ratio_vs_lora", "")}
           if "gpu_peak_bytes" in r else {}),
    } for r in rows]
    print(f"\nsaved-for-backward bytes of one forward (de-duplicated by storage, parameters excluded), "
          f"{a.dtype}; ratios: variant / LoRA in the same cell")
    print(format_table(table))
    mismatch = [r for r in rows if r["expected_adapter_bytes"] not in ("", r["adapter_bytes"])]
    if any(r["expected_adapter_bytes"] != "" for r in rows):
        print(f"\nadapter bytes vs the shapes' arithmetic: {len(rows) - len(mismatch)}/{len(rows)} rows equal")
    checks = []
    for r in rows:
        if r["variant"] != "lora" and r["seq"] >= TARGET_MIN_SEQ and "ratio_vs_lora" in r:
            v = verdict(r["ratio_vs_lora"], TARGET_RATIO)
            checks.append((r, v))
            print(f"{r['model']} {r['device']} seq {r['seq']} r {r['r']} {r['variant']}/lora: "
                  f"{r['ratio_vs_lora']:.3f} {v} (target <= {TARGET_RATIO}); decoder only "
                  f"{r['decoder_ratio_vs_lora']:.3f}")
    print(f"\nCSV: {csv_path}\nJSON: {json_path}")
    return {"rows": rows, "csv": csv_path, "json": json_path, "mismatch": mismatch, "checks": checks}


if __name__ == "__main__":
    main()
