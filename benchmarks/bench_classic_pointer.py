"""Why the classic region pointer learns slowly: its learning curve on precomputed inputs, per variant.

The classic pointer (``configs/model/tiny-synth-classic[-pointer].yaml``: frozen MiniLM, region tokens
from superpixel descriptors, two mixing layers, masks = union of the chosen superpixels) reaches
45.6 % cIoU on SynthRef val after 20 minutes of training (``bench_mllm.py --model classic-pointer``).
This script asks what limits it, at a fixed number of *samples* rather than minutes:

``prepare`` runs the project's processor once over a SynthRef split (letterbox, SLIC, descriptors,
region labels in token order, the union target) and the frozen MiniLM over every sentence, and
saves the tensors. ``train`` then trains the same model parts (``text_encoder`` projections,
``projector.desc_mlp``, ``pointer``; built by :class:`~mllm_ris.training.ris_task.RISTask` from the
same configs) with the same losses (:func:`~mllm_ris.modeling.losses.region_losses` under the
config's ``model.loss``: region BCE + Dice of the painted prior, targets = regions at least
``region_threshold`` inside the target) and evaluates the painted
masks on the prepared val split every ``--eval-every`` samples: cIoU per difficulty, overall cIoU,
N-acc (empty mask for a negative) and the overall cIoU on 800 training samples (over- or
under-fitting). Nothing is decoded or re-read per step, so a run sees ~3.5x the samples per second
of the full training loop; the cIoU is on the 128-pixel canvas (the full loop's eval resizes to the
image, the same size for SynthRef).

    python benchmarks/bench_classic_pointer.py prepare --data data/synthref --split train \
        --out runs/cp/train.pt
    python benchmarks/bench_classic_pointer.py prepare --data data/synthref --split val --limit 800 \
        --out runs/cp/val.pt
    python benchmarks/bench_classic_pointer.py train base --train runs/cp/train.pt --val runs/cp/val.pt
    python benchmarks/bench_classic_pointer.py train lr3 --train runs/cp/train.pt --val runs/cp/val.pt \
        --lr 3e-3
    python benchmarks/bench_classic_pointer.py train conv --train runs/cp/train.pt --val runs/cp/val.pt \
        --set model.projector.descriptor_encoder=conv

Model options go through ``--set`` (the shape CNN above; ``model.projector.image_encoder=cnn``: a CNN
over the image pooled per region; ``model.pointer.presence=true``: "no target"
from the pointer's presence logit, the regions trained on targeted expressions only).

Results: one JSON line per evaluation on stdout, and ``--results DIR/classic_pointer_<name>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, machine
from torch import nn
from torch.nn import functional as F

from mllm_ris.config import Config, load_config
from mllm_ris.modeling.losses import region_coverage, region_losses
from mllm_ris.modeling.projector import descriptor_features, paint_regions
from mllm_ris.training.ris_task import RISTask

CONFIGS = [
    ROOT / "configs" / "model" / "tiny-synth-classic.yaml",
    ROOT / "configs" / "model" / "tiny-synth-classic-pointer.yaml",
    ROOT / "configs" / "train" / "synthref-classic-pointer.yaml",
]
Prepared = dict[str, Any]
# desc [(K_i, F)], labels [(S, S) int16], target [(S, S) bool], image [(3, S, S) uint8], text, diff, hidden


def build(data: Path, overrides: list[str], out: Path) -> tuple[Config, RISTask]:
    """The classic-pointer config on ``data`` (train and val roots) and its task."""
    cfg = load_config(
        CONFIGS,
        [f"data.train.0.root={data}", f"data.val.0.root={data}", f"train.output_dir={out}", *overrides],
    )
    return cfg, RISTask(cfg)


def prepare(args: argparse.Namespace) -> None:
    """Collate ``--split`` through the project's processor and save what the pointer reads."""
    torch.set_num_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _, task = build(
        args.data, [f"model.superpixels.cache_dir={args.out.parent / 'superpixels'}"], args.out.parent
    )
    model = task.build_model()
    dataset = task.train_data()[0] if args.split == "train" else next(iter(task.val_data().values()))
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    out: Prepared = {"desc": [], "labels": [], "target": [], "text": [], "diff": [], "image": []}
    t0 = time.perf_counter()
    for start in range(0, n, 64):
        samples = [dataset[j] for j in range(start, min(n, start + 64))]
        batch = task.collate(samples)
        labels = model.projector.region_labels(batch.superpixels)  # (B, S, S), -1 = no region
        feats = descriptor_features(batch.regions, batch.regions.shape.shape[1], torch.float32)  # (B, K, F)
        for j in range(len(samples)):
            k = int(batch.regions.mask[j].sum())
            out["desc"].append(feats[j, :k].clone())
            out["labels"].append(labels[j].to(torch.int16).clone())  # ids up to max_regions
            out["target"].append(batch.targets[j].bool().clone())
            out["image"].append((batch.images[j] * 255).round().to(torch.uint8).clone())  # (3, S, S)
            out["text"].append(batch.texts[j])
            out["diff"].append(batch.difficulty[j])
        print(
            f"{args.split}: {min(n, start + 64)} / {n} samples, {time.perf_counter() - t0:.0f} s", flush=True
        )
    texts = sorted(set(out["text"]))
    hidden: dict[str, torch.Tensor] = {}
    for start in range(0, len(texts), 256):  # the frozen MiniLM's states, (L_i, 384) per sentence
        chunk = texts[start : start + 256]
        batch = model.text_encoder.tokenize(chunk)
        with torch.no_grad():  # the states TextEncoder.encode projects
            states = model.text_encoder.model(**batch).last_hidden_state  # (N, L, H)
        mask = batch["attention_mask"].bool()
        hidden |= {t: h[m].clone() for t, h, m in zip(chunk, states, mask, strict=True)}
    out["hidden"] = hidden
    torch.save(out, args.out)
    print(f"wrote {args.out}: {n} samples, {len(texts)} sentences, {time.perf_counter() - t0:.0f} s")


class GRUText(nn.Module):
    """A from-scratch text side (``--text gru``): word embeddings + a bidirectional GRU, ``dim`` wide.

    ``texts`` → words ``(B, L, dim)``, word mask ``(B, L)``, sentence query ``(B, 1, dim)``.
    """

    def __init__(self, tokenizer: Any, dim: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.ids: dict[str, torch.Tensor] = {}
        self.embed = nn.Embedding(len(tokenizer), 64)
        self.gru = nn.GRU(64, dim // 2, batch_first=True, bidirectional=True)
        self.query = nn.Linear(dim, dim)

    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        for t in texts:
            if t not in self.ids:
                self.ids[t] = torch.tensor(self.tokenizer(t)["input_ids"])
        ids = [self.ids[t] for t in texts]
        x = nn.utils.rnn.pad_sequence(ids, batch_first=True)  # (B, L)
        mask = torch.arange(x.shape[1])[None] < torch.tensor([len(i) for i in ids])[:, None]  # (B, L)
        words = self.gru(self.embed(x))[0] * mask[..., None]  # (B, L, dim)
        query = self.query(words.sum(1) / mask.sum(1, keepdim=True))  # (B, dim)
        return words, mask, query[:, None]


class Detach(nn.Module):
    """``--presence-detach``: the identity forward, no gradient backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


class Runner:
    """The model parts, optimiser and the prepared data of one ``train`` run."""

    def __init__(self, args: argparse.Namespace) -> None:
        cfg, task = build(args.data, args.set, Path(args.results) / "runs")
        self.args = args
        self.loss_cfg = dataclasses.replace(cfg.model.loss, region_dice=args.dice)  # the model's losses
        self.model = task.build_model().train()
        self.train_data: Prepared = torch.load(args.train)
        self.val_data: Prepared = torch.load(args.val)
        if args.norm:  # standardise every descriptor feature with the training set's statistics
            feats = torch.cat(self.train_data["desc"][:20000])
            mean, std = feats.mean(0), feats.std(0).clamp_min(1e-2)
            for d in (self.train_data, self.val_data):
                d["desc"] = [(x - mean) / std for x in d["desc"]]
        self.gru = (
            GRUText(self.model.text_encoder.tokenizer, self.model.text_encoder.dim)
            if args.text == "gru"
            else None
        )
        if self.gru is not None:
            self.model.add_module("gru_text", self.gru)
        # --presence: "no target" decided apart from the regions, from their detached (max, logsumexp)
        self.presence = nn.Linear(2, 1) if args.presence else None
        if self.presence is not None:
            self.model.add_module("presence", self.presence)
        if args.presence_detach:  # the presence head reads the mixed states, its loss stops there
            self.model.pointer.presence.insert(0, Detach())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.0)
        steps = args.samples // args.batch
        # bench_mllm's warm-up length; a linear warm-up factor times a cosine to 0 over the whole run
        # (close to, not the same as, training/optim.py's lr_factor: the recorded curves used this one)
        warm = min(100, max(1, steps // 10))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
        )

    @staticmethod
    def batch(d: Prepared, idx: list[int]) -> tuple[torch.Tensor, ...]:
        """Padded ``hidden (B, L, H)``, ``word_mask (B, L)``, ``desc (B, K, F)``, ``region_mask (B, K)``,
        ``labels (B, S, S)`` long and ``target (B, 1, S, S)`` float of the samples ``idx``."""
        hs = [d["hidden"][d["text"][i]] for i in idx]
        hidden = nn.utils.rnn.pad_sequence(hs, batch_first=True)
        word_mask = (torch.arange(hidden.shape[1])[None] < torch.tensor([len(h) for h in hs])[:, None]).long()
        ds = [d["desc"][i] for i in idx]
        desc = nn.utils.rnn.pad_sequence(ds, batch_first=True)
        region_mask = torch.arange(desc.shape[1])[None] < torch.tensor([len(x) for x in ds])[:, None]
        labels = torch.stack([d["labels"][i] for i in idx]).long()
        target = torch.stack([d["target"][i] for i in idx]).float()[:, None]
        return hidden, word_mask, desc, region_mask, labels, target

    def logits(
        self,
        d: Prepared,
        idx: list[int],
        hidden: torch.Tensor,
        word_mask: torch.Tensor,
        desc: torch.Tensor,
        region_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, 1, K)`` region logits and (``model.pointer.presence``) ``(B, 1)`` presence logits: the
        model's projections and pointer on the prepared inputs (``labels (B, S, S)``: token order)."""
        projector, images = self.model.projector, None
        if projector.image_cnn is not None:  # the image's CNN features averaged over each region
            if "image" not in d:
                raise SystemExit("model.projector.image_encoder: re-run prepare (this file has no images)")
            images = torch.stack([d["image"][i] for i in idx]).float() / 255  # (B, 3, S, S)
        regions = projector.encode_regions(desc, labels, images) * region_mask[..., None]  # (B, K, D)
        if self.gru is not None:
            words, mask, query = self.gru([d["text"][i] for i in idx])
            return self.model.pointer.scores(query, regions, region_mask, words=words, word_mask=mask)
        lang = self.model.text_encoder(None, word_mask, hidden=hidden)
        return self.model.pointer.scores(
            lang.queries, regions, region_mask, words=lang.tokens, word_mask=lang.mask
        )

    @torch.no_grad()
    def evaluate(self, d: Prepared, limit: int | None = None) -> dict[str, float | None]:
        """cIoU per difficulty and overall (targeted samples), N-acc (negatives), in %."""
        self.model.eval()
        stats: dict[str, list[int]] = {}  # difficulty -> [intersection, union, empty predictions, samples]
        n = len(d["text"]) if limit is None else min(limit, len(d["text"]))
        for start in range(0, n, 100):
            idx = list(range(start, min(n, start + 100)))
            hidden, word_mask, desc, region_mask, labels, target = self.batch(d, idx)
            logits, found = self.logits(d, idx, hidden, word_mask, desc, region_mask, labels)  # (B, 1, K)
            pred = paint_regions(logits, labels)[:, 0] > 0  # (B, S, S)
            if self.presence is not None:  # no target: an empty mask whatever the regions score
                pred &= (self.presence_logit(logits, region_mask) > 0)[:, None, None]
            if found is not None:  # the presence logit can veto the regions (TextQueries.prior_masks)
                pred &= (found[:, 0] > 0)[:, None, None]
            for j, i in enumerate(idx):
                s = stats.setdefault(d["diff"][i] or "none", [0, 0, 0, 0])
                gt = target[j, 0] > 0
                s[0] += int((pred[j] & gt).sum())
                s[1] += int((pred[j] | gt).sum())
                s[2] += int(not pred[j].any())
                s[3] += 1
        self.model.train()
        pos = {k: v for k, v in stats.items() if k != "negative"}
        out: dict[str, float | None] = {k: round(100 * v[0] / max(v[1], 1), 1) for k, v in pos.items()}
        inter, union = sum(v[0] for v in pos.values()), sum(v[1] for v in pos.values())
        out["overall"] = round(100 * inter / max(union, 1), 1)
        neg = stats.get("negative")
        out["N-acc"] = round(100 * neg[2] / neg[3], 1) if neg else None
        return out

    def presence_logit(self, logits: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """``(B,)`` "something is named" logit of ``--presence`` from the ``(B, 1, K)`` region logits."""
        assert self.presence is not None
        masked = logits[:, 0].masked_fill(~region_mask, float("-inf"))  # (B, K)
        feats = torch.stack([masked.amax(-1), torch.logsumexp(masked, -1)], -1)  # (B, 2)
        return self.presence(feats).squeeze(-1)

    def step(self, idx: list[int]) -> float:
        """One optimiser step on the training samples ``idx``; returns the loss."""
        d = self.train_data
        hidden, word_mask, desc, region_mask, labels, target = self.batch(d, idx)
        logits, found = self.logits(d, idx, hidden, word_mask, desc, region_mask, labels)  # (B, 1, K)
        valid = torch.ones(len(idx), 1, dtype=torch.bool)  # a negative's regions are all negatives
        has = target.flatten(1).amax(1) > 0  # (B,) the sentence names something
        if self.presence is not None or found is not None:  # regions learn from the positives only
            valid = has[:, None]
        terms = region_losses(logits, region_mask, labels, target, valid, self.loss_cfg)
        loss = terms["region_bce"] + terms["region_dice"]
        if found is not None:
            loss = loss + self.loss_cfg.no_target * F.binary_cross_entropy_with_logits(
                found[:, 0], has.float()
            )
        if self.presence is not None:
            presence = self.presence_logit(logits.detach(), region_mask)
            loss = loss + F.binary_cross_entropy_with_logits(presence, has.float())
        if self.args.ce:  # softmax over the regions: -log of the probability mass on the target's
            region_targets = (
                region_coverage(labels, target, logits.shape[-1]) >= self.loss_cfg.region_threshold
            )
            pos = region_targets[:, 0].sum(-1) > 0  # (B,)
            if bool(pos.any()):
                log_p = torch.log_softmax(logits[:, 0].float(), -1).masked_fill(~region_targets[:, 0], -1e4)
                loss = loss + self.args.ce * -torch.logsumexp(log_p, -1)[pos].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        return loss.item()


def train(args: argparse.Namespace) -> None:
    """Train one variant for ``--samples`` and evaluate every ``--eval-every`` samples."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    run = Runner(args)
    d = run.train_data
    pool = [i for i, diff in enumerate(d["diff"]) if args.only is None or diff in args.only.split(",")]
    order: list[int] = []
    seen, losses, records, t0 = 0, [], [], time.perf_counter()
    steps = args.samples // args.batch
    for step in range(steps):
        if len(order) < args.batch:  # epochs of the pool in a fresh random order
            order += random.sample(pool, len(pool))
        idx, order = order[: args.batch], order[args.batch :]
        loss = run.step(idx)
        seen += len(idx)
        if step % 500 == 0:
            losses.append(loss)
        if seen % args.eval_every < args.batch or step == steps - 1:
            rec: dict[str, Any] = run.evaluate(run.val_data)
            rec["train"] = run.evaluate(d, limit=800)["overall"]
            rec |= {
                "samples": seen,
                "seconds": round(time.perf_counter() - t0),
                "loss": round(sum(losses[-5:]) / len(losses[-5:]), 3),
            }
            records.append(rec)
            print(args.name, json.dumps(rec), flush=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    shown_args = [a for i, a in enumerate(args.argv) if "--results" not in args.argv[max(i - 1, 0) : i + 1]]
    # where it wrote is not part of the command shown
    command = "python benchmarks/bench_classic_pointer.py train " + " ".join(shown_args)
    payload = {"name": args.name, "command": command, "machine": machine(), "curve": records}
    (results / f"classic_pointer_{args.name}.json").write_text(json.dumps(payload, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="precompute the pointer's inputs of one split")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "synthref")
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--limit", type=int, default=None, help="first N samples (val: the eval's 800)")
    p.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("train", help="train one variant on prepared inputs")
    t.add_argument("name")
    t.add_argument("--train", type=Path, required=True)
    t.add_argument("--val", type=Path, required=True)
    t.add_argument("--data", type=Path, default=ROOT / "data" / "synthref", help="for the config only")
    t.add_argument("--samples", type=int, default=100_000)
    t.add_argument("--eval-every", type=int, default=25_000)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--norm", action="store_true", help="standardise the descriptor features")
    t.add_argument("--dice", type=float, default=1.0, help="weight of the painted prior's Dice")
    t.add_argument("--ce", type=float, default=0.0, help="weight of a softmax-over-regions loss")
    t.add_argument("--presence", action="store_true", help="no-target decided apart; regions on positives")
    t.add_argument(
        "--presence-detach",
        action="store_true",
        help="with model.pointer.presence=true: its loss does not reach the mixing layers",
    )
    t.add_argument("--only", default=None, help="train on these difficulties only (comma-separated)")
    t.add_argument("--text", choices=("minilm", "gru"), default="minilm", help="gru: text side from scratch")
    t.add_argument("--set", action="append", default=[], help="config override, e.g. model.pointer.layers=4")
    t.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    args.argv = (sys.argv[1:] if argv is None else argv)[1:]  # the command line after ``train``
    prepare(args) if args.cmd == "prepare" else train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
