"""The simplest sentence-conditioned region pointer on the project's own regions: the reference an MLLM
pointer run is compared with at the same budget.

Same processing as the model (``configs/model/tiny-synth.yaml`` superpixels in token order, the collator's
region descriptors: 16x16 shape crop, CIELAB colour, geometry; region targets = region ≥ 50 % inside the
target), but the language side is a bidirectional GRU over the sentence's tokens (the project's BPE
tokenizer, no chat template) and the region side an MLP over the descriptors; the score is
:class:`~mllm_ris.modeling.pointer.RegionPointer` (``--layers`` mixing layers) trained with region BCE.
Everything is precomputed once, so a step costs milliseconds: this measures how many samples the
grounding decision needs on these regions, free of the LLM's and the pixel side's cost.

Train: the first ``--train`` single-target expressions of SynthRef train (shuffled); held out: ``--held``
single-target expressions of SynthRef val (images never seen). Reported per level: top-1 (the best
region lies ≥ 50 % inside the target) and cIoU of the painted prior (regions with probability > 0.5,
the best one if none) against the target mask.

    python benchmarks/bench_pointer_probe.py --data data/synthref --minutes 5
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import ROOT, machine, shown
from torch import nn

from mllm_ris.config import load_config
from mllm_ris.data.registry import build_dataset
from mllm_ris.modeling.model import build_model
from mllm_ris.modeling.model_losses import region_coverage
from mllm_ris.modeling.pointer import RegionPointer, paint_regions
from mllm_ris.modeling.predictor import build_collator
from mllm_ris.modeling.projector import _descriptor_features

RESULTS = ROOT / "benchmarks" / "results"
MAX_WORDS = 24


def precompute(data: Path, split: str, n: int, seed: int, cache: Path) -> dict[str, Any]:
    """Descriptors ``(N, Kmax, F)``, region mask ``(N, Kmax)``, coverage ``(N, Kmax)``, word ids ``(N, 24)``,
    label maps ``(N, S, S)`` and target masks ``(N, S, S)`` of ``n`` single-target expressions."""
    cfg = load_config(
        [ROOT / "configs" / "model" / "tiny-synth.yaml"],
        [
            "model.mllm.pointer_dim=64",
            "model.projector.descriptors=true",
            f"model.superpixels.cache_dir={cache}",
        ],
    )
    model = build_model(cfg.model)
    collate = build_collator(model, image_size=128)
    tokenizer = model.mllm.tokenizer
    dataset = build_dataset("synthref", data, split)
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    rows: dict[str, list] = {k: [] for k in ("x", "mask", "cov", "words", "labels", "target", "level")}
    kmax = 64
    for start in range(0, len(order), 32):
        samples = [dataset[i] for i in order[start : start + 32]]
        samples = [s for s in samples if s.masks.shape[0] == 1]
        if not samples:
            continue
        batch = collate(samples)
        labels = model.projector.region_labels(batch.superpixels)  # (B, S, S) token order
        k = batch.regions.shape.shape[1]
        if k > kmax:
            raise SystemExit(f"{k} regions in one image; this probe pads to {kmax}")
        feats = F.pad(_descriptor_features(batch.regions, k, torch.float32), (0, 0, 0, kmax - k))
        cov = F.pad(region_coverage(labels, batch.target_masks, k)[:, 0], (0, kmax - k))  # (B, Kmax)
        mask = F.pad(batch.regions.mask, (0, kmax - k))
        for i, s in enumerate(samples):
            ids = tokenizer(s.text)["input_ids"][:MAX_WORDS]
            rows["words"].append(torch.tensor(ids + [0] * (MAX_WORDS - len(ids))))
            rows["x"].append(feats[i])
            rows["mask"].append(mask[i])
            rows["cov"].append(cov[i])
            rows["labels"].append(labels[i].to(torch.int16))
            rows["target"].append(batch.target_masks[i, 0].bool())
            rows["level"].append(s.difficulty)
        if len(rows["x"]) >= n:
            break
    out = {k: (torch.stack(v[:n]) if k != "level" else v[:n]) for k, v in rows.items()}
    out["vocab"] = len(tokenizer)
    return out


class ProbePointer(nn.Module):
    """GRU sentence query ``(B, 2H)`` + MLP region states ``(B, K, H)`` → ``(B, K)`` logits."""

    def __init__(self, vocab: int, feat_dim: int, layers: int, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.gru = nn.GRU(width, width, batch_first=True, bidirectional=True)
        self.region = nn.Sequential(nn.Linear(feat_dim, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.pointer = RegionPointer(query_dim=2 * width, region_dim=width, dim=width, layers=layers)

    def forward(self, words: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.embed(words))  # (B, L, 2H)
        query = states.max(1).values  # (B, 2H)
        return self.pointer(query[:, None], self.region(feats), mask)[:, 0]  # (B, 1, K) -> (B, K)


def oracle(held: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The superpixel ceiling: :func:`evaluate` of logits that choose exactly the regions ≥ 50 % inside
    the target (the best-covered one if none is)."""
    logits = torch.where(held["cov"] >= 0.5, 10.0, -10.0) + held["cov"]  # (N, K)
    return evaluate(None, held, logits.masked_fill(~held["mask"], -1e4))


def evaluate(
    net: ProbePointer | None, held: dict[str, Any], logits: torch.Tensor | None = None
) -> dict[str, dict[str, float]]:
    """Top-1 region accuracy and cIoU of the painted prior per level (and ``all``) of ``net`` (or of
    given ``logits (N, K)``)."""
    if logits is None:
        assert net is not None
        with torch.no_grad():
            logits = net(held["words"], held["x"], held["mask"])  # (N, K)
    top1 = held["cov"].gather(1, logits.argmax(1, keepdim=True))[:, 0] >= 0.5  # (N,)
    chosen = torch.sigmoid(logits) > 0.5
    chosen |= F.one_hot(logits.argmax(1), logits.shape[1]).bool() & ~chosen.any(1, keepdim=True)
    painted = paint_regions(chosen.float()[:, None] * 2 - 1, held["labels"].long())[:, 0] > 0  # (N, S, S)
    inter = (painted & held["target"]).flatten(1).sum(1).float()
    union = (painted | held["target"]).flatten(1).sum(1).float()
    out: dict[str, dict[str, float]] = {}
    for level in [*sorted(set(held["level"])), "all"]:
        pick = torch.tensor([level in ("all", lv) for lv in held["level"]])
        out[level] = {
            "n": int(pick.sum()),
            "top1": round(float(top1[pick].float().mean()), 4),
            "cIoU": round(float(inter[pick].sum() / union[pick].sum().clamp_min(1)), 4),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthref")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--train", type=int, default=8000, help="single-target train expressions")
    parser.add_argument("--held", type=int, default=600, help="single-target val expressions")
    parser.add_argument("--layers", type=int, default=2, help="RegionPointer mixing layers")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=250, help="steps between points of the curve")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--cache-dir", type=Path, default=ROOT / "runs" / "pointer_probe" / "superpixels", help="label maps"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train = precompute(args.data, "train", args.train, args.seed, args.cache_dir)
    held = precompute(args.data, "val", args.held, args.seed, args.cache_dir)
    prep_s = time.perf_counter() - t0
    net = ProbePointer(train["vocab"], train["x"].shape[-1], args.layers)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr)
    n = len(train["x"])
    curve, step, t0, seen = [], 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < args.minutes * 60:
        pick = torch.randint(0, n, (args.batch,))
        logits = net(train["words"][pick], train["x"][pick], train["mask"][pick])
        target = (train["cov"][pick] >= 0.5).float()
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=train["mask"][pick].float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        step, seen = step + 1, seen + args.batch
        if step % args.eval_every == 0:
            res = evaluate(net, held)["all"]
            curve.append(
                {"step": step, "samples": seen, "seconds": round(time.perf_counter() - t0, 1), **res}
            )
            print(curve[-1], flush=True)
    final = evaluate(net, held)
    record = {
        "layers": args.layers,
        "train_expressions": n,
        "held_expressions": len(held["x"]),
        "steps": step,
        "samples_seen": seen,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "precompute_seconds": round(prep_s, 1),
        "final": final,
        "oracle": oracle(held),
        "curve": curve,
        "machine": machine(),
        "threads": args.threads,
        "date": date.today().isoformat(),
        "command": f"python benchmarks/bench_pointer_probe.py --data {shown(args.data)} "
        f"--minutes {args.minutes:g} --train {args.train} --held {args.held} --layers {args.layers} "
        f"--batch {args.batch} --lr {args.lr:g} --threads {args.threads} --seed {args.seed}",
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"pointer_probe_L{args.layers}_b{args.batch}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(final), f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
