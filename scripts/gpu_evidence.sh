#!/usr/bin/env bash
# Issue 16: every GPU measurement in ONE command of at most 10 minutes (docs/benchmarks.md,
# "GPU (issue 16)"). Run from the repository root on the GPU machine:
#
#   PYTHONUNBUFFERED=1 bash scripts/gpu_evidence.sh --bundle 2>&1 | tee "$OUT/console.log"
#
#   --out DIR      results folder (default: $OUT, else benchmarks/results/gpu)
#   --bundle       put only summary.md, summary.json and evidence.tar.gz (every step's JSON, markdown
#                  and log) into the results folder: the device tool brings back at most 8 files
#   --dry-run      every step on CPU at tiny dims (a few minutes; results default to a temp folder)
#   --budget S     overall budget in seconds (default 540)
#   --fetch-wheels download / build here (with network) the wheels the GPU image lacks into .whl/
#                  (carry `.whl` in the device call); nothing else runs
#
# Each step runs under its own `timeout`, capped by what is left of the overall budget, and writes
# one line to steps.jsonl: "ok", or "not measured: <reason>" (failed, timed out, no time left,
# needs CUDA). A failed step never stops the script. Steps in priority order, with their caps
# (seconds) and what they usually take on one H100 (estimates, not measurements):
#   env             20   nvidia-smi, torch / CUDA / package versions                        ~5
#   train_lora     100   7B-dims LoRA step, bf16, gradient checkpointing on and off          ~45
#   latency_7b     120   bench_latency --dims 7b --device cuda: query + prefill grid, eager  ~75
#   train_zero2    100   the LoRA step under DeepSpeed ZeRO-2 via accelerate launch (1 GPU)  ~55
#   train_qlora    150   the step on a 4-bit NF4 base (random model saved, 13.5 GB, reloaded) ~100
#   recipe         200   default recipe trained for 120 s on the GPU, then evaluated         ~180
#   query_default   70   bench_latency --dims tiny --parts query: cuda, then cpu (2 threads) ~40
#   query_sam       70   the same query with output_mode sam + a random SAM ViT-B: cuda, cpu ~45
#   compile         90   prefill with and without torch.compile (4 of 32 layers, batch 16)   ~60
# The caps add up to more than the budget on purpose: what is left when a step starts caps it.
# (Dry run: compile's cap is 150 s, CPU inductor is slow.) RECIPE_MODEL=configs/model/X.yaml trains
# another model file in the recipe step once the bundled default changes. The CPU dry run took
# 371 s on 2 shared, busy cores; all nine steps ran.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
DRY=0
BUNDLE=0
FETCH=0
BUDGET=""
OUT_DIR="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --bundle) BUNDLE=1 ;;
        --fetch-wheels) FETCH=1 ;;
        --out) OUT_DIR="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu_evidence.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

# ------------------------------------------------------------------------------ --fetch-wheels
# Packages the GPU image (docs: /work/.library/device/KINDS.md) lacks: bitsandbytes (QLoRA),
# deepspeed (ZeRO-2; an sdist, built here without its C++ ops) and its pydantic / hjson,
# segment-anything and pycocotools (imported by the project). The image's python is 3.12.
if [ "$FETCH" = 1 ]; then
    WHL="${WHEEL_DIR:-$ROOT/.whl}"
    mkdir -p "$WHL"
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${plat[@]}" -d "$WHL" \
        "bitsandbytes==$(python3 -c 'import bitsandbytes; print(bitsandbytes.__version__)')" \
        segment-anything pycocotools hjson pydantic pydantic-core annotated-types typing-inspection || exit 1
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" \
        "deepspeed==$(python3 -c 'import deepspeed; print(deepspeed.__version__)')" || exit 1
    ls -la "$WHL"
    echo "carry '.whl' in the device call; this script installs it there (into /tmp/site)"
    exit 0
fi

export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1 && [ "$DRY" = 0 ]; then
    # carried wheels (see --fetch-wheels): installed beside the image's packages, not over them
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$ROOT"/.whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
PY="${PYTHON:-python3}"

if [ "$DRY" = 1 ]; then
    DEV=cpu DIMS=tiny BUDGET="${BUDGET:-540}"
    OUT_DIR="${OUT_DIR:-${TMPDIR:-/tmp}/gpu_evidence_dry_run}"
    export CUDA_VISIBLE_DEVICES=""
else
    DEV=cuda DIMS=7b BUDGET="${BUDGET:-540}"
    OUT_DIR="${OUT_DIR:-benchmarks/results/gpu}"
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [ "$BUNDLE" = 1 ]; then R="$(mktemp -d "${TMPDIR:-/tmp}/gpu_evidence.XXXXXX")"; else R="$OUT_DIR/detail"; fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_evidence_work.XXXXXX")"  # data, runs (not brought back)
rm -rf "$R" && mkdir -p "$R/logs"
: >"$R/steps.jsonl"
START=$SECONDS
echo "gpu_evidence: dry_run=$DRY device=$DEV dims=$DIMS budget=${BUDGET}s results=$OUT_DIR details=$R"

# json_line STEP STATUS SECONDS CAP: append one record to steps.jsonl
json_line() {
    "$PY" - "$@" >>"$R/steps.jsonl" <<'EOF'
import json, sys
step, status, seconds, cap = sys.argv[1:5]
print(json.dumps({"step": step, "status": status, "seconds": int(seconds), "cap_s": int(cap)}))
EOF
}

# reason LOG: the last line of LOG that says what went wrong
reason() {
    local line
    line="$(grep -E 'not measured|Error|error:|Traceback|No such file|not found|Killed' "$1" 2>/dev/null \
        | grep -v -E 'Warning|warn\(|^[WI][0-9]{4} ' | tail -n 1)"
    [ -n "$line" ] || line="$(tail -n 1 "$1" 2>/dev/null)"
    printf '%s' "${line:0:240}" | tr -d '\r' | tr '"' "'"
}

# step NAME CAP CMD...: run CMD under timeout min(CAP, budget left); record ok / not measured
step() {
    local name="$1" cap="$2"; shift 2
    local left=$((BUDGET - (SECONDS - START) - 15))
    local log="$R/logs/$name.log"
    if [ "$left" -lt 10 ]; then
        echo "== $name: not measured: no time left in the ${BUDGET}-s budget"
        json_line "$name" "not measured: no time left in the ${BUDGET}-s budget" 0 "$cap"
        return 0
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "== $name (cap ${cap}s, $((SECONDS - START))s used)"
    local t0=$SECONDS rc status
    # a shell function cannot be exec'd by timeout: run it in a child bash (functions exported below)
    timeout --signal=TERM --kill-after=10 "$cap" bash -c '"$@"' _ "$@" >"$log" 2>&1
    rc=$?
    local took=$((SECONDS - t0))
    case "$rc" in
        0) status="ok" ;;
        124|137) status="not measured: timed out after ${cap} s" ;;
        *) status="not measured: exit $rc: $(reason "$log")" ;;
    esac
    grep -E '^(lora|qlora|zero2|query|prefill|train|recipe|step|[a-z_]+:)' "$log" | tail -n 12
    echo "   -> $status (${took}s)"
    json_line "$name" "$status" "$took" "$cap"
    pack
}

pack() {  # summary + tarball after every step, so a killed run still leaves what it measured
    summarize >"$R/logs/summarize.log" 2>&1 || true
    if [ "$BUNDLE" = 1 ]; then tar -czf "$OUT_DIR/evidence.tar.gz" -C "$R" . 2>/dev/null || true; fi
}

summarize() {  # summary.json + summary.md from steps.jsonl and the steps' JSON files
    "$PY" - "$R" "$OUT_DIR" "$DRY" <<'EOF'
import json, sys
from pathlib import Path

R, OUT, DRY = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


steps = [json.loads(x) for x in (R / "steps.jsonl").read_text().splitlines() if x.strip()]
env = load(R / "env.json") or {}
out = {"dry_run": DRY, "env": env, "steps": steps, "results": {}}
md = ["# GPU evidence (issue 16)" + (" — DRY RUN on CPU at tiny dims: no GPU numbers" if DRY else ""), "",
      f"Device: {env.get('device', 'cpu')}; torch {env.get('torch')}, CUDA {env.get('cuda')}; "
      f"transformers {env.get('transformers')}, peft {env.get('peft')}, accelerate {env.get('accelerate')}, "
      f"bitsandbytes {env.get('bitsandbytes')}, deepspeed {env.get('deepspeed')}.", "",
      "| step | status | seconds (cap) |", "|---|---|---:|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} ({s['cap_s']}) |" for s in steps]
train = {m: load(R / f"train_{m}.json") for m in ("lora", "zero2", "qlora")}
rows = []
for mode, rec in train.items():
    if not rec or "runs" not in rec:
        continue
    out["results"][f"train_{mode}"] = {k: rec[k] for k in ("device_name", "tokens_per_step", "seq", "batch")}
    for key, r in rec["runs"].items():
        gc_ = key.rsplit("_", 1)[-1]
        if r["status"] != "ok":
            rows.append(f"| {mode} | {gc_} | {r['status']} | | | | |")
            continue
        mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        mem = "–" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib'] / 1024:.1f}"
        rows.append(f"| {mode} | {gc_} | {1e3 * r['step_s_median']:.1f} | {r['tokens_per_s']:.0f} "
                    f"| {r['tflops_per_s']:.1f} | {mfu} | {mem} |")
        out["results"][f"train_{mode}"][key] = {k: r[k] for k in
            ("step_s_median", "tokens_per_s", "tflops_per_s", "mfu", "peak_memory_mib")}
if rows:
    rec = next(r for r in train.values() if r and "runs" in r)
    md += ["", f"Training step ({rec['dims']} dims, batch {rec['batch']} x {rec['seq']} tokens, "
           f"FLOPs = {rec['flops_formula']}):", "",
           "| mode | grad. checkpointing | step ms | tokens/s | TFLOP/s | MFU | peak GiB |",
           "|---|---|---:|---:|---:|---:|---:|", *rows]
recipe = load(R / "recipe_summary.json")
if recipe:
    sps = recipe["samples"] / recipe["seconds"] if recipe.get("seconds") else None
    ev = {k: v.get("metrics", v) if isinstance(v, dict) else v for k, v in (recipe.get("eval") or {}).items()}
    out["results"]["recipe"] = {"steps": recipe["steps"], "samples": recipe["samples"],
                                "seconds": recipe["seconds"], "samples_per_s": sps, "eval": ev}
    md += ["", f"Default recipe: {recipe['steps']} steps, {recipe['samples']} samples in "
           f"{recipe['seconds']:.0f} s of training = {sps:.1f} samples/s; final loss {recipe['final_loss']:.3f}; "
           f"eval: {json.dumps(ev)[:600]}"]
for name in ("query_default",):
    for dev in ("cuda", "cpu"):
        rec = load(R / name / f"latency_tiny_{dev}.json")
        if rec and rec.get("query"):
            q = {k: v["total"]["median"] for k, v in rec["query"].items()}
            out["results"][f"{name}_{dev}"] = q
            md.append(f"\nQuery, default model (tiny-synth, random weights), {dev}: "
                      + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in q.items()))
sam = load(R / "query_sam.json")
if sam:
    out["results"]["query_sam"] = sam["devices"]
    md.append("\nQuery, output_mode sam: " + ", ".join(
        f"{d} {1e3 * v['median_s']:.1f} ms" for d, v in sam["devices"].items()))
for label, folder in (("prefill", R), ("prefill, compile", R / "compile")):
    rec = load(next(iter(sorted(folder.glob("latency_*.json"))), folder / "none"))
    if not rec or not rec.get("prefill"):
        continue
    out["results"][label] = {}
    md += ["", f"{label} (median ms / MFU):"]
    for key, rowset in rec["prefill"].items():
        if "skipped" in rowset:
            md.append(f"- {key}: skipped ({rowset['skipped']})")
            continue
        out["results"][label][key] = {n: {"ms": 1e3 * r["timing"]["median"], "mfu": r["mfu"]}
                                      for n, r in rowset.items()}
        md.append(f"- {key}: " + "; ".join(
            f"{n}: {1e3 * r['timing']['median']:.1f} ms"
            + ("" if r["mfu"] is None else f", MFU {100 * r['mfu']:.1f} %") for n, r in rowset.items()))
md += ["", "Details: steps.jsonl, train_*.json, latency_7b.md, latency_compile.md, query_default.md, "
       "query_sam.json, recipe_summary.json, logs/ (in evidence.tar.gz with --bundle)."]
text = "\n".join(md) + "\n"
for folder in {R, OUT}:
    (folder / "summary.md").write_text(text)
    (folder / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
print(text)
EOF
}

needs_cuda() {  # a step that only means something on a GPU
    if [ "$DRY" = 0 ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "not measured: needs CUDA (torch.cuda.is_available() is False)"
        return 1
    fi
}

# ---------------------------------------------------------------------------------------- steps
env_step() {
    { nvidia-smi || echo "nvidia-smi: not found"; } >"$R/nvidia-smi.txt" 2>&1
    "$PY" - "$R/env.json" <<'EOF'
import importlib, json, platform, sys
import torch
info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info |= {"device": torch.cuda.get_device_name(0), "memory_gib": round(p.total_memory / 2**30, 1),
             "multiprocessors": p.multi_processor_count}
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "flash_attn",
             "segment_anything", "pycocotools", "skimage", "mllm_ris"):
    try:
        info[name] = getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001
        info[name] = f"missing: {type(exc).__name__}: {exc}"[:200]
print(json.dumps(info, indent=2))
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
EOF
}

train_step() {  # MODE: lora | qlora | zero2
    local mode="$1" extra=()
    [ "$DRY" = 1 ] && extra=(--device cpu --threads 2 --warmup 1 --steps 2)
    [ "$mode" = qlora ] && extra+=(--tmp "$WORK")
    [ "$mode" = qlora ] && [ "$DRY" = 0 ] && extra+=(--warmup 2 --steps 5)
    needs_cuda || return 1
    if [ "$mode" = zero2 ]; then
        "$PY" -m accelerate.commands.launch --config_file configs/accelerate/deepspeed-zero2.yaml \
            --num_processes 1 --num_machines 1 --main_process_port 29517 \
            benchmarks/bench_gpu_train.py --mode zero2 --dims "$DIMS" --out "$R/train_zero2.json" "${extra[@]}"
    else
        "$PY" benchmarks/bench_gpu_train.py --mode "$mode" --dims "$DIMS" --out "$R/train_$mode.json" "${extra[@]}"
    fi
}

latency_7b_step() {
    needs_cuda || return 1
    if [ "$DRY" = 1 ]; then
        "$PY" benchmarks/bench_latency.py --dims tiny --device cpu --parts query,prefill --quick --threads 2 \
            --doc "$R/latency_7b.md" --results "$R"
    else
        "$PY" benchmarks/bench_latency.py --dims 7b --device cuda --parts query,prefill \
            --attn sdpa,sdpa-flash,flash_attention_2 --compile off --batch 1,16 --warmup 2 --repeats 10 \
            --doc "$R/latency_7b.md" --results "$R"
    fi
}

compile_step() {
    needs_cuda || return 1
    if [ "$DRY" = 1 ]; then
        "$PY" benchmarks/bench_latency.py --dims tiny --device cpu --parts prefill --compile off,on --quick \
            --threads 2 --doc "$R/latency_compile.md" --results "$R/compile"
    else
        "$PY" benchmarks/bench_latency.py --dims 7b --device cuda --parts prefill --layers 4 --vision-layers 2 \
            --attn sdpa --compile off,on --batch 16 --warmup 2 --repeats 10 \
            --doc "$R/latency_compile.md" --results "$R/compile"
    fi
}

recipe_step() {
    # the default recipe = configs/model/tiny-synth.yaml + configs/train/synthref-mllm.yaml (what the
    # bundled model was trained with), on SynthRef (2000 scenes, seed 0, as docs/default_model.md);
    # changes: a time budget, no periodic eval / checkpoints, DataLoader workers, eval on 800 val samples
    # RECIPE_MODEL=configs/model/<new default>.yaml once the bundled model's config changes
    local images=2000 budget=120 workers=4 limit=800
    [ "$DRY" = 1 ] && images=60 budget=20 workers=1 limit=16
    needs_cuda || return 1
    local data="$WORK/synthref"
    [ -f "$data/synthref_meta.json" ] ||
        "$PY" -m mllm_ris.cli make-synthref "$data" --images "$images" --seed 0 --size 128 || return 1
    "$PY" -m mllm_ris.cli train "$RECIPE_MODEL" configs/train/synthref-mllm.yaml \
        "data.train.0.root=$data" "data.val.0.root=$data" "train.output_dir=$WORK/recipe" \
        train.eval_every=0 train.save_every=0 train.tensorboard=false train.overwrite_output_dir=true \
        "data.num_workers=$workers" "eval.limit=$limit" --time-budget "$budget" || return 1
    cp "$WORK/recipe/summary.json" "$R/recipe_summary.json"
    mkdir -p "$R/recipe_eval" && cp -r "$WORK/recipe/eval/." "$R/recipe_eval/" 2>/dev/null
    return 0
}

query_default_step() {  # the default model's architecture (tiny-synth), random weights, forced answer
    local dev=cuda
    [ "$DRY" = 1 ] && dev=cpu
    needs_cuda || return 1
    if [ "$DRY" = 1 ]; then  # the cpu run below is the same run
        "$PY" benchmarks/bench_latency.py --dims tiny --device cpu --parts query --quick --threads 2 \
            --doc "$R/query_default.md" --results "$R/query_default"
        return
    fi
    "$PY" benchmarks/bench_latency.py --dims tiny --device cuda --parts query --warmup 2 --repeats 10 \
        --threads 2 --doc "$R/query_default.md" --results "$R/query_default" || return 1
    CUDA_VISIBLE_DEVICES="" "$PY" benchmarks/bench_latency.py --dims tiny --device cpu --parts query \
        --warmup 2 --repeats 10 --threads 2 --doc "$R/query_default.md" --results "$R/query_default"
}

query_sam_step() {  # output_mode sam with a random SAM ViT-B (1024 px); the dry run uses the tiny SAM
    local variant=vit_b size=1024 devs="cuda cpu"
    [ "$DRY" = 1 ] && variant=tiny size=128 devs="cpu"
    needs_cuda || return 1
    "$PY" - "$variant" "$size" "$R/query_sam.json" $devs <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
import torch
from _perf import photo, query_sample, resized
from _query import make_query_bench, measure_query

variant, size, path, *devices = sys.argv[1:]
torch.set_num_threads(2)
sample = query_sample(resized(photo("astronaut"), 256))
over = ["model.output_mode=sam", f"model.sam.variant={variant}", f"model.sam.img_size={size}"]
out = {"overrides": over, "threads": 2, "image": "skimage astronaut, 256 px", "devices": {}}
for dev in devices:
    qb = make_query_bench("superpixel", over, device=dev, image_size=128)
    reps = 10 if dev == "cuda" else 3
    r = measure_query(qb, sample, warmup=2 if dev == "cuda" else 1, repeats=reps, stages=False)
    out["devices"][dev] = {"median_s": r.total.median, "q1_s": r.total.q1, "q3_s": r.total.q3,
                           "repeats": reps, "text": r.text, "masks": r.masks,
                           "peak_mib": None if r.memory is None else r.memory.peak}
    print(f"query sam {variant} {dev}: {1e3 * r.total.median:.1f} ms ({r.text!r}, {r.masks} mask)")
    del qb
open(path, "w").write(json.dumps(out, indent=2) + "\n")
EOF
}

RECIPE_MODEL="${RECIPE_MODEL:-configs/model/tiny-synth.yaml}"
export DRY DEV DIMS R WORK PY ROOT RECIPE_MODEL
export -f env_step train_step latency_7b_step compile_step recipe_step query_default_step query_sam_step needs_cuda
step env 20 env_step
step train_lora 100 train_step lora
step latency_7b 120 latency_7b_step
step train_zero2 100 train_step zero2
step train_qlora 150 train_step qlora
step recipe 200 recipe_step
step query_default 70 query_default_step
step query_sam 70 query_sam_step
step compile "$([ "$DRY" = 1 ] && echo 150 || echo 90)" compile_step  # CPU inductor: slower
pack
rm -rf "$WORK"
[ "$BUNDLE" = 1 ] && rm -rf "$R"
echo "gpu_evidence: done in $((SECONDS - START)) s; summary: $OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md" 2>/dev/null
