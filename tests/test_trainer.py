"""The model-agnostic trainer in one process: exact resume, NaN / inf steps, signals, interrupted writes.

Most tests use a toy task (an MLP with dropout, so resume must restore the RNG too); the classic
model runs the "10 steps == 5 + resume 5" check the issue asks for.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

from mllm_ris.config import Config, load_config
from mllm_ris.errors import CheckpointError
from mllm_ris.training.checkpoint import CheckpointManager, read_trainer_state
from mllm_ris.training.faults import NonFiniteLossError, StopSignals
from mllm_ris.training.optim import lr_factor
from mllm_ris.training.ris_task import RISTask
from mllm_ris.training.task import TrainTask
from mllm_ris.training.trainer import Trainer, train_classic

TINY_CLASSIC = [
    "model.text.init=random",
    "model.text.dim=16",
    "model.pixel.cnn_widths=[8, 8, 16, 16]",
    "model.head.dim=16",
    "model.head.num_heads=2",
    "data.image_size=32",
]


class ToyTask:
    """Regression with an MLP (dropout: training uses the torch RNG). ``bad_calls`` poison the loss."""

    name = "toy"

    def __init__(
        self, *, bad_calls: frozenset[int] = frozenset(), kind: str = "loss", hook: Callable | None = None
    ):
        self.calls = 0
        self.bad_calls = bad_calls
        self.kind = kind
        self.hook = hook
        self.snapshots: dict[int, list[torch.Tensor]] = {}

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def train_data(self) -> tuple[TensorDataset, torch.Tensor]:
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
        return TensorDataset(x, x.sum(1, keepdim=True)), torch.linspace(1, 2, 32)

    def collate(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    def loss(self, model: nn.Module, batch: tuple) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        self.calls += 1
        self.snapshots[self.calls] = [p.detach().clone() for p in model.parameters()]
        if self.hook is not None:
            self.hook(self.calls)
        x, y = batch
        loss = F.mse_loss(model(x), y)
        if self.calls in self.bad_calls:
            if self.kind == "loss":
                loss = loss * float("nan")
            else:  # finite loss, NaN gradient: d sqrt(u) / du is inf at u = 0
                loss = loss + torch.sqrt((next(model.parameters()) * 0).sum())
        return loss, {"mse": loss.detach()}

    def val_data(self) -> dict:
        return {}

    def predictor(self, model: nn.Module, device: torch.device):
        raise AssertionError("no validation data")

    def save_model(self, model: nn.Module, out_dir: Path, config: dict) -> Path:
        path = out_dir / "toy.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path


def _cfg(out: Path, *extra: str) -> Config:
    return load_config(
        None,
        [
            "train.batch_size=4",
            "train.max_steps=10",
            "train.lr=0.01",
            "train.log_every=1",
            "train.tensorboard=false",
            f"train.output_dir={out}",
            *extra,
        ],
    )


def _steps_logged(out: Path) -> list[int]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


def test_toy_task_fits_the_protocol() -> None:
    assert isinstance(ToyTask(), TrainTask) and isinstance(RISTask(load_config(None)), TrainTask)


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_continues_the_identical_loss_curve(tmp_path: Path, accum: int) -> None:
    extra = (f"train.grad_accum_steps={accum}", "train.warmup_steps=2")
    full = Trainer(_cfg(tmp_path / "a", *extra), ToyTask(), progress=False).fit()
    first = Trainer(_cfg(tmp_path / "b", *extra), ToyTask(), progress=False).fit(stop_at_step=5)
    assert (first.steps, first.checkpoint) == (5, str(tmp_path / "b" / "checkpoints" / "step_000005"))
    rest = Trainer(_cfg(tmp_path / "b", *extra), ToyTask(), progress=False).fit(resume="auto")
    assert (rest.start_step, rest.steps, rest.samples) == (5, 10, 5 * 4 * accum)
    assert first.losses + rest.losses == full.losses  # bit-identical: data order, RNG, optimizer, LR
    a, b = (
        load_file(str(tmp_path / "a" / "toy.safetensors")),
        load_file(str(tmp_path / "b" / "toy.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _steps_logged(tmp_path / "b") == list(range(1, 11))


def test_resume_with_more_steps_follows_the_configs_schedule(tmp_path: Path) -> None:
    """Extending a finished cosine run (max_steps 10 -> 20) restarts from the new schedule, not at lr 0."""
    extra = ("train.warmup_steps=2", "train.lr_schedule=cosine")
    Trainer(_cfg(tmp_path, *extra), ToyTask(), progress=False).fit()
    Trainer(_cfg(tmp_path, *extra, "train.max_steps=20"), ToyTask(), progress=False).fit(resume="auto")
    lrs = {
        r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "train_log.jsonl").read_text().splitlines())
    }
    assert lrs[10] == pytest.approx(0.0, abs=1e-9)
    assert lrs[11] == pytest.approx(0.01 * lr_factor(11, warmup=2, total=20, kind="cosine"))
    assert lrs[11] > 0.001


def test_keep_config_schedule_reports_the_checkpoints_own_schedule() -> None:
    """The note a resume prints names the checkpoint's schedule (lr included), not the new one's."""
    from torch.optim.lr_scheduler import LambdaLR

    from mllm_ris.training.optim import keep_config_schedule, schedule_of

    old = load_config(None, ["train.lr=0.01", "train.max_steps=10", "train.warmup_steps=2"]).train
    new = load_config(None, ["train.lr=0.02", "train.max_steps=20", "train.warmup_steps=2"]).train
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=old.lr)
    scheduler = LambdaLR(opt, schedule_of(old))
    assert keep_config_schedule(scheduler, old) is None
    note = keep_config_schedule(scheduler, new)
    assert note is not None and note["lr"] == 0.01 and note["total"] == 10
    assert keep_config_schedule(scheduler, new) is None and scheduler.base_lrs == [0.02]


@pytest.mark.parametrize(("kind", "what"), [("loss", "loss was NaN"), ("grad", "gradient norm was NaN")])
def test_non_finite_step_is_skipped_and_counted(tmp_path: Path, kind: str, what: str) -> None:
    task = ToyTask(bad_calls=frozenset({3, 4}) if kind == "loss" else frozenset({3}), kind=kind)
    summary = Trainer(_cfg(tmp_path, "train.max_steps=6"), task, progress=False).fit()
    bad = [i + 1 for i, x in enumerate(summary.losses) if x != x]
    assert bad == ([3, 4] if kind == "loss" else [3]) and summary.bad_steps == len(bad)
    after_skips = 5 if kind == "loss" else 4
    assert all(torch.equal(p, q) for p, q in zip(task.snapshots[3], task.snapshots[after_skips], strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(task.snapshots[2], task.snapshots[3], strict=True))
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "skipped" in r] == bad and what in records[2]["skipped"]
    assert json.loads((tmp_path / "summary.json").read_text())["bad_steps"] == len(bad)


def test_step_flags_and_results_are_typed() -> None:
    """A micro-batch's flags are named counts (summed field by field over ranks); the step result
    carries a SkipReason and a signal.Signals, not strings."""
    from dataclasses import fields
    from signal import Signals

    from mllm_ris.training.faults import SkipReason
    from mllm_ris.training.trainer import StepFlags, StepResult

    nan = StepFlags.of_rank(torch.tensor(float("nan")), Signals.SIGTERM, late=False)
    assert (nan.loss, nan.non_finite, nan.sigint, nan.sigterm, nan.over_budget) == (0.0, 1.0, 0.0, 1.0, 0.0)
    ok = StepFlags.of_rank(torch.tensor(2.5), Signals.SIGINT, late=True)
    assert (ok.loss, ok.non_finite, ok.sigint, ok.over_budget) == (2.5, 0.0, 1.0, 1.0)
    assert (nan.stop, ok.stop, StepFlags().stop) == (Signals.SIGTERM, Signals.SIGINT, None)

    class TwoRanks:  # accelerate's reduce over two ranks that report the same flags
        device = torch.device("cpu")

        def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
            assert reduction == "sum" and tensor.dtype == torch.float64
            return tensor * 2

    total = ok.summed(TwoRanks())  # type: ignore[arg-type]
    assert total == StepFlags(loss=5.0, non_finite=0.0, sigint=2.0, sigterm=0.0, over_budget=2.0)
    assert str(SkipReason.NON_FINITE_LOSS) == "loss was NaN / inf"  # what logs and errors show
    types = {f.name: f.type for f in fields(StepResult)}
    assert types["bad"] == "SkipReason | None" and types["signal"] == "Signals | None"


def test_consecutive_bad_steps_abort_with_a_clear_message(tmp_path: Path) -> None:
    task = ToyTask(bad_calls=frozenset(range(3, 100)))
    trainer = Trainer(_cfg(tmp_path, "train.max_bad_steps=3", "train.save_every=2"), task, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row \(steps 3-5.*step_000004"):
        trainer.fit()
    assert CheckpointManager(tmp_path, keep_last=2).latest() == tmp_path / "checkpoints" / "step_000004"


def test_sigterm_saves_at_the_end_of_the_step_then_resume(tmp_path: Path) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    hook = lambda call: call == 4 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    summary = Trainer(_cfg(tmp_path), ToyTask(hook=hook), progress=False).fit()
    assert (summary.interrupted, summary.steps) == ("SIGTERM", 4)
    assert read_trainer_state(summary.checkpoint).step == 4
    assert not (tmp_path / "toy.safetensors").exists()  # interrupted: no export, no evaluation
    assert signal.getsignal(signal.SIGTERM) is previous
    resumed = Trainer(_cfg(tmp_path), ToyTask(), progress=False).fit(resume="auto")
    assert (resumed.start_step, resumed.steps, resumed.interrupted) == (4, 10, None)


def test_second_sigint_stops_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def hook(call: int) -> None:
        if call == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C via torchrun: still a clean stop

    summary = Trainer(_cfg(tmp_path / "a"), ToyTask(hook=hook), progress=False).fit()
    assert (summary.interrupted, summary.steps) == ("SIGINT", 2)
    monkeypatch.setattr(StopSignals, "repeat_after_s", 0.0)  # a later second Ctrl-C: stop now
    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(tmp_path / "b"), ToyTask(hook=hook), progress=False).fit()


def test_interrupted_checkpoint_write_leaves_the_previous_one_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = Accelerator.save_state
    calls = []

    def failing_save(self: Accelerator, output_dir: str, **kwargs: object) -> object:
        calls.append(output_dir)
        if len(calls) == 2:  # half-written: one file, then the disk fills up
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", failing_save)
    with pytest.raises(OSError, match="No space left"):
        Trainer(_cfg(tmp_path, "train.save_every=2"), ToyTask(), progress=False).fit()
    root = tmp_path / "checkpoints"
    assert (root / "step_000004.tmp" / "model.safetensors").is_file()
    assert (root / "latest").read_text().strip() == "step_000002"
    assert read_trainer_state(root / "step_000002").step == 2
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    resumed = Trainer(_cfg(tmp_path, "train.save_every=2"), ToyTask(), progress=False).fit(resume="auto")
    assert (resumed.start_step, resumed.steps) == (2, 10)
    assert not (root / "step_000004.tmp").exists() and (root / "latest").read_text().strip() == "step_000010"


class FrozenFirstLayer(ToyTask):
    """The first layer is frozen and "loaded from its own files" (deterministic init here)."""

    def build_model(self) -> nn.Module:
        model = super().build_model()
        torch.manual_seed(1)
        model[0].reset_parameters()
        model[0].requires_grad_(False)
        return model

    def external_weights(self, model: nn.Module) -> set[str]:
        return {"0.weight", "0.bias"}


def test_external_weights_stay_out_of_checkpoints(tmp_path: Path) -> None:
    full = Trainer(_cfg(tmp_path / "a", "train.max_steps=4"), FrozenFirstLayer(), progress=False).fit()
    cfg = _cfg(tmp_path / "b", "train.max_steps=4")
    first = Trainer(cfg, FrozenFirstLayer(), progress=False).fit(stop_at_step=2)
    keys = set(load_file(str(Path(first.checkpoint) / "model.safetensors")))
    assert keys == {"3.weight", "3.bias"}
    rest = Trainer(cfg, FrozenFirstLayer(), progress=False).fit(resume="auto")
    assert first.losses + rest.losses == full.losses
    with pytest.raises(CheckpointError, match=r"1 missing keys \(e\.g\. \['3\.bias'\]\)"):
        save_file({"3.weight": torch.zeros(1, 16)}, str(Path(rest.checkpoint) / "model.safetensors"))
        Trainer(cfg, FrozenFirstLayer(), progress=False).fit(resume="auto")


def test_fresh_run_refuses_a_folder_with_checkpoints_and_time_budget_stops(tmp_path: Path) -> None:
    summary = Trainer(_cfg(tmp_path), ToyTask(), progress=False).fit(time_budget_s=1e-9)
    assert summary.steps == 1 and summary.interrupted is None  # a budget stop still exports
    assert (tmp_path / "toy.safetensors").is_file() and summary.checkpoint is not None
    with pytest.raises(CheckpointError, match="--resume auto"):
        Trainer(_cfg(tmp_path), ToyTask(), progress=False).fit()


def test_classic_10_steps_equal_5_plus_resumed_5(tmp_path: Path, synthref: Path) -> None:
    def cfg(out: str, *extra: str) -> Config:
        return load_config(
            None,
            [
                *TINY_CLASSIC,
                f"data.train.0.root={synthref}",
                "train.max_steps=10",
                "train.batch_size=2",
                "train.lr=1e-3",
                "train.tensorboard=false",
                f"train.output_dir={tmp_path / out}",
                *extra,
            ],
        )

    # the uninterrupted run also evaluates at step 5: evaluation must not disturb the curve
    val = (
        f"data.val=[{{name: synthref, root: {synthref}, split: val}}]",
        "eval.limit=4",
        "train.eval_every=5",
    )
    full = train_classic(cfg("a", *val), progress=False)
    first = Trainer(cfg("b"), RISTask(cfg("b")), progress=False).fit(stop_at_step=5)
    rest = Trainer(cfg("b"), RISTask(cfg("b")), progress=False).fit(resume="auto")
    assert rest.start_step == 5 and first.losses + rest.losses == full.losses
    assert (tmp_path / "a" / "eval" / "step_000005" / "synthref_val" / "metrics.json").is_file()
    again = train_classic(cfg("a", "train.max_steps=2"), progress=False)  # bench_heads re-runs a folder
    assert again.steps == 2 and [s for s, _ in CheckpointManager(tmp_path / "a", keep_last=2).complete()] == [
        2
    ]
