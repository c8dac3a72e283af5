"""DeepSpeed ZeRO-3 on 2 CPU ranks through ``accelerate launch``: the classic model and the MLLM
(tiny-synth, with and without LoRA) train and export.

ZeRO-3 shards the parameters themselves and gathers them module by module through forward /
backward hooks. Those hooks only see tensors in a module's inputs and outputs when they sit in
tensors, tuples (named ones too), lists or dicts, hence the ``NamedTuple`` outputs of the fusion
heads (a dataclass output made the first backward fail with ``active_backward_submodules is empty``;
see docs/training.md, "ZeRO-3"), of the projector, the grounding LLM, the prompt builder and the
SAM stage. A parameter read by a module that does not own it (peft's token rows) must be
registered with that module. Each run is compared with an in-process single-process run with
2 accumulated micro-batches, which sees the same samples per step as 2 ranks x 1 micro-batch.

Each launch (fresh Python processes, the CLI) with its in-process reference: 45-60 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil  # an accelerate dependency
import pytest
import torch
from _launch_kit import ROOT, TINY_CLASSIC_YAML, launch_cmd, launch_env

from mllm_ris.config import Config, load_config
from mllm_ris.data.synthetic import SynthRefDataset, make_synthref
from mllm_ris.errors import ConfigError
from mllm_ris.modeling.llm import random_causal_lm
from mllm_ris.modeling.lora import apply_lora, zero3_external_parameters
from mllm_ris.modeling.model import RISModel, build_model
from mllm_ris.modeling.model_config import LoraSettings
from mllm_ris.modeling.predictor import build_processor
from mllm_ris.processing.processor import RISTransform, collate_ris
from mllm_ris.training.checkpoint import consolidated_state_dict
from mllm_ris.training.sampling import MixtureSampler, build_mixture
from mllm_ris.training.trainer import Trainer
from s2rm_head import HEAD_NAMES, HeadConfig, LanguageFeatures, build_head

STEPS = 3
MLLM_STEPS = 6  # the test data's training stream has a no-target micro-batch at step 5
LAUNCH_TIMEOUT_S = 240
MLLM_FILES = (
    ROOT / "configs" / "model" / "tiny-synth.yaml",
    ROOT / "configs" / "train" / "synthref-mllm.yaml",
)
# MLLM variants: the tiny-synth default (the whole LLM trains, masks from the head) and LoRA with
# token rows and the SAM stage (dropout 0: ranks and the reference would draw other dropout masks)
MLLM_VARIANTS = {
    "full-direct": (),
    "lora-sam": ("model.mllm.lora.enabled=true", "model.mllm.lora.dropout=0", "model.output_mode=auto"),
}


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


def _launch_zero3(log_dir: Path, *args: str, launch_args: Sequence[str] = ()) -> str:
    """``accelerate launch`` with deepspeed-zero3.yaml (2 ranks; ``launch_args`` override it); returns stdout.

    Output goes to files, not pipes, and a run past the timeout is killed together with its
    torchrun workers (they run in sessions of their own, so a process-group kill misses them, and a
    rank stuck in a collective would wait for gloo's 30 min timeout).
    """
    cmd, env = launch_cmd("deepspeed-zero3.yaml", *args, launch_args=launch_args), launch_env()
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

    # the exported model folder (gathered on rank 0) loads into a fresh build and equals the merged shards
    exported = RISModel.from_pretrained(run).state_dict()
    merged = consolidated_state_dict(ckpt)
    assert set(exported) <= set(merged) and all(torch.equal(merged[k], exported[k]) for k in exported)

    # same numbers as one process accumulating the 2 ranks' micro-batches (rank r takes micro-batch
    # r of each step): ZeRO-3's gather / release of every head parameter leaves the maths unchanged
    reference = Trainer(
        load_config(config, [f"train.max_steps={STEPS}", "train.grad_accum_steps=2"]), progress=False
    ).fit()
    assert summary["losses"] == pytest.approx(reference.losses, rel=1e-5, abs=1e-6)


def _module_outputs(model: torch.nn.Module, forward: Callable[[], object]) -> tuple[set[str], list[str]]:
    """Run ``forward``; the names of the submodules it called and ``"name: type"`` of those whose
    output hides its tensors from ZeRO-3's hooks.

    The root is left out: it returns a dataclass (``RISOutput``, with text and a dict of terms),
    harmless while it owns no parameter of its own, the only thing ZeRO-3 would fetch for it in
    backward (checked here).
    """
    assert list(model.parameters(recurse=False)) == []
    outputs: list[tuple[str, object]] = []
    names = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(lambda m, a, out: outputs.append((names[m], out))) for m in names]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    hidden = sorted({f"{n}: {type(out).__name__}" for n, out in outputs if n and not _hookable(out)})
    return {n for n, _ in outputs if n}, hidden


def test_every_classic_module_returns_what_zero3_hooks_see(tmp_path: Path, data_root: Path) -> None:
    """The classic model around the heads: the text encoder returns LanguageFeatures (a named tuple)."""
    model = build_model(load_config(_yaml(tmp_path, data_root, "s2rm")).model).train()
    dataset = SynthRefDataset(data_root, split="train")
    batch = collate_ris([dataset[0], dataset[1]], RISTransform(32))
    called, hidden = _module_outputs(model, lambda: model(batch))
    assert {"text_encoder", "pixel_encoder", "head"} <= called
    assert hidden == [], "module outputs whose tensors ZeRO-3's hooks cannot see"


# ------------------------------------------------------------------------------------- MLLM mode


def _mllm_config(data_root: Path, variant: str, *extra: str) -> Config:
    return load_config(
        list(MLLM_FILES), [f"data.train.0.root={data_root}", "data.val=[]", *MLLM_VARIANTS[variant], *extra]
    )


@pytest.mark.parametrize("variant", MLLM_VARIANTS)
def test_every_mllm_module_returns_what_zero3_hooks_see(data_root: Path, variant: str) -> None:
    """Fast guard for the MLLM side (vision tower, projector, grounding LLM incl. peft's layers, pixel
    encoder, head, prompt builder, SAM stage): no module output hides its tensors from ZeRO-3's
    pre-backward fetch, no 0-d parameter, and peft's token rows are named for registration."""
    cfg = _mllm_config(data_root, variant, "model.output_mode=auto", "data.image_size=64")
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    assert [n for n, p in model.named_parameters() if p.dim() == 0] == []
    dataset, _ = build_mixture(cfg.data.train)
    samples = [s for s in (dataset[i] for i in range(8)) if s.masks.shape[0] > 0][:2]
    batch = build_processor(model, image_size=64)(samples)
    called, hidden = _module_outputs(model, lambda: model(batch))
    assert {"vision", "projector", "mllm", "pixel_encoder", "head", "prompt_builder", "sam_stage"} <= called
    assert hidden == [], "module outputs whose tensors ZeRO-3's hooks cannot see"

    rows = {id(p) for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    registered = {id(p) for _, p in zero3_external_parameters(model)}
    if variant == "lora-sam":
        assert len(rows) == 2 and rows <= registered  # embeddings and the untied LM head
    else:
        assert rows == set() and registered == set()


def _first_samples_have_targets(cfg: Config, n: int) -> bool:
    """Whether the first ``n`` samples of the training stream (batch 1) all have a target."""
    dataset, weights = build_mixture(cfg.data.train)
    stream = MixtureSampler(weights, batch_size=1, seed=cfg.train.seed, start=0, rank=0, world_size=1)
    return all(dataset[stream.index_at(p)].masks.shape[0] > 0 for p in range(n))


def _strict_zero3_json(folder: Path) -> Path:
    """configs/deepspeed/zero3.json with every parameter partitioned and released after each use."""
    config = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    config["zero_optimization"].update(
        stage3_param_persistence_threshold=0,  # the shipped 1e5 keeps every tiny weight whole
        stage3_max_live_parameters=0,
        stage3_max_reuse_distance=0,
        stage3_prefetch_bucket_size=0,
    )
    path = folder / "zero3-strict.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("variant", MLLM_VARIANTS)
def test_zero3_two_cpu_processes_train_mllm_mode(tmp_path: Path, data_root: Path, variant: str) -> None:
    """tiny-synth on 2 ZeRO-3 ranks with every parameter partitioned: the run (with its final evaluation)
    finishes, its export equals the merged shards, and its losses equal one process accumulating the
    2 ranks' micro-batches. Without the token-row registration the LoRA run failed in its first
    backward (``expand(FloatTensor{[3, 64]}, size=[0])``)."""
    pytest.importorskip("deepspeed")
    train = (
        f"data.train.0.root={data_root}",
        *MLLM_VARIANTS[variant],
        "data.image_size=64",
        "train.batch_size=1",
        f"train.max_steps={MLLM_STEPS}",
        "train.warmup_steps=0",  # full learning rate from step 1: later losses depend on the updates
        "train.log_every=1",
        "train.tensorboard=false",
    )
    # a micro-batch of only no-target samples (T = 0) on one rank runs the same modules (one padded
    # query slot) as the other rank's; before, the ranks' collectives diverged (gloo abort)
    assert not _first_samples_have_targets(_mllm_config(data_root, variant), 2 * MLLM_STEPS)
    run = tmp_path / "zero3"
    stdout = _launch_zero3(
        tmp_path,
        *map(str, MLLM_FILES),
        *train,
        f"data.val.0.root={data_root}",
        "eval.limit=2",
        f"train.output_dir={run}",
        launch_args=("--deepspeed_config_file", str(_strict_zero3_json(tmp_path))),
    )
    assert f"step {MLLM_STEPS}/{MLLM_STEPS}" in stdout and "synthref:val: cIoU" in stdout

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == MLLM_STEPS and summary["samples"] == MLLM_STEPS * 2  # 2 ranks x batch 1
    assert summary["bad_steps"] == 0 and summary["interrupted"] is None
    assert summary["param_digests"] == [None, None]
    assert all(math.isfinite(x) for x in summary["losses"])
    ckpt = run / "checkpoints" / f"step_{MLLM_STEPS:06d}"
    assert len(list((ckpt / "pytorch_model").glob("zero_pp_rank_*_model_states.pt"))) == 2

    # the final model (gathered on rank 0) equals the merged shards, LoRA and token rows included
    exported = RISModel.from_pretrained(run).state_dict()
    merged = consolidated_state_dict(ckpt)
    assert set(exported) == set(merged) and all(torch.equal(merged[k], exported[k]) for k in exported)

    cfg = load_config(
        list(MLLM_FILES),
        [*train, "data.val=[]", f"train.output_dir={tmp_path / 'ref'}", "train.grad_accum_steps=2"],
    )
    reference = Trainer(cfg, progress=False).fit()
    assert summary["losses"] == pytest.approx(reference.losses, rel=1e-5, abs=1e-6)


def test_lora_token_rows_build_while_transformers_zero3_flag_is_set() -> None:
    """accelerate registers its ZeRO-3 config with transformers globally; peft then gathered the token
    rows through ``torch.cuda.current_device()`` (no NVIDIA driver on CPU). Whole weights now give the
    rows of a plain build; weights partitioned by ``deepspeed.zero.Init`` without CUDA: one clear error."""
    pytest.importorskip("deepspeed")
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
    from transformers.integrations import deepspeed as hf_deepspeed

    torch.manual_seed(0)
    llm = random_causal_lm(
        arch="llama", vocab_size=40, hidden_size=16, num_layers=1, num_heads=2,
        intermediate_size=32, tie_embeddings=False, pad_token_id=0,
    )  # fmt: skip
    settings, ids = LoraSettings(dropout=0.0), [37, 38, 39]
    plain = apply_lora(copy.deepcopy(llm), settings, token_ids=ids).state_dict()
    before = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_config = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    try:
        assert is_deepspeed_zero3_enabled()
        adapted = apply_lora(copy.deepcopy(llm), settings, token_ids=ids).state_dict()
        assert is_deepspeed_zero3_enabled()  # switched back on after the build
        deltas = [k for k in plain if "trainable_tokens_delta" in k]
        assert len(deltas) == 2 and all(torch.equal(adapted[k], plain[k]) for k in deltas)
        if not torch.cuda.is_available():
            partitioned = copy.deepcopy(llm)
            partitioned.get_input_embeddings().weight.ds_id = 0  # how deepspeed.zero.Init marks its weights
            with pytest.raises(ConfigError, match="train_token_rows"):
                apply_lora(partitioned, settings, token_ids=ids)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = before
        del hf_config
