"""DeepSpeed ZeRO-3 on 2 CPU ranks through ``accelerate launch``: the classic model trains and exports.

ZeRO-3 shards the parameters themselves and gathers them module by module through forward /
backward hooks. Those hooks only see tensors in a module's inputs and outputs when they sit in
tensors, tuples (named ones too), lists or dicts, hence the ``NamedTuple`` outputs of the fusion
heads (a dataclass output made the first backward fail with ``active_backward_submodules is empty``;
see docs/training.md, "ZeRO-3"). The run is compared with an in-process single-process run with
2 accumulated micro-batches, which sees the same samples per step as 2 ranks x 1 micro-batch.

One launch (fresh Python processes, the CLI) and the in-process reference: ~45 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import psutil  # an accelerate dependency
import pytest
import torch
from _launch_kit import ROOT, TINY_CLASSIC_YAML, launch_cmd, launch_env
from safetensors.torch import load_file

from mllm_ris.config import load_config
from mllm_ris.data.synthetic import make_synthref
from mllm_ris.modeling.classic import build_classic_model, load_state
from mllm_ris.training.checkpoint import consolidated_state_dict
from mllm_ris.training.trainer import Trainer
from s2rm_head import HEAD_NAMES, HeadConfig, LanguageFeatures, build_head

STEPS = 3
LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zero3") / "synthref"
    make_synthref(root, images=10, seed=5, size=64, workers=1, progress=False)
    return root


def _yaml(folder: Path, data_root: Path, head: str) -> Path:
    path = folder / f"tiny-{head}.yaml"
    path.write_text(TINY_CLASSIC_YAML.format(root=data_root, head=head))
    return path


def _hookable(value: object) -> bool:
    """What DeepSpeed's ZeRO-3 module hooks look into: tensors, tuples (named too), lists, dicts."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_hookable(v) for v in value)
    if isinstance(value, dict):
        return all(_hookable(v) for v in value.values())
    return False  # e.g. a dataclass: its tensors stay hidden from the hooks


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_every_head_module_returns_what_zero3_hooks_see(name: str) -> None:
    """Fast guard for every head (the launch test below runs one): no module output hides its tensors
    from ZeRO-3's pre-backward fetch, and no 0-d parameter (DeepSpeed broadcasts ``p.view(uint8)``)."""
    head = build_head(HeadConfig(name=name, dim=8, num_heads=2, in_channels=(4, 4, 4, 4), lang_dim=8))
    assert [n for n, p in head.named_parameters() if p.dim() == 0] == []
    outputs: list[tuple[str, object]] = []
    names = {m: n or "<head>" for n, m in head.named_modules()}
    handles = [m.register_forward_hook(lambda m, a, out: outputs.append((names[m], out))) for m in names]
    pyramid = [torch.randn(2, 4, s, s) for s in (8, 4, 2, 1)]
    lang = LanguageFeatures(
        tokens=torch.randn(2, 3, 8),
        mask=torch.ones(2, 3, dtype=torch.bool),
        queries=torch.randn(2, 2, 8),
        query_mask=torch.ones(2, 2, dtype=torch.bool),
    )
    head(pyramid, lang)
    for handle in handles:
        handle.remove()
    assert len(outputs) > 1
    hidden = sorted({f"{n}: {type(out).__name__}" for n, out in outputs if not _hookable(out)})
    assert hidden == [], "module outputs whose tensors ZeRO-3's hooks cannot see"


def test_two_stage_head_loads_weights_with_0d_scalars() -> None:
    """TwoStageHead's scalars became shape (1,); state dicts written with 0-d ones still load."""
    head = build_head(HeadConfig(name="two-stage", dim=8, num_heads=2, in_channels=(4, 4, 4, 4), lang_dim=8))
    state = head.state_dict()
    state.update(logit_scale=torch.tensor(1.5), align_bias=torch.tensor(-0.25))
    head.load_state_dict(state)
    assert head.logit_scale.tolist() == [1.5] and head.align_bias.tolist() == [-0.25]


def _launch_zero3(log_dir: Path, *args: str) -> str:
    """``accelerate launch`` with deepspeed-zero3.yaml (2 ranks); returns stdout.

    Output goes to files, not pipes, and a run past the timeout is killed together with its
    torchrun workers (they run in sessions of their own, so a process-group kill misses them, and a
    rank stuck in a collective would wait for gloo's 30 min timeout).
    """
    cmd, env = launch_cmd("deepspeed-zero3.yaml", *args), launch_env()
    stdout, stderr = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with stdout.open("w") as out, stderr.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            launcher = psutil.Process(proc.pid)
            for p in [*launcher.children(recursive=True), launcher]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            proc.wait(timeout=60)
            pytest.fail(
                f"the ZeRO-3 run did not finish in {LAUNCH_TIMEOUT_S} s (killed); "
                f"stdout tail:\n{stdout.read_text()[-2000:]}"
            )
    assert proc.returncode == 0, stderr.read_text()[-3000:]
    return stdout.read_text()


def test_zero3_two_cpu_processes_train_and_export(tmp_path: Path, data_root: Path) -> None:
    pytest.importorskip("deepspeed")
    config = _yaml(tmp_path, data_root, "s2rm")
    run = tmp_path / "zero3"
    stdout = _launch_zero3(tmp_path, str(config), f"train.output_dir={run}", f"train.max_steps={STEPS}")
    assert f"step {STEPS}/{STEPS}" in stdout

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["samples"] == STEPS * 2 * 2  # 2 ranks x batch 2
    assert summary["bad_steps"] == 0 and summary["interrupted"] is None
    assert summary["param_digests"] == [None, None]  # ZeRO-3: each rank holds a shard

    # parameters really sharded: one model-state file per rank
    ckpt = run / "checkpoints" / f"step_{STEPS:06d}"
    assert len(list((ckpt / "pytorch_model").glob("zero_pp_rank_*_model_states.pt"))) == 2

    # the exported model (gathered on rank 0) loads into a fresh build and equals the merged shards
    exported = load_file(str(run / "model.safetensors"))
    model = build_classic_model(load_config(config).model)
    load_state(model, run)
    merged = consolidated_state_dict(ckpt)
    assert set(exported) <= set(merged) and all(torch.equal(merged[k], exported[k]) for k in exported)

    # same numbers as one process accumulating the 2 ranks' micro-batches (rank r takes micro-batch
    # r of each step): ZeRO-3's gather / release of every head parameter leaves the maths unchanged
    reference = Trainer(
        load_config(config, [f"train.max_steps={STEPS}", "train.grad_accum_steps=2"]), progress=False
    ).fit()
    assert summary["losses"] == pytest.approx(reference.losses, rel=1e-5, abs=1e-6)
