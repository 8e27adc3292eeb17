#!/usr/bin/env bash
# The declared floors, checked: a fresh venv with every direct dependency of pyproject.toml at its lower
# bound (">=X" installed as "==X"; the dev extra's too: test tools, sweep, tensorboard, plot), torch and
# torchvision at their pins (constraints.txt), then the unit tests. `make test-floors`; extra arguments go to pytest.
#   FLOORS_VENV  the venv's folder (default /tmp/diffusion_lab-floors, rebuilt on every run)
#   PYTHON       the interpreter that builds it (default python3, 3.11 or newer to read pyproject.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FLOORS_VENV:-/tmp/diffusion_lab-floors}"
PYTHON="${PYTHON:-python3}"

floors=$("$PYTHON" - <<'EOF'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
pinned = {"torch", "torchvision"}  # constraints.txt


def requirements(reqs):
    """The requirements, with this package's own extras (dev = its sweep, tensorboard, plot) expanded."""
    for req in reqs:
        req = req.split(";")[0].strip()
        name = re.match(r"[A-Za-z0-9_.-]+(\[[^\]]*\])?", req).group(0)
        if name.split("[")[0] == project["name"]:
            for extra in re.findall(r"[A-Za-z0-9_-]+", name.split("[")[1]):
                yield from requirements(extras[extra])
        else:
            yield name, req


for name, req in requirements(project["dependencies"] + extras["dev"]):
    if name.split("[")[0].lower() in pinned:
        continue
    floor = re.search(r">=\s*([^,\s]+)", req)
    if floor is None:
        raise SystemExit(f"{req}: no floor (>=) to check")
    print(f"{name}=={floor.group(1)}")
EOF
)
echo "floors:" $floors

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -c constraints.txt torch torchvision
# shellcheck disable=SC2086  # one argument per requirement
"$VENV/bin/python" -m pip install -q -c constraints.txt $floors
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -m pip check || true  # conflicts among the floors are worth reading, not fatal
"$VENV/bin/python" -m pytest tests/unit -n 0 -q -x -p no:cacheprovider "$@"
