"""Issue 15's footprint guard: one ``mllm-ris segment`` call executes few project files.

Every imported module runs its body, so the project modules imported by the call are the project files
it executes (``benchmarks/bench_segment_files.py`` lists them; docs/architecture.md gives the number).
A fresh interpreter runs the call, so nothing imported by other tests counts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES = 25  # issue 15 (61, 38 before the one input path, 35 before the folds); lower it, never raise it


def test_segment_executes_at_most_max_files() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_segment_files.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    head, *lines = run.stdout.splitlines()
    files = [line.strip() for line in lines]
    assert int(head.split()[0]) == len(files)
    assert "mllm_ris/cli.py" in files and "mllm_ris/modeling/model.py" in files  # this checkout's code ran
    assert len(files) <= MAX_FILES, "\n".join(files)
    # what the bundled model (output mode prior, no vision tower) never runs is not imported
    unused = {"s2rm_head/heads/fusion.py", "s2rm_head/encoders/pixel.py", "s2rm_head/sam/stage.py"}
    unused |= {f"s2rm_head/{sub}/__init__.py" for sub in ("heads", "encoders", "sam")}  # nor its subpackages
    unused |= {"mllm_ris/modeling/vision.py", "mllm_ris/data/registry.py", "mllm_ris/inference/chat.py"}
    unused |= {"mllm_ris/modeling/lora.py", "mllm_ris/inference/scenes.py"}  # no adapter, no scenes
    assert not unused & set(files)
    # the pipeline prepares its inputs with processing's Processor: no dataset module runs
    assert not [f for f in files if f.startswith("mllm_ris/data/")]
