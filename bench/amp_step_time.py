"""Training-step time by precision: bf16 base / bf16 autocast vs fp32, side by side in one process.

Default (CPU): MiniLM sequence classification, adapters on ``query`` and ``value`` of all 6 layers, classifier
trainable (``bench._minilm``), batch 16 × seq 64. For each adapter (nested ``sb`` r=16 and peft LoRA r=16)
four precisions, built exactly as a run builds them (:func:`fedlora.experiment.place_model`):

* ``fp32``       float32 base, no autocast (today's default)
* ``bf16``       ``dtype = "bfloat16"``: bf16 frozen base, fp32 adapters and head, no autocast
* ``amp``        float32 base under ``torch.autocast(bfloat16)`` (``amp = true``)
* ``bf16+amp``   both

Step = :func:`fedlora.training.train_step` (the training loop's own step: zero_grad, forward under the
model's autocast, per-example loss, backward, AdamW). All variants are timed interleaved, rotated order,
after warm-up (``bench._common.timed``); ratio = median step time / the same adapter's fp32 median.
Target: nested ``bf16+amp`` / fp32 ≤ 0.75 on a CPU with bf16 support (AVX512-BF16 / AMX).

``--llama``: step time of nested ``sb`` vs peft LoRA (r=16, ``q_proj``/``v_proj``) on a ~1B Llama-architecture
model with random weights (hidden 2048, 16 layers, intermediate 5632, 32 heads, 8 KV heads, vocab 32000),
bf16 base (+ ``--amp``), causal-LM batch ``--batch`` × seq 1024 on ``--device`` (``cuda`` on a GPU; on CUDA
the peak memory of a step over the resident models is recorded too). ``--tiny`` shrinks it for a CPU dry run.

    python -m bench.amp_step_time                    # MiniLM on this CPU
    python -m bench.amp_step_time --quick            # smoke size
    python -m bench.amp_step_time --llama --device cuda --amp
    python -m bench.amp_step_time --llama --tiny --device cpu --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from typing import Any

from bench._common import bench_parser, format_table, start, timed, verdict, write_csv
from bench._minilm import adapt, make_batch
from fedlora.experiment import place_model
from fedlora.precision import precision_of
from fedlora.training import make_optimizer, train_step, trainable_parameters

TARGET_RATIO = 0.75
#: name → (base dtype name, amp)
PRECISIONS: dict[str, tuple[str, bool]] = {
    "fp32": ("float32", False), "bf16": ("bfloat16", False), "amp": ("float32", True), "bf16+amp": ("bfloat16", True),
}
ADAPTERS = ("nested-sb", "lora")
#: the ~1B Llama-architecture config of ``--llama`` (and its ``--tiny`` dry-run size)
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000)
LLAMA_TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=176, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)


def make_train_step(model: Any, batch: dict[str, Any], lr: float = 1e-4) -> Callable[[], float]:
    """A zero-argument :func:`fedlora.training.train_step` of ``model`` on ``batch`` (AdamW built once; the
    model's own device and autocast; a GradScaler kept across calls when its precision scales losses)."""
    opt = make_optimizer(model, lr=lr)
    prec = precision_of(model)
    scaler = prec.grad_scaler()
    return lambda: train_step(model, opt, batch, prec.device, None, prec, scaler)


def _dtype(name: str) -> Any:
    from fedlora.precision import DTYPES

    return DTYPES[name]


# ------------------------------------------------------------------------------------- MiniLM (CPU)
def minilm_variant(adapter: str, precision: str, r: int) -> Any:
    """MiniLM with ``adapter`` in ``precision`` (a :data:`PRECISIONS` key) on the CPU, as a run builds it:
    nested adapted in float32 then the base cast; peft loaded in the base dtype (peft keeps LoRA in fp32)."""
    import torch

    from fedlora.experiment import quiet_libraries
    from fedlora.models import load_model

    quiet_libraries()
    dtype_name, amp = PRECISIONS[precision]
    dtype = _dtype(dtype_name)
    nested = adapter.startswith("nested")
    base = load_model("minilm", task="seq-cls", num_labels=2, seed=0, dtype=torch.float32 if nested else dtype)
    model = adapt(base, adapter, r, 4)
    return place_model(model, torch.device("cpu"), dtype, amp=amp)


def run_minilm(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    dest, info = start(a.out_dir)
    batch, source = make_batch(a.batch, a.seq, real=not a.quick)
    print(f"data: {source}; batch {a.batch} x seq {a.seq}; torch threads {torch.get_num_threads()}; "
          f"CPU bf16 capability: {torch.backends.cpu.get_cpu_capability()}")
    steps: dict[str, Callable[[], float]] = {}
    for adapter in a.adapters:
        for prec in a.precisions:
            steps[f"{adapter}/{prec}"] = make_train_step(minilm_variant(adapter, prec, a.r), batch)
    times = timed(steps, repeats=a.repeats, warmup=a.warmup)
    rows = []
    for name, t in times.items():
        adapter, prec = name.split("/")
        ref = times.get(f"{adapter}/fp32", {})
        rows.append({
            "variant": name, "adapter": adapter, "precision": prec, "base_dtype": PRECISIONS[prec][0],
            "amp": PRECISIONS[prec][1], "batch": a.batch, "seq": a.seq, "rounds": a.repeats,
            "step_median_s": t["median_s"], "step_min_s": t["min_s"], "cpu_median_s": t["cpu_median_s"],
            "ratio_vs_fp32": t["median_s"] / ref["median_s"] if ref else float("nan"),
            "cpu_ratio_vs_fp32": t["cpu_median_s"] / ref["cpu_median_s"] if ref else float("nan"),
            "torch_threads": torch.get_num_threads(),
        })
    print(format_table(rows, ["variant", "step_median_s", "step_min_s", "ratio_vs_fp32", "cpu_median_s",
                              "cpu_ratio_vs_fp32"]))
    for row in rows:
        if row["precision"] != "fp32":
            print(f"{row['variant']}/fp32 step-time ratio {row['ratio_vs_fp32']:.3f} wall "
                  f"{verdict(row['ratio_vs_fp32'], TARGET_RATIO)}, {row['cpu_ratio_vs_fp32']:.3f} CPU "
                  f"(medians of {a.repeats} interleaved rounds; target <= {TARGET_RATIO})")
    csv_path = write_csv(dest / "amp_step_time.csv", rows, info)
    print(f"\nCSV: {csv_path}")
    return {"rows": rows, "csv": csv_path}


# ------------------------------------------------------------------------------------- ~1B Llama
def llama_models(a: argparse.Namespace) -> dict[str, Any]:
    """nested-sb and LoRA on one random-weight Llama (bf16 base on ``a.device``), built as a run builds them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora.nested import NestedLoraConfig, apply_nested

    device = torch.device(a.device)
    shape = LLAMA_TINY if a.tiny else LLAMA_1B
    config = LlamaConfig(**shape, max_position_embeddings=max(2048, a.seq), tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:
        base = LlamaForCausalLM(config).to(torch.bfloat16)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"Llama {shape} ({n_params / 1e9:.3f} B parameters) built on {device} in {time.perf_counter() - t0:.1f} s")
    targets = ["q_proj", "v_proj"]
    models = {}
    for adapter in a.adapters:
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        if adapter == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.r, lora_dropout=0.0, target_modules=targets))
        else:
            apply_nested(model, NestedLoraConfig(r=a.r, mode="sb", target_modules=targets, modules_to_save=[],
                                                 svd_method="randomized", cache_dir=""))
        models[adapter] = place_model(model, device, torch.bfloat16, amp=a.amp,
                                      gradient_checkpointing=a.gradient_checkpointing).train()
        print(f"built {adapter}: {sum(p.numel() for p in trainable_parameters(model)):,} trainable "
              f"({time.perf_counter() - t0:.1f} s)")
    del base
    return models


def run_llama(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    dest, info = start(a.out_dir)
    models = llama_models(a)
    vocab = (LLAMA_TINY if a.tiny else LLAMA_1B)["vocab_size"]
    ids = torch.randint(3, vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    steps = {name: make_train_step(m, batch) for name, m in models.items()}
    cuda = torch.device(a.device).type == "cuda"
    peak: dict[str, float] = {}
    for name, step in steps.items():  # one step each, alone: the step's peak memory over the resident models
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        step()
        if cuda:
            torch.cuda.synchronize()
            peak[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
    times = timed(steps, repeats=a.repeats, warmup=a.warmup)
    ref = times.get("lora", {}).get("median_s")
    rows = [{
        "variant": name, "model": "llama-tiny" if a.tiny else "llama-1b", "device": a.device, "base_dtype": "bfloat16",
        "amp": a.amp, "gradient_checkpointing": a.gradient_checkpointing, "r": a.r, "batch": a.batch, "seq": a.seq,
        "trainable_params": sum(p.numel() for p in trainable_parameters(models[name])), "rounds": a.repeats,
        "step_median_s": t["median_s"], "step_min_s": t["min_s"],
        "tokens_per_s": a.batch * a.seq / t["median_s"], "ratio_vs_lora": t["median_s"] / ref if ref else float("nan"),
        "step_peak_mib": peak.get(name, float("nan")),
    } for name, t in times.items()]
    print(format_table(rows, ["variant", "trainable_params", "step_median_s", "step_min_s", "tokens_per_s",
                              "ratio_vs_lora", "step_peak_mib"]))
    csv_path = write_csv(dest / "amp_step_time_llama.csv", rows, info)
    (dest / "amp_step_time_llama.json").write_text(json.dumps({"rows": rows, "machine": info}, indent=1,
                                                               default=str))
    print(f"\nCSV: {csv_path}")
    return {"rows": rows, "csv": csv_path}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = bench_parser(__doc__, "smoke size: batch 4 x seq 16 (MiniLM) / batch 1 x seq 64 (Llama), few rounds")
    ap.add_argument("--llama", action="store_true", help="nested vs LoRA on the ~1B Llama config (bf16 base)")
    ap.add_argument("--tiny", action="store_true", help="with --llama: a tiny Llama (dry run)")
    ap.add_argument("--device", default="cpu", help="with --llama: cpu, cuda, cuda:N")
    ap.add_argument("--amp", action="store_true", help="with --llama: bf16 autocast as well")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="with --llama")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--adapters", default=",".join(ADAPTERS))
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="MiniLM only")
    a = ap.parse_args(argv)
    a.adapters = [x.strip() for x in a.adapters.split(",") if x.strip()]
    a.precisions = [x.strip() for x in a.precisions.split(",") if x.strip()]
    if "fp32" not in a.precisions:
        a.precisions.insert(0, "fp32")  # the reference of every ratio
    a.batch = a.batch or ((1 if a.quick else 4) if a.llama else (4 if a.quick else 16))
    a.seq = a.seq or ((64 if a.quick else 1024) if a.llama else (16 if a.quick else 64))
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    a.repeats = a.repeats or (3 if a.quick else 20)
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    return run_llama(a) if a.llama else run_minilm(a)


if __name__ == "__main__":
    main()
