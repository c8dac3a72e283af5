"""Helpers shared by the benchmark scripts: machine description, paths, docs sections.

The scripts run as ``python benchmarks/NAME.py`` (so this folder is on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nproc() -> int:
    """CPUs this process may run on (what `nproc` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine() -> str:
    """``"2 CPUs, <model>"`` for results tables."""
    return f"{nproc()} CPUs, {cpu_model()}"


def shown(path: Path) -> Path:
    """``path`` relative to the repository when inside it, so recorded commands run anywhere."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def replace_section(path: Path, name: str, section: str, *, title: str = "# Results") -> None:
    """Put ``section`` between ``<!-- name:begin -->`` / ``<!-- name:end -->`` markers in ``path``.

    The text outside the markers is kept; the section is appended when the markers are absent.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{section.strip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.is_file() else f"{title}\n\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
