"""Where a training step of the MLLM goes: forward time per part and backward, on SynthRef batches.

    python benchmarks/profile_step.py --data data/synthref --set model.mllm.pointer_dim=64 \
        --set model.projector.descriptors=true

Times one collate (superpixels computed, no cache) and ``--steps`` forward + backward passes of
``--model`` (default ``configs/model/tiny-synth.yaml``; batch ``--batch``, one torch thread); the
per-part forward times come from module hooks (vision tower, projector, LLM, pixel encoder, head).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import ROOT

from mllm_ris.config import load_config
from mllm_ris.data.registry import build_dataset
from mllm_ris.modeling.model import build_model
from mllm_ris.modeling.predictor import build_processor

PARTS = ("vision", "projector", "mllm", "pixel_encoder", "head")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthref")
    parser.add_argument("--model", type=Path, default=ROOT / "configs" / "model" / "tiny-synth.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="config override (repeatable)")
    parser.add_argument(
        "--pointer-only", action="store_true", help="the pointer warm-up step (language side only)"
    )
    parser.add_argument("--bf16", action="store_true", help="forward under torch.autocast (cpu, bfloat16)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config([args.model], args.set)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    dataset = build_dataset("synthref", args.data, "train")
    collate = build_processor(model, image_size=128)
    samples = [dataset[i] for i in range(args.batch)]
    start = time.perf_counter()
    batch = collate(samples)
    print(f"collate (superpixels computed): {time.perf_counter() - start:.3f} s")
    start = time.perf_counter()
    batch = collate(samples)
    print(f"collate again (superpixels computed again, no cache): {time.perf_counter() - start:.3f} s")
    spent: dict[str, float] = {}

    def timed(name: str, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(lambda m, i: spent.__setitem__(name, -time.perf_counter()))
        module.register_forward_hook(
            lambda m, i, o: spent.__setitem__(name, spent[name] + time.perf_counter())
        )

    for name in PARTS:
        if getattr(model, name) is not None:
            timed(name, getattr(model, name))
    rows: list[dict[str, float]] = []
    for _ in range(args.steps):
        spent.clear()
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(batch, segment=not args.pointer_only)
        forward = time.perf_counter() - start
        start = time.perf_counter()
        out.loss.backward()
        rows.append({"forward": forward, "backward": time.perf_counter() - start, **spent})
        model.zero_grad()
    rows = rows[1:] or rows  # the first step warms up
    print("median s per step of", args.batch, "samples:")
    for key in rows[0]:
        print(f"  {key:14s} {statistics.median(r[key] for r in rows):.3f}")


if __name__ == "__main__":
    main()
