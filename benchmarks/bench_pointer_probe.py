"""The simplest sentence-conditioned region pointer on the project's own regions: the reference an MLLM
pointer run is compared with at the same budget.

Same processing as the model (``configs/model/tiny-synth.yaml`` superpixels in token order, the collator's
region descriptors: 16x16 shape crop, CIELAB colour, geometry; region targets = region ≥ 50 % inside the
target), but the language side is a bidirectional GRU over the sentence's tokens (the project's BPE
tokenizer, no chat template) and the region side an MLP over the descriptors; the score is
:class:`~mllm_ris.modeling.projector.RegionPointer` (``--layers`` mixing layers) trained with region BCE.
Everything is precomputed once, so a step costs milliseconds: this measures how many samples the
grounding decision needs on these regions, free of the LLM's and the pixel side's cost.

Train: the first ``--train`` single-target expressions of SynthRef train (shuffled); held out: ``--held``
single-target expressions of SynthRef val (images never seen). Reported per level: top-1 (the best
region lies ≥ 50 % inside the target) and cIoU of the painted prior (regions with probability > 0.5,
the best one if none) against the target mask.

``--query mllm`` replaces the GRU by the model's own grounding LLM (tiny random Llama over the chat
prompt and answer, the pointer reading the ``[SEG]`` state, optional ``--lm`` loss), with region tokens
from an MLP over the descriptors (``--regions descriptors``) or from the model's projector over the
frozen tower's precomputed features (``--regions projector``): the MLLM path without the pixel side,
free of the collator's and the tower's cost per step, to find which part keeps a pointer from learning.
``--schedule cosine --max-samples N`` reproduces a run whose learning rate decays over N samples.

    python benchmarks/bench_pointer_probe.py --data data/synthref --minutes 5
    python benchmarks/bench_pointer_probe.py --minutes 10 --train 12000 --query mllm --batch 16 --tag x
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import ROOT, machine, shown
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from mllm_ris.config import load_config
from mllm_ris.data.registry import build_dataset
from mllm_ris.modeling.losses import region_coverage
from mllm_ris.modeling.model import RISModel, build_model
from mllm_ris.modeling.predictor import build_processor
from mllm_ris.modeling.projector import (
    RegionPointer,
    VisualTokens,
    descriptor_features,
    paint_regions,
    pointer_loss,
)
from mllm_ris.processing.regions import COLOR_DIM, SHAPE_SIZE, RegionDescriptorBatch, digest

RESULTS = ROOT / "benchmarks" / "results"
MAX_WORDS = 24


def probe_model(cache: Path, overrides: Sequence[str] = ()) -> RISModel:
    """``configs/model/tiny-synth.yaml`` with the pointer (64 wide) and descriptors on, label maps cached
    in ``cache``, plus ``overrides``."""
    cfg = load_config(
        [ROOT / "configs" / "model" / "tiny-synth.yaml"],
        [
            "model.mllm.pointer_dim=64",
            "model.projector.descriptors=true",
            f"model.superpixels.cache_dir={cache}",
            *overrides,
        ],
    )
    return build_model(cfg.model)


def precompute(model: RISModel, data: Path, split: str, n: int, seed: int) -> dict[str, Any]:
    """Descriptors ``(N, Kmax, F)``, region mask ``(N, Kmax)``, coverage ``(N, Kmax)``, word ids ``(N, 24)``,
    label maps ``(N, S, S)``, target masks ``(N, S, S)``, the chat sequences (``ids`` / ``labels``,
    lists of ``(L_i,)``, the training answer included) of ``n`` single-target expressions of ``model``'s
    processing, and its frozen tower's patch features per image (``tower (I, N, Cv)``, ``image (N,)``
    the row of each expression's image)."""
    collate = build_processor(model, image_size=128)
    tokenizer = model.mllm.tokenizer
    dataset = build_dataset("synthref", data, split)
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    keys = ("x", "mask", "cov", "words", "labels", "target", "level", "ids", "lm_labels", "image")
    rows: dict[str, list] = {k: [] for k in keys}
    towers: dict[str, int] = {}  # pixel digest -> row of ``tower``
    tower_rows: list[torch.Tensor] = []
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
        feats = F.pad(descriptor_features(batch.regions, k, torch.float32), (0, 0, 0, kmax - k))
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
            real = batch.attention_mask[i].bool()
            rows["ids"].append(batch.input_ids[i][real])
            rows["lm_labels"].append(batch.labels[i][real])
            key = digest(batch.images[i])
            if key not in towers and model.vision is not None:
                towers[key] = len(tower_rows)
                with torch.no_grad():
                    tower_rows.append(model.tower_features(batch.images[i : i + 1])[0])  # (N, Cv)
            rows["image"].append(torch.tensor(towers.get(key, -1)))
        if len(rows["x"]) >= n:
            break
    out = {k: (v[:n] if k in ("level", "ids", "lm_labels") else torch.stack(v[:n])) for k, v in rows.items()}
    out["vocab"] = len(tokenizer)
    out["tower"] = torch.stack(tower_rows) if tower_rows else None  # (I, N, Cv), None without a tower
    return out


class ProbePointer(nn.Module):
    """GRU sentence query ``(B, 2H)`` + MLP region states ``(B, K, H)`` → ``(B, K)`` logits."""

    def __init__(self, vocab: int, feat_dim: int, layers: int, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.gru = nn.GRU(width, width, batch_first=True, bidirectional=True)
        self.region = nn.Sequential(nn.Linear(feat_dim, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.pointer = RegionPointer(query_dim=2 * width, region_dim=width, dim=width, layers=layers)

    def forward(self, data: dict[str, Any], pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``pick (B,)`` of ``data`` → region logits ``(B, K)`` and an extra loss (0 here)."""
        states, _ = self.gru(self.embed(data["words"][pick]))  # (B, L, 2H)
        query = states.max(1).values  # (B, 2H)
        region = self.region(data["x"][pick])  # (B, K, H)
        logits = self.pointer(query[:, None], region, data["mask"][pick])[:, 0]  # (B, 1, K) -> (B, K)
        return logits, logits.new_zeros(())


class MLLMProbe(nn.Module):
    """The model's own grounding LLM (tiny random Llama, chat template, ``[SEG]`` answer) and its region
    pointer, with region tokens = an MLP over the descriptors alone (no vision tower): the MLLM path
    minus the image side. The extra loss is the LM loss of the answer."""

    def __init__(self, model: RISModel, feat_dim: int, regions: str) -> None:
        super().__init__()
        assert model.mllm is not None and model.projector is not None
        self.mllm = model.mllm
        width = self.mllm.llm.get_input_embeddings().weight.shape[1]
        self.regions = regions
        if regions == "projector":  # the model's own projector over the precomputed tower features
            self.region: nn.Module = model.projector
        else:
            self.region = nn.Sequential(
                nn.Linear(feat_dim, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
            )

    def region_tokens(self, data: dict[str, Any], pick: torch.Tensor) -> VisualTokens:
        """``VisualTokens (B, Kmax, D)`` of rows ``pick (B,)``."""
        mask = data["mask"][pick]  # (B, Kmax)
        if self.regions != "projector":
            return VisualTokens(embeds=self.region(data["x"][pick]) * mask[..., None], mask=mask)
        labels = data["labels"][pick].long()  # (B, S, S) token order
        k = int(labels.max()) + 1
        x = data["x"][pick, :k]  # (B, k, F)
        side = SHAPE_SIZE * SHAPE_SIZE
        desc = RegionDescriptorBatch(
            shape=x[..., :side].unflatten(-1, (SHAPE_SIZE, SHAPE_SIZE)),
            color=x[..., side : side + COLOR_DIM],
            geometry=x[..., side + COLOR_DIM :],
            mask=mask[:, :k],
            num_regions=mask[:, :k].sum(1),
        )
        tower = data["tower"][data["image"][pick]] if data["tower"] is not None else None  # (B, N, Cv)
        vis = self.region(tower, labels, desc)  # (B, k, D)
        return VisualTokens(embeds=F.pad(vis.embeds, (0, 0, 0, mask.shape[1] - k)), mask=mask)

    def forward(self, data: dict[str, Any], pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``pick (B,)`` of ``data`` → region logits ``(B, K)`` and the LM loss."""
        rows = pick.tolist()
        ids = pad_sequence([data["ids"][i] for i in rows], batch_first=True)  # (B, L) right-padded
        labels = pad_sequence([data["lm_labels"][i] for i in rows], batch_first=True, padding_value=-100)
        attn = pad_sequence([torch.ones_like(data["ids"][i]) for i in rows], batch_first=True)
        out = self.mllm(ids, attn, self.region_tokens(data, pick), labels)
        return out.region_logits[:, 0], out.loss  # (B, 1, K) -> (B, K)


def oracle(held: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The superpixel ceiling: :func:`evaluate` of logits that choose exactly the regions ≥ 50 % inside
    the target (the best-covered one if none is)."""
    logits = torch.where(held["cov"] >= 0.5, 10.0, -10.0) + held["cov"]  # (N, K)
    return evaluate(None, held, logits.masked_fill(~held["mask"], -1e4))


def evaluate(
    net: nn.Module | None, held: dict[str, Any], logits: torch.Tensor | None = None
) -> dict[str, dict[str, float]]:
    """Top-1 region accuracy and cIoU of the painted prior per level (and ``all``) of ``net`` (or of
    given ``logits (N, K)``)."""
    if logits is None:
        assert net is not None
        was_training = net.training
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(held, idx)[0] for idx in torch.arange(len(held["x"])).split(128)])
        net.train(was_training)
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
        "--query",
        choices=("gru", "mllm"),
        default="gru",
        help="gru: GRU over the sentence; mllm: the model's grounding LLM over the chat prompt + answer "
        "([SEG] state, its own pointer), region tokens from the descriptors alone",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="--query mllm: model config override"
    )
    parser.add_argument(
        "--regions",
        choices=("descriptors", "projector"),
        default="descriptors",
        help="--query mllm: region tokens from an MLP over the descriptors, or the model's projector "
        "(frozen tower features pooled per region + descriptors)",
    )
    parser.add_argument("--dice", type=float, default=0.0, help="weight of the painted prior's region Dice")
    parser.add_argument("--lm", type=float, default=0.0, help="--query mllm: weight of the answer's LM loss")
    parser.add_argument(
        "--schedule", choices=("constant", "cosine"), default="constant", help="lr over --max-samples"
    )
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--max-samples", type=int, default=None, help="stop after this many samples")
    parser.add_argument(
        "--cache-dir", type=Path, default=ROOT / "runs" / "pointer_probe" / "superpixels", help="label maps"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    overrides = [f"model.mllm.pointer_layers={args.layers}", *args.overrides]
    model = probe_model(args.cache_dir, overrides)
    train = precompute(model, args.data, "train", args.train, args.seed)
    held = precompute(model, args.data, "val", args.held, args.seed)
    prep_s = time.perf_counter() - t0
    if args.schedule == "cosine" and args.max_samples is None:
        parser.error("--schedule cosine needs --max-samples (its horizon)")
    net: nn.Module
    if args.query == "gru":
        net = ProbePointer(train["vocab"], train["x"].shape[-1], args.layers)
    else:
        net = MLLMProbe(model, train["x"].shape[-1], args.regions)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr)
    total_steps = -(-args.max_samples // args.batch) if args.max_samples else None
    n = len(train["x"])
    curve, step, t0, seen = [], 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < args.minutes * 60 and (total_steps is None or step < total_steps):
        if args.schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
        pick = torch.randint(0, n, (args.batch,))
        logits, lm_loss = net(train, pick)
        target = (train["cov"][pick] >= 0.5).float()
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=train["mask"][pick].float())
        if args.dice:  # the model's region Dice of the painted prior
            _, dice = pointer_loss(
                logits[:, None],
                target[:, None],
                train["mask"][pick],
                torch.ones(len(pick), 1, dtype=torch.bool),
                train["labels"][pick].long(),
                train["target"][pick][:, None],
                bce_weight=0.0,
                dice_weight=args.dice,
            )
            loss = loss + dice
        loss = loss + args.lm * lm_loss
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
        "query": args.query,
        "overrides": args.overrides,
        "lm_weight": args.lm,
        "dice_weight": args.dice,
        "schedule": args.schedule,
        "regions": args.regions,
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
        f"--batch {args.batch} --lr {args.lr:g} --threads {args.threads} --seed {args.seed} "
        f"--query {args.query} --regions {args.regions} --lm {args.lm:g} --dice {args.dice:g} "
        f"--schedule {args.schedule}"
        + (f" --max-samples {args.max_samples}" if args.max_samples else "")
        + "".join(f" --set {o}" for o in args.overrides),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    name = f"pointer_probe_L{args.layers}_b{args.batch}"
    if args.query != "gru" or args.schedule != "constant" or args.tag:
        name += f"_{args.query}_{args.schedule}" + (f"_{args.tag}" if args.tag else "")
    path = args.results / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(final), f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
