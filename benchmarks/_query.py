"""One RIS query, timed whole and by stage; LLM prefill at given sequence lengths; MFU.

Used by ``bench_latency.py`` (and its scaling part). A query is what ``RISPredictor.predict`` does:
collate (letterbox, chat tokens, superpixels) → vision tower → projector → LLM generate → pixel
encoder + head → unletterbox → mask. Stage times are measured by calling the same pieces one by one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from _perf import ForcedAnswer, Peak, Timing, build_tiny, peak_memory, sync, timed

# 7B dims = Llama-2-7B's decoder; LLaVA-1.5's tower = CLIP ViT-L/14 at 336 px (24 x 24 = 576 patches)
LLAMA2_7B = {"hidden": 4096, "layers": 32, "heads": 32, "intermediate": 11008}
VIT_L_336 = {"image": 336, "patch": 14, "hidden": 1024, "layers": 24, "heads": 16}
# dense bf16 tensor-core peak (no sparsity), FLOP/s, by substring of torch.cuda.get_device_name
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def dims_overrides(dims: str, *, layers: int | None, vision_layers: int | None, device: str) -> list[str]:
    """Config overrides of tiny-synth for ``dims`` (``tiny`` or ``7b``); ``layers`` cuts the LLM."""
    if dims == "tiny":
        return [f"model.mllm.random_num_layers={layers}"] if layers else []
    v, m = VIT_L_336, LLAMA2_7B
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return [
        f"model.vision.random_image_size={v['image']}",
        f"model.vision.random_patch_size={v['patch']}",
        f"model.vision.random_hidden_size={v['hidden']}",
        f"model.vision.random_num_layers={vision_layers or v['layers']}",
        f"model.vision.random_num_heads={v['heads']}",
        f"model.mllm.random_hidden_size={m['hidden']}",
        f"model.mllm.random_num_layers={layers or m['layers']}",
        f"model.mllm.random_num_heads={m['heads']}",
        f"model.mllm.random_intermediate_size={m['intermediate']}",
        f"model.mllm.dtype={dtype}",
    ]


@dataclass
class QueryBench:
    """A model ready to answer queries: predictor, forced answer and the query sample."""

    kind: str
    model: Any
    predictor: Any
    forced: ForcedAnswer
    device: str


def make_query_bench(
    kind: str, overrides: list[str], *, device: str, image_size: int, seed: int = 0
) -> QueryBench:
    from mllm_ris.modeling.predictor import RISPredictor

    model = build_tiny(kind, overrides, device=device, seed=seed)
    forced = ForcedAnswer(model)
    predictor = RISPredictor(model, image_size=image_size, device=device, max_new_tokens=len(forced.ids) + 2)
    return QueryBench(kind, model, predictor, forced, device)


def query(qb: QueryBench, sample: Any) -> Any:
    """One end-to-end query (``RISPredictor.predict`` on one sample)."""
    qb.forced.reset()
    return qb.predictor.predict([sample])[0]


@dataclass
class QueryResult:
    total: Timing
    stages: dict[str, Timing] = field(default_factory=dict)
    memory: Peak | None = None
    tokens: int = 0
    text: str = ""
    masks: int = 0


def measure_query(
    qb: QueryBench, sample: Any, *, warmup: int, repeats: int, stages: bool = True
) -> QueryResult:
    """Time whole queries (and, with ``stages``, each stage on its own) of ``sample``."""
    with peak_memory(qb.device) as mem:
        pred = query(qb, sample)
    total = timed(lambda: query(qb, sample), warmup=warmup, repeats=repeats, device=qb.device)
    out = QueryResult(total=total, memory=mem, text=pred.text or "", masks=int(pred.masks.shape[0]))
    model, p = qb.model, qb.predictor
    batch = p.processor([sample]).to(qb.device)
    with torch.no_grad():
        vis = model.visual_tokens(batch)
    out.tokens = int(vis.mask.sum())
    if not stages:
        return out
    kw = {"warmup": warmup, "repeats": repeats, "device": qb.device}

    def generate() -> Any:
        qb.forced.reset()
        return model.mllm.generate(
            batch.input_ids, batch.attention_mask, vis, max_new_tokens=p.max_new_tokens
        )

    with torch.no_grad():
        gen = generate()
        out.stages["collate (letterbox, tokens, superpixels)"] = timed(lambda: p.processor([sample]), **kw)
        out.stages["vision tower + projector"] = timed(lambda: model.visual_tokens(batch), **kw)
        out.stages["LLM generate (prefill + decode)"] = timed(generate, **kw)
        from s2rm_head.types import LanguageFeatures

        seg = gen.seg_embeds  # as LLMQueries.decode passes them
        lang = LanguageFeatures(tokens=seg, mask=gen.seg_valid, queries=seg, query_mask=gen.seg_valid)
        out.stages["pixel encoder + head"] = timed(lambda: model._segment(batch.images, lang), **kw)
    return out


# ----------------------------------------------------------------------------------------- prefill


@contextlib.contextmanager
def attention(llm: Any, impl: str) -> Iterator[None]:
    """Run ``llm`` with attention ``impl``: ``sdpa`` (PyTorch picks the kernel), ``sdpa-flash`` (SDPA
    forced to its flash kernel), ``eager`` or ``flash_attention_2`` (needs the flash-attn package)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = llm.config._attn_implementation
    llm.set_attn_implementation("sdpa" if impl == "sdpa-flash" else impl)
    try:
        if impl == "sdpa-flash":
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                yield
        else:
            yield
    finally:
        llm.set_attn_implementation(before)


def prefill_fn(llm: Any, seq: int, *, batch: int, device: str, compiled: bool) -> Any:
    """A no-arg function running one prefill of ``batch x seq`` random embeddings (KV cache built,
    next-token logits only)."""
    dim = llm.get_input_embeddings().weight.shape[1]
    dtype = llm.get_input_embeddings().weight.dtype
    x = torch.randn(batch, seq, dim, device=device, dtype=dtype) * 0.02
    if compiled:
        torch._dynamo.reset()  # a fresh static-shape compilation per sequence length
    fwd = torch.compile(llm) if compiled else llm

    @torch.no_grad()
    def run() -> Any:
        return fwd(inputs_embeds=x, use_cache=True, logits_to_keep=1).logits

    return run


def prefill_flops(cfg: Any, seq: int, batch: int) -> float:
    """Forward FLOPs of a Llama-style prefill: 2 x weights x tokens + causal attention + LM head (last)."""
    h, n_layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter  # q, o + k, v + gate, up, down
    dense = 2 * per_layer * n_layers * seq
    attn = 2 * n_layers * seq * seq * h  # QK^T and AV, causal half: 2 * (2 * seq^2 * h) / 2
    head = 2 * h * cfg.vocab_size
    return batch * (dense + attn + head)


def peak_flops(device: str) -> float | None:
    """Dense bf16 peak of the GPU (None on CPU or an unknown GPU)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def measure_prefill(
    llm: Any,
    seqs: dict[str, int],
    *,
    batch: int,
    device: str,
    impl: str,
    compiled: bool,
    warmup: int,
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """Prefill timing, memory and MFU per named sequence length, one attention / compile setting."""
    rows: dict[str, dict[str, Any]] = {}
    peak = peak_flops(device)
    with attention(llm, impl):
        for name, seq in seqs.items():
            fn = prefill_fn(llm, seq, batch=batch, device=device, compiled=compiled)
            first = timed(fn, warmup=0, repeats=1, device=device)  # includes compilation
            with peak_memory(device) as mem:
                fn()
                sync(device)
            t = timed(fn, warmup=warmup, repeats=repeats, device=device)
            flops = prefill_flops(llm.config, seq, batch)
            rows[name] = {
                "seq": seq,
                "timing": t,
                "first_call_s": first.median,
                "memory": mem,
                "tflops": flops / t.median / 1e12,
                "mfu": None if peak is None else flops / t.median / peak,
            }
    return rows


def sequence_lengths(text_tokens: int, k_sp: int, k_cap: int, n_patch: int) -> dict[str, int]:
    """Prompt lengths after splicing: text tokens + visual tokens."""
    if k_sp == k_cap:
        seqs = {f"superpixel, this image (K={k_sp}, the cap)": text_tokens + k_sp}
    else:
        seqs = {
            f"superpixel, this image (K={k_sp})": text_tokens + k_sp,
            f"superpixel, the cap (K={k_cap})": text_tokens + k_cap,
        }
    return seqs | {f"patch (N={n_patch})": text_tokens + n_patch}


def loglog_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log y on log x (the growth exponent)."""
    if len(x) < 2:
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])
