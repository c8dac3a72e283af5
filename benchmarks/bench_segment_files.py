"""How many project files one ``mllm-ris segment`` call executes (issue 15's target: at most 25).

Every imported module executes its body, so the project modules in ``sys.modules`` after the call are
the project files that ran code. The call segments a bundled scene with the bundled model into a
temporary folder that is removed afterwards; the script prints the count and the files, nothing else.

    python benchmarks/bench_segment_files.py
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mllm_ris", "s2rm_head")


def segment_files() -> list[str]:
    """The project files (relative to the repository root) imported by one ``mllm-ris segment`` call."""
    from mllm_ris.cli import main

    scene = ROOT / "mllm_ris" / "assets" / "scenes" / "scene_1.png"
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        code = main(["segment", str(scene), "the purple object", "--out", out])
    if code != 0:
        raise SystemExit(f"mllm-ris segment failed (exit code {code})")
    roots = tuple(str(ROOT / name) for name in PACKAGES)
    return sorted(
        str(Path(module.__file__).relative_to(ROOT))
        for module in list(sys.modules.values())
        if getattr(module, "__file__", None) and str(module.__file__).startswith(roots)
    )


def main() -> None:
    """Print the count, then one file per line."""
    files = segment_files()
    print(f"{len(files)} project files executed by `mllm-ris segment`")
    for name in files:
        print(f"  {name}")


if __name__ == "__main__":
    main()
