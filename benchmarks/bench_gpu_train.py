"""LoRA / QLoRA / ZeRO-2 training step of the grounding LLM at Llama-2-7B dims: time, tokens/s, MFU, memory.

Usage::

    python benchmarks/bench_gpu_train.py --mode lora  --out benchmarks/results/gpu/train_lora.json
    python benchmarks/bench_gpu_train.py --mode qlora --out benchmarks/results/gpu/train_qlora.json
    accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml --num_processes 1 \\
        benchmarks/bench_gpu_train.py --mode zero2 --out benchmarks/results/gpu/train_zero2.json
    python benchmarks/bench_gpu_train.py --dims tiny --device cpu --out /tmp/t.json     # CPU dry run

**What is measured, and why this path.** The step is the project's own: a :class:`GroundingMLLM`
built by :func:`build_grounding_mllm` (grounding tokens added, LoRA r 8 on q/k/v/o with the
``<image>`` / ``[SEG]`` / ``[REJ]`` embedding and LM-head rows trainable, the float32 ``[SEG]`` MLP
and reject head, gradient checkpointing as ``configs/model/llava-1.5-7b_sam-vit-h.yaml`` sets it),
its ``forward`` (visual tokens spliced in place of ``<image>``, full-sequence logits, answer-only
cross-entropy, ``[SEG]`` states through the MLP, the reject logit), backward and AdamW, under bf16
autocast as accelerate's ``mixed_precision: bf16`` runs it. Only the LLM side is built: the vision
tower is frozen and runs without grad, and the projector output is stood in for by a random
``(B, K, 4096)`` tensor that requires grad (so the backward runs through the LLM down to the visual
tokens, as it does into a trainable projector); the S2RM head / SAM are left out (their cost does not
depend on the LLM). The LLM itself is passed in (``llm=``) rather than built from ``random_*``
fields, because the random path sizes the vocabulary to the tokenizer (533 BPE tokens), while
Llama-2 has 32000 rows, whose LM head is 2 % of the FLOPs and a large share of the activation
memory. It is :func:`mllm_ris.modeling.llm.random_causal_lm`, the function the random path calls,
built on the device in bf16. QLoRA goes through the project's loading path: the random bf16 model
is saved to a temporary folder (~13.5 GB at 7B dims; bitsandbytes quantizes only weights it loads
from a checkpoint, so a folder without the weights would leave them unquantized) and
``build_grounding_mllm`` loads it with ``quantization: 4bit`` (NF4, double quantization, bf16
compute; ``load_causal_lm`` + ``prepare_model_for_kbit_training``). ``--mode zero2`` is the plain
LoRA step under DeepSpeed ZeRO-2 through ``accelerate launch`` (the model and AdamW go through
``accelerator.prepare``; the DeepSpeed "auto" sizes are filled as the trainer fills them). Under
ZeRO-2 the explicit bf16 autocast matters: accelerate applies none with DeepSpeed, and DeepSpeed's
bf16 mode casts the whole module, the float32 ``[SEG]`` MLP included, to bf16, so without autocast
``GroundingMLLM`` feeds float32 states to bf16 weights (``RuntimeError: mat1 and mat2 must have the
same dtype``): the trainer's own DeepSpeed + ``mixed_precision: bf16`` path has that problem.

**FLOPs per step** (model FLOPs, also written to the JSON; ``T`` = tokens per step = batch ×
spliced sequence ``s``, ``N`` = the LLM's matmul weights incl. the LM head = L·(4h² + 3h·I) + V·h,
``N_lora`` = LoRA parameters, ``A`` = causal attention forward = 2·L·B·s²·h)::

    forward              2·N·T + A
    backward, frozen W   2·N·T + 2·A       (activation gradients only: no weight gradients)
    LoRA, fwd + bwd      6·N_lora·T
    total                4·N·T + 3·A + 6·N_lora·T

6·N·T (full fine-tuning) would overstate a LoRA step by about 1.5×. The recomputation of gradient
checkpointing is not counted (this is MFU, not hardware FLOPs utilisation). MFU = FLOPs / median
step time / the device's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s, from
``torch.cuda.get_device_name``; null on CPU or an unknown device). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (null on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or under accelerate launch
from _query import PEAK_BF16, peak_flops

# Llama-2-7B's decoder; tiny = CPU dry runs (the same code path, seconds)
DIMS: dict[str, dict[str, int]] = {
    "7b": {"hidden": 4096, "layers": 32, "heads": 32, "intermediate": 11008, "vocab": 32000},
    "tiny": {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128, "vocab": 32000},
}
FLOPS_FORMULA = (
    "4*N*T + 3*A + 6*N_lora*T; N = L*(4*h^2 + 3*h*I) + V*h (matmul weights incl. LM head), "
    "T = batch*seq tokens, A = 2*L*batch*seq^2*h (causal attention forward), N_lora = LoRA params; "
    "gradient-checkpointing recomputation not counted"
)


def matmul_params(d: dict[str, int]) -> int:
    """``N``: the decoder's matmul weights (q, k, v, o, gate, up, down per layer) + the LM head."""
    h, inter = d["hidden"], d["intermediate"]
    return d["layers"] * (4 * h * h + 3 * h * inter) + d["vocab"] * h


def train_flops(d: dict[str, int], *, batch: int, seq: int, lora_params: int) -> dict[str, float]:
    """Model FLOPs of one LoRA training step (see the module doc), with its parts."""
    n = matmul_params(d)
    tokens = batch * seq
    attn = 2.0 * d["layers"] * batch * seq * seq * d["hidden"]
    parts = {
        "forward": 2.0 * n * tokens + attn,
        "backward_activation_grads": 2.0 * n * tokens + 2.0 * attn,
        "lora_fwd_bwd": 6.0 * lora_params * tokens,
    }
    return {**parts, "total": sum(parts.values()), "N": float(n), "attention_forward": attn}


# ------------------------------------------------------------------------------------------ model


def _mllm_config(args: argparse.Namespace, d: dict[str, int], gc_on: bool, folder: Path | None) -> Any:
    from mllm_ris.modeling.model_config import LoraSettings, MLLMConfig

    return MLLMConfig(
        name_or_path=str(folder) if folder is not None else None,
        tokenizer="bpe",
        seg_dim=256,
        lora=LoraSettings(enabled=True, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05),
        quantization="4bit" if args.mode == "qlora" else "none",
        dtype="bfloat16",
        gradient_checkpointing=gc_on,
        random_arch="llama",
        random_hidden_size=d["hidden"],
        random_num_layers=d["layers"],
        random_num_heads=d["heads"],
        random_intermediate_size=d["intermediate"],
    )


def _random_llm(d: dict[str, int], device: str) -> Any:
    from mllm_ris.modeling.llm import random_causal_lm

    with torch.device(device):
        llm = random_causal_lm(
            arch="llama", vocab_size=d["vocab"], hidden_size=d["hidden"], num_layers=d["layers"],
            num_heads=d["heads"], intermediate_size=d["intermediate"], tie_embeddings=False,
            pad_token_id=0, dtype="bfloat16",
        )  # fmt: skip
    return llm


def build(args: argparse.Namespace, d: dict[str, int], gc_on: bool) -> tuple[Any, dict[str, float]]:
    """The GroundingMLLM of ``args.mode`` on ``args.device``; also the seconds its parts took."""
    from mllm_ris.modeling.mllm import build_grounding_mllm

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    llm = _random_llm(d, args.device)
    seconds["init"] = time.perf_counter() - t0
    if args.mode != "qlora":
        with torch.device(args.device):
            model = build_grounding_mllm(_mllm_config(args, d, gc_on, None), llm=llm)
        return model.to(args.device), seconds
    folder = Path(tempfile.mkdtemp(prefix="bench_qlora_", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        llm.save_pretrained(str(folder))
        del llm
        gc.collect()
        _empty_cache(args.device)
        seconds["save"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = build_grounding_mllm(_mllm_config(args, d, gc_on, folder), device=args.device)
        seconds["load_4bit"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    model.heads_to(args.device)
    return model, seconds


def set_checkpointing(model: Any, on: bool) -> None:
    """Switch the LLM's (non-reentrant) activation checkpointing on or off in place."""
    from mllm_ris.modeling.lora import enable_gradient_checkpointing

    base = model.llm.get_base_model()
    if on:
        enable_gradient_checkpointing(base)
        return
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    disable()


def make_batch(model: Any, args: argparse.Namespace, hidden: int) -> dict[str, Any]:
    """``batch`` chats: BOS, random prompt tokens with one ``<image>``, the answer ``Sure, it is [SEG].``
    + eos as labels; ``visual`` random embeddings (requires grad) for the ``<image>``."""
    from mllm_ris.modeling.projector import VisualTokens
    from mllm_ris.processing.processor import answer_text

    tok, ids = model.tokenizer, model.token_ids
    answer = [*tok(answer_text(1), add_special_tokens=False).input_ids, tok.eos_token_id]
    n_prompt = args.text_tokens - len(answer)
    if n_prompt < 3:
        raise SystemExit(f"--text-tokens {args.text_tokens}: needs at least {len(answer) + 3}")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, 530, (args.batch, n_prompt), generator=g)  # ordinary BPE tokens
    prompt[:, 0] = tok.bos_token_id
    prompt[:, 1] = ids.image
    input_ids = torch.cat([prompt, torch.tensor(answer).expand(args.batch, -1)], dim=1)
    labels = input_ids.clone()
    labels[:, :n_prompt] = -100
    dev = args.device
    embeds = torch.randn(args.batch, args.visual_tokens, hidden, generator=g) * 0.02
    return {
        "input_ids": input_ids.to(dev),
        "attention_mask": torch.ones_like(input_ids).to(dev),
        "visual_tokens": VisualTokens(
            embeds.to(dev, torch.bfloat16).requires_grad_(True),
            torch.ones(args.batch, args.visual_tokens, dtype=torch.bool, device=dev),
        ),
        "labels": labels.to(dev),
        "target_counts": torch.ones(args.batch, dtype=torch.long),
    }


def step_fn(model: Any, optimizer: Any, batch: dict[str, Any], device: str, backward: Callable) -> Callable:
    """One training step: bf16-autocast forward (LM loss + terms that reach the [SEG] MLP and the
    reject head, as the mask / no-target losses do), backward, AdamW, zero_grad. Returns the loss."""
    dev_type = torch.device(device).type

    def step() -> float:
        with torch.autocast(dev_type, dtype=torch.bfloat16):
            out = model(**batch)
        loss = out.loss.float() + out.seg_embeds.float().square().mean()
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(
            out.reject_logit.float(), torch.zeros_like(out.reject_logit, dtype=torch.float32)
        )
        backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


# -------------------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _empty_cache(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def measure(step: Callable[[], float], args: argparse.Namespace, flops: float) -> dict[str, Any]:
    """Warm-up steps, then ``args.steps`` timed steps: median / IQR, tokens/s, MFU, peak memory."""
    cuda = args.device.startswith("cuda")
    losses = [step() for _ in range(args.warmup)]
    _sync(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (med,) * 3
    peak = peak_flops(args.device)
    return {
        "status": "ok",
        "step_s_median": med,
        "step_s_iqr": [q1, q3],
        "step_s_all": times,
        "tokens_per_s": args.batch * args.seq / med,
        "samples_per_s": args.batch / med,
        "tflops_per_s": flops / med / 1e12,
        "mfu": None if peak is None else flops / med / peak,
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "loss_first_last": [losses[0], losses[-1]],
        "loss_finite": all(math.isfinite(x) for x in losses),
    }


def _count(model: Any) -> dict[str, int]:
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    return {
        "trainable_params": sum(trainable.values()),
        "lora_params": sum(v for n, v in trainable.items() if "lora_" in n),
        "linear4bit_layers": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
    }


def _accelerator(args: argparse.Namespace) -> Any:
    """zero2: accelerate's Accelerator with the DeepSpeed "auto" sizes filled as the trainer does."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        raise SystemExit(
            "--mode zero2 runs under `accelerate launch --config_file configs/accelerate/"
            "deepspeed-zero2.yaml --num_processes 1 benchmarks/bench_gpu_train.py --mode zero2 ...`"
        )
    from accelerate import Accelerator

    from mllm_ris.config import TrainConfig
    from mllm_ris.training._runtime import fill_deepspeed_auto, launch_kwargs

    acc = Accelerator(mixed_precision="bf16", **launch_kwargs())
    plugin = acc.state.deepspeed_plugin
    fill_deepspeed_auto(plugin.deepspeed_config, TrainConfig(batch_size=args.batch), acc.num_processes)
    return acc


def _ds_summary(acc: Any) -> dict[str, Any] | None:
    if acc is None:
        return None
    ds = acc.state.deepspeed_plugin.deepspeed_config
    keys = ("zero_optimization", "bf16", "train_micro_batch_size_per_gpu", "gradient_clipping")
    return {k: ds.get(k) for k in keys}


def run(args: argparse.Namespace) -> dict[str, Any]:
    d = DIMS[args.dims]
    settings = [s == "on" for s in args.gradient_checkpointing.split(",")]
    acc = _accelerator(args) if args.mode == "zero2" else None
    if acc is not None:
        args.device = str(acc.device)
    model, seconds = build(args, d, settings[0])
    counts = _count(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = make_batch(model, args, d["hidden"])
    if acc is not None:
        model, optimizer = acc.prepare(model, optimizer)
        backward: Callable = acc.backward
    else:
        backward = torch.Tensor.backward
    args.seq = args.text_tokens - 1 + args.visual_tokens  # <image> replaced by the visual tokens
    flops = train_flops(d, batch=args.batch, seq=args.seq, lora_params=counts["lora_params"])
    step = step_fn(model, optimizer, batch, args.device, backward)
    runs: dict[str, Any] = {}
    for on in settings:
        key = f"gradient_checkpointing_{'on' if on else 'off'}"
        try:
            set_checkpointing(acc.unwrap_model(model) if acc is not None else model, on)
            runs[key] = measure(step, args, flops["total"])
        except torch.OutOfMemoryError as exc:
            runs[key] = {"status": f"not measured: {_first_line(exc)}"}
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            _empty_cache(args.device)
        r = runs[key]
        if r["status"] == "ok":
            mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
            mem = "–" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f} MiB"
            print(
                f"{args.mode} {args.dims} {key}: step {1e3 * r['step_s_median']:.1f} ms, "
                f"{r['tokens_per_s']:.0f} tokens/s, MFU {mfu}, peak {mem}"
            )
        else:
            print(f"{args.mode} {args.dims} {key}: {r['status']}")
    cuda = args.device.startswith("cuda")
    return {
        "mode": args.mode,
        "dims": args.dims,
        "llm": d,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": "bfloat16 weights, bf16 autocast" + (", NF4 4-bit base" if args.mode == "qlora" else ""),
        "world_size": acc.num_processes if acc is not None else 1,
        "deepspeed": _ds_summary(acc),
        "seg_mlp_dtype": str(next((acc.unwrap_model(model) if acc else model).seg_mlp.parameters()).dtype),
        "batch": args.batch,
        "text_tokens": args.text_tokens,
        "visual_tokens": args.visual_tokens,
        "seq": args.seq,
        "tokens_per_step": args.batch * args.seq,
        "lora_r": args.lora_r,
        "matmul_params_N": int(flops["N"]),
        **counts,
        "flops_formula": FLOPS_FORMULA,
        "flops_per_step": flops,
        "peak_bf16_flops": peak_flops(args.device),
        "peak_table": PEAK_BF16,
        "build_seconds": seconds,
        "warmup": args.warmup,
        "steps": args.steps,
        "runs": runs,
        "command": " ".join(["python", "benchmarks/bench_gpu_train.py", *sys.argv[1:]]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["lora", "qlora", "zero2"], default="lora")
    parser.add_argument("--dims", choices=sorted(DIMS), default="7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (7b: 8, tiny: 2)")
    parser.add_argument("--text-tokens", type=int, default=None, help="prompt + answer (7b: 64, tiny: 16)")
    parser.add_argument(
        "--visual-tokens", type=int, default=None, help="K per image (7b: 256, projector.max_tokens; tiny: 8)"
    )
    parser.add_argument(
        "--gradient-checkpointing", default="on,off", help="settings measured in turn on the same model"
    )
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--tmp", default=None, help="qlora: where the random model is saved (deleted after)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    tiny = args.dims == "tiny"
    args.batch = args.batch or (2 if tiny else 8)
    args.text_tokens = args.text_tokens or (16 if tiny else 64)
    args.visual_tokens = args.visual_tokens or (8 if tiny else 256)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        record = run(args)
    except Exception as exc:  # a failed build / launch is a result too ("not measured")
        record = {"mode": args.mode, "dims": args.dims, "status": f"not measured: {_first_line(exc)}"}
        print(record["status"], file=sys.stderr)
        _write(args.out, record)
        raise
    ok = any(r["status"] == "ok" for r in record["runs"].values())
    record["status"] = "ok" if ok else "not measured: every run failed"
    if int(os.environ.get("RANK", "0")) == 0:
        _write(args.out, record)
    return 0


def _write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
