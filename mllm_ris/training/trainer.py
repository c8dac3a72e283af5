"""The model-agnostic trainer: accelerate (single process, DDP, DeepSpeed ZeRO) around a task.

One loop for every model family (:class:`~mllm_ris.training.task.TrainTask`): weighted dataset
mixing, mixed precision and gradient accumulation through :class:`accelerate.Accelerator`,
evaluation every ``train.eval_every`` steps, atomic checkpoints every ``train.save_every`` steps,
exact resume, NaN / inf steps skipped and counted, SIGTERM / SIGINT saved and exited. The
distribution strategy comes from the accelerate config the run was launched with
(``configs/accelerate/``); see docs/training.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from signal import Signals
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    broadcast_object_list,
    gather_object,
    send_to_device,
    set_seed,
)

from mllm_ris.config import Config, config_to_dict
from mllm_ris.errors import CheckpointError, ConfigError
from mllm_ris.eval.evaluate import EvalReport, evaluate
from mllm_ris.modeling.model_io import is_pixel_side
from mllm_ris.training._runtime import (
    bare_model,
    fill_deepspeed_auto,
    hf_zero3_init_off,
    launch_kwargs,
    param_digest,
    register_zero3_external_parameters,
    rng_preserved,
)
from mllm_ris.training.checkpoint import (
    CheckpointManager,
    TrainerState,
    check_external_only_missing,
    read_trainer_state,
    resolve_start,
    saved_keys,
)
from mllm_ris.training.faults import BadStepGuard, SkipReason, StopSignals
from mllm_ris.training.optim import build_optimizer, build_scheduler, keep_config_schedule
from mllm_ris.training.ris_task import RISTask, resolve_refine
from mllm_ris.training.sampling import mixture_loader
from mllm_ris.training.summary import TrainSummary
from mllm_ris.training.task import TrainTask
from mllm_ris.training.tracking import RunLog, tensorboard_wanted

__all__ = ["TrainSummary", "Trainer", "train", "train_classic"]


@dataclass
class StepFlags:
    """What one micro-batch reports to every rank: counts, summed over ranks by one all-reduce
    (:meth:`summed`; a float64 tensor with one element per field)."""

    loss: float = 0.0  # this rank's loss (0 when not finite)
    non_finite: float = 0.0  # ranks whose loss was NaN / inf
    sigint: float = 0.0  # ranks that received SIGINT
    sigterm: float = 0.0  # ranks that received SIGTERM
    over_budget: float = 0.0  # 1 when rank 0's clock passed the time budget

    @classmethod
    def of_rank(cls, loss: torch.Tensor, received: Signals | None, late: bool) -> StepFlags:
        """This rank's flags: its ``loss``, the stop signal it ``received``, whether it is ``late``."""
        finite = bool(torch.isfinite(loss.detach()).all())
        return cls(
            loss=float(loss.detach().float()) if finite else 0.0,
            non_finite=0.0 if finite else 1.0,
            sigint=float(received == Signals.SIGINT),
            sigterm=float(received == Signals.SIGTERM),
            over_budget=float(late),
        )

    def summed(self, accelerator: Accelerator) -> StepFlags:
        """Every field summed over the ranks (a collective: every rank calls it)."""
        names = [f.name for f in fields(self)]
        local = torch.tensor(
            [getattr(self, n) for n in names], dtype=torch.float64, device=accelerator.device
        )
        total = accelerator.reduce(local, reduction="sum").tolist()
        return StepFlags(**dict(zip(names, total, strict=True)))

    @property
    def stop(self) -> Signals | None:
        """The signal that stops the run: SIGINT when a rank got one, else SIGTERM, else None."""
        if self.sigint > 0:
            return Signals.SIGINT
        return Signals.SIGTERM if self.sigterm > 0 else None


@dataclass
class StepResult:
    """One optimizer step, as the trainer logs and acts on it.

    Attributes:
        loss: mean loss over the accumulated micro-batches and ranks; NaN for a skipped step.
        terms: the task's named loss terms, averaged over micro-batches.
        bad: why the step was skipped (a NaN / inf loss or gradient norm), else None.
        grad_norm: the gradient norm before clipping, when computed.
        signal: ``Signals.SIGINT`` / ``Signals.SIGTERM`` when a rank was asked to stop, else None.
        over_budget: the time budget ran out.
    """

    loss: float
    terms: dict[str, float]
    bad: SkipReason | None
    grad_norm: float | None
    signal: Signals | None
    over_budget: bool


class Trainer:
    """Train a task's model as ``cfg.train`` says.

    Args:
        cfg: the resolved config.
        task: the model family (default: :class:`~mllm_ris.training.ris_task.RISTask` of ``cfg``).
        progress: show a progress bar on the main process.
    """

    def __init__(self, cfg: Config, task: TrainTask | None = None, *, progress: bool = True) -> None:
        cfg = resolve_refine(cfg)  # a refine_from run trains (and checkpoints) the merged model
        self.cfg = cfg
        tc = cfg.train
        self.task = task if task is not None else RISTask(cfg)
        self.out_dir = Path(tc.output_dir) if tc.output_dir else None
        self.progress = progress
        self.accelerator = Accelerator(
            mixed_precision=tc.mixed_precision,
            gradient_accumulation_steps=tc.grad_accum_steps,
            log_with="tensorboard" if tensorboard_wanted(tc.tensorboard, tc.output_dir) else None,
            project_dir=str(self.out_dir) if self.out_dir else None,
            **launch_kwargs(),
        )
        acc = self.accelerator
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        plugin = acc.state.deepspeed_plugin if self.deepspeed else None
        self.zero3 = plugin is not None and plugin.zero_stage == 3
        set_seed(tc.seed)  # the same initial weights on every rank
        self.dataset, self.weights = self.task.train_data()
        with hf_zero3_init_off(acc):
            model = self.task.build_model()
        external = getattr(self.task, "external_weights", None)  # optional TrainTask method
        self.external = (
            frozenset(external(model)) if external is not None and not self.deepspeed else frozenset()
        )
        optimizer = build_optimizer(model, tc)
        self.scheduler = build_scheduler(optimizer, tc)  # stepped here, once per optimizer step
        if plugin is not None:  # our loader is not prepared: give DeepSpeed the sizes it asks for
            fill_deepspeed_auto(plugin.deepspeed_config, tc, acc.num_processes)
        if self.zero3:  # parameters a module reads without owning them (peft's token rows)
            register_zero3_external_parameters(model)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        if self.external:
            acc.register_save_state_pre_hook(self._drop_external)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.state = TrainerState(
            world_size=acc.num_processes,
            batch_size=tc.batch_size,
            grad_accum_steps=tc.grad_accum_steps,
            seed=tc.seed,
        )
        self.manager = CheckpointManager(self.out_dir, keep_last=tc.keep_last) if self.out_dir else None
        self.last_checkpoint: Path | None = None
        self.log: RunLog | None = None

    def _start_point(self, resume: str | None) -> Path | None:
        """Main process decides (and cleans up); every rank gets the answer or the error."""
        start: str | None = None
        error: str | None = None
        if self.accelerator.is_main_process:
            try:
                start = resolve_start(resume, self.manager, overwrite=self.cfg.train.overwrite_output_dir)
            except CheckpointError as exc:
                error = str(exc)
        if self.accelerator.num_processes > 1:
            shared = [start, error]  # broadcast_object_list fills the list in place
            broadcast_object_list(shared)
            start, error = shared
        if error is not None:
            raise CheckpointError(error)
        return None if start is None else Path(start)

    def _check_fits(self, path: Path) -> None:
        """Before loading a checkpoint: its model weights fit the model (a one-line error, not
        torch's list of every key); DeepSpeed-sharded checkpoints are checked by DeepSpeed."""
        if not (path / "model.safetensors").is_file():
            return
        model = self.accelerator.unwrap_model(self.model)
        if self.cfg.model.output_mode == "prior":
            stale = sorted(k for k in saved_keys(path) - set(model.state_dict()) if is_pixel_side(k))
            if stale:
                raise CheckpointError(
                    f"{path / 'model.safetensors'}: {len(stale)} unexpected pixel-side keys (e.g. "
                    f"{stale[:3]}): it was written when output mode prior still built the unused pixel "
                    f"side; its optimizer state cannot be resumed, but its weights can: `mllm-ris export "
                    f"{path} --out DIR`, then train from them with model.checkpoint=DIR"
                )
        check_external_only_missing(path, model, frozenset(self.external))

    def _load(self, path: Path) -> None:
        saved = read_trainer_state(path)
        self._check_fits(path)
        if self.external:
            self.accelerator.load_state(str(path), strict=False)
        else:
            self.accelerator.load_state(str(path))
        if (old := keep_config_schedule(self.scheduler, self.cfg.train)) is not None:
            self._say(f"note: {path.name} was written with the schedule {old}; continuing with train.*'s")
        sizes = {k: getattr(self.state, k) for k in ("world_size", "batch_size", "grad_accum_steps")}
        if sizes != {k: getattr(saved, k) for k in sizes}:
            self._say(
                f"note: {path.name} was written with {saved}; the sample stream continues, "
                "but the loss curve will differ from an uninterrupted run"
            )
        self.state = replace(saved, **sizes)
        self.accelerator.step = 0  # micro-batch counter of accumulate(); checkpoints sit on step ends
        self.last_checkpoint = path

    def _drop_external(self, models: list, weights: list[dict], output_dir: str) -> None:
        """accelerate save hook: leave weights the task reloads from their own files out of checkpoints."""
        for state in weights:
            for key in [k for k in state if k.removeprefix("module.") in self.external]:
                del state[key]

    def _flags(self, loss: torch.Tensor, stop: StopSignals, deadline: float | None) -> StepFlags:
        """This micro-batch's :class:`StepFlags`, summed over ranks (one all-reduce)."""
        late = self.accelerator.is_main_process and deadline is not None and time.perf_counter() > deadline
        local = StepFlags.of_rank(loss, stop.received_signal, late)  # rank 0's clock decides `late`
        return local if self.accelerator.num_processes == 1 else local.summed(self.accelerator)

    def _step(self, batches: Iterator[Any], stop: StopSignals, deadline: float | None) -> StepResult:
        """Run ``grad_accum_steps`` micro-batches and (unless one was bad) the optimizer step."""
        acc, tc = self.accelerator, self.cfg.train
        world = acc.num_processes
        loss_sum, terms, flags = 0.0, {}, StepFlags()
        bad: SkipReason | None = None
        grad_norm = None
        for _ in range(tc.grad_accum_steps):
            batch = send_to_device(next(batches), acc.device)
            with acc.accumulate(self.model):
                loss, parts = self.task.loss(self.model, batch)
                flags = self._flags(loss, stop, deadline)
                if flags.non_finite > 0:  # some rank saw NaN / inf: every rank skips this backward
                    bad = SkipReason.NON_FINITE_LOSS
                else:
                    acc.backward(loss)
                    loss_sum += flags.loss / world
                    for k, v in parts.items():
                        terms[k] = terms.get(k, 0.0) + float(v) / tc.grad_accum_steps
                if acc.sync_gradients:
                    if self.deepspeed:  # the engine stepped inside backward (clipping from its config)
                        if bad is None:
                            grad_norm = acc.clip_grad_norm_(self.params, tc.max_grad_norm)
                    else:
                        if bad is None:
                            grad_norm = acc.clip_grad_norm_(self.params, tc.max_grad_norm or math.inf)
                            if grad_norm is not None and not math.isfinite(float(grad_norm)):
                                bad = SkipReason.NON_FINITE_GRAD_NORM
                        if bad is None:
                            self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepResult(
            loss=loss_sum / tc.grad_accum_steps if bad is None else math.nan,
            terms=terms,
            bad=bad,
            grad_norm=None if grad_norm is None else float(grad_norm),
            signal=flags.stop,
            over_budget=flags.over_budget > 0,
        )

    def _bare_model(self) -> torch.nn.Module | None:
        """The full model for evaluation / export on the main process (collective under ZeRO-3)."""
        return bare_model(self.accelerator, self.model, self.task.build_model if self.zero3 else None)

    def evaluate(self) -> dict[str, EvalReport]:
        """Evaluate on every ``task.val_data()`` dataset (main process; others wait); RNG untouched."""
        reports: dict[str, EvalReport] = {}
        val = self.task.val_data()
        if val:
            with rng_preserved():  # ZeRO-3 builds a model to gather into: that draws random numbers too
                model = self._bare_model()
                if model is not None:
                    predictor = self.task.predictor(model, self.accelerator.device)
                    for label, ds in val.items():
                        reports[label] = evaluate(ds, predictor, limit=self.cfg.eval.limit, progress=False)
            self.model.train()
        self.accelerator.wait_for_everyone()
        return reports

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_N`` atomically (every rank must call); None without output_dir."""
        if self.manager is None:
            return None
        acc, step = self.accelerator, self.state.step
        tmp = self.manager.root / f"step_{step:06d}.tmp"
        if acc.is_main_process:
            tmp = self.manager.begin(step)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every rank's shards and RNG states are on disk
        final = self.manager.root / tmp.name.removesuffix(".tmp")
        if acc.is_main_process:
            final = self.manager.commit(step, tmp, self.state, config_to_dict(self.cfg))
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def fit(
        self,
        *,
        resume: str | None = None,
        time_budget_s: float | None = None,
        stop_at_step: int | None = None,
    ) -> TrainSummary:
        """Train up to ``train.max_steps`` (or a stop), evaluate, write the model; returns the summary.

        Args:
            resume: ``"auto"`` / a checkpoint dir / None (default ``train.resume``).
            time_budget_s: stop after this many seconds of training (default ``train.time_budget_s``);
                the schedule still spans ``max_steps``, so a budgeted run is a prefix of the full one.
            stop_at_step: stop (checkpoint, export, evaluate) at this step without changing the schedule.

        Raises:
            CheckpointError: the resume point is missing / incomplete, or output_dir holds another run.
            NonFiniteLossError: ``train.max_bad_steps`` skipped steps in a row.
        """
        tc, acc = self.cfg.train, self.accelerator
        resume = resume if resume is not None else tc.resume
        budget = time_budget_s if time_budget_s is not None else tc.time_budget_s
        start = self._start_point(resume)
        if start is not None:
            self._load(start)
        begin = self.state.step
        end = min(tc.max_steps, stop_at_step if stop_at_step is not None else tc.max_steps)
        self.log = RunLog(
            acc,
            self.out_dir,
            start_step=begin,
            total_steps=tc.max_steps,
            progress=self.progress,
            config=config_to_dict(self.cfg),
        )
        if start is not None:
            self.log.message(f"resumed from {start} (step {begin})")
        guard = BadStepGuard(
            tc.max_bad_steps, total=self.state.bad_steps, consecutive=self.state.consecutive_bad
        )
        loader = mixture_loader(
            self.dataset,
            self.weights,
            self.task.collate,
            batch_size=tc.batch_size,
            seed=tc.seed,
            start=self.state.samples,
            rank=acc.process_index,
            world_size=acc.num_processes,
            num_workers=self.cfg.data.num_workers,
        )
        losses: list[float] = []
        seconds, saved_at = 0.0, begin if start is not None else -1
        interrupted: Signals | None = None
        try:
            with StopSignals() as stop:
                batches = iter(loader)
                self.model.train()
                while self.state.step < end:
                    t0 = time.perf_counter()
                    deadline = None if budget is None else t0 + budget - seconds  # rank 0's clock decides
                    if hasattr(self.task, "begin_step"):  # optional hook: tasks with a step schedule
                        self.task.begin_step(self.state.step)
                    out = self._step(batches, stop, deadline)
                    seconds += time.perf_counter() - t0
                    self.state.step += 1
                    self.state.samples += tc.grad_accum_steps * acc.num_processes * tc.batch_size
                    step = self.state.step
                    losses.append(out.loss)
                    self._record(out, guard, seconds, end)
                    if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                        self.log.evaluation(self.evaluate(), step, self.out_dir)
                    interrupted = out.signal
                    if (
                        interrupted is not None
                        or out.over_budget
                        or (tc.save_every and step % tc.save_every == 0)
                    ):
                        self.save_checkpoint()
                        saved_at = step
                    if interrupted is not None or out.over_budget:
                        break
            if self.state.step != saved_at:
                self.save_checkpoint()
            reports: dict[str, EvalReport] = {}
            if interrupted is None:
                reports = self._finish()
        finally:
            self.log.close()
        return self._summary(
            losses, seconds, begin, reports, interrupted.name if interrupted is not None else None, guard
        )

    def _record(self, out: StepResult, guard: BadStepGuard, seconds: float, end: int) -> None:
        """Count a skipped step (may raise NonFiniteLossError) or log an applied one."""
        tc, step = self.cfg.train, self.state.step
        self.log.advance()  # type: ignore[union-attr]
        if out.bad is not None:
            self._say(f"step {step}: {out.bad}; skipped ({guard.total + 1} so far)")
            self.log.record({"step": step, "skipped": out.bad.value})  # type: ignore[union-attr]
            last = str(self.last_checkpoint) if self.last_checkpoint else None
            try:
                guard.bad(step, out.bad, last)
            finally:
                self.state.bad_steps, self.state.consecutive_bad = guard.total, guard.consecutive
            return
        guard.good()
        self.state.consecutive_bad = 0
        if step % tc.log_every == 0 or step == end:
            record = {
                "step": step,
                "loss": out.loss,
                "lr": self.scheduler.get_last_lr()[0],
                **out.terms,
            }
            if out.grad_norm is not None:
                record["grad_norm"] = out.grad_norm
            record.update(samples=self.state.samples, seconds=seconds)
            self.log.record(record)  # type: ignore[union-attr]

    def _finish(self) -> dict[str, EvalReport]:
        """Write the deliverable model (plain safetensors, ZeRO consolidated) and evaluate."""
        if self.out_dir is not None:
            model = self._bare_model()
            if model is not None:
                self.task.save_model(model, self.out_dir, config_to_dict(self.cfg))
            self.accelerator.wait_for_everyone()
        reports = self.evaluate()
        if self.out_dir is not None:
            for label, report in reports.items():
                report.save(self.out_dir / "eval" / label.replace(":", "_"))
        return reports

    def _summary(
        self,
        losses: list[float],
        seconds: float,
        begin: int,
        reports: dict[str, EvalReport],
        interrupted: str | None,
        guard: BadStepGuard,
    ) -> TrainSummary:
        acc, tc = self.accelerator, self.cfg.train
        digest = None if self.zero3 else param_digest(acc.unwrap_model(self.model))
        digests = gather_object([digest]) if acc.num_processes > 1 else [digest]
        summary = TrainSummary.of_run(
            steps=self.state.step,
            samples=(self.state.step - begin) * tc.grad_accum_steps * acc.num_processes * tc.batch_size,
            seconds=seconds,
            losses=losses,
            eval=reports,
            output_dir=str(self.out_dir) if self.out_dir else None,
            start_step=begin,
            bad_steps=guard.total,
            interrupted=interrupted,
            checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
            param_digests=list(digests),
        )
        if self.out_dir is not None and acc.is_main_process:
            summary.save(self.out_dir / "summary.json")
        if len(set(digests)) > 1:
            self._say(f"warning: the ranks' parameters differ after training: {digests}")
        return summary

    def _say(self, text: str) -> None:
        if self.log is not None:
            self.log.message(text)
        elif self.accelerator.is_main_process:
            print(text)


def train(
    cfg: Config,
    *,
    resume: str | None = None,
    time_budget_s: float | None = None,
    progress: bool = True,
) -> TrainSummary:
    """Train the :class:`~mllm_ris.training.ris_task.RISTask` of ``cfg`` (the ``mllm-ris train`` command)."""
    return Trainer(cfg, progress=progress).fit(resume=resume, time_budget_s=time_budget_s)


def train_classic(cfg: Config, *, time_budget_s: float | None = None, progress: bool = True) -> TrainSummary:
    """Train a classic-mode model from ``cfg`` (:func:`train`) and evaluate it on every ``data.val`` dataset.

    A fresh run each call (an earlier run in ``train.output_dir`` is replaced) unless
    ``train.resume`` is set; checkpoints, evaluation and logging follow ``cfg.train``.

    Args:
        cfg: the resolved config (``model.mode`` must be ``classic``; with or without ``pointer.dim``).
        time_budget_s: stop early after this many seconds of training (the schedule still spans
            ``train.max_steps``, so a budgeted run is a prefix of the full one).
        progress: show a progress bar.

    Raises:
        ConfigError: ``model.mode`` is not ``classic``.
    """
    if cfg.model.mode != "classic":
        raise ConfigError(f"model.mode: train_classic trains classic mode, got {cfg.model.mode!r}")
    if cfg.train.resume is None:
        cfg = replace(cfg, train=replace(cfg.train, overwrite_output_dir=True))
    return train(cfg, time_budget_s=time_budget_s, progress=progress)
