"""Run several ``python -m`` commands one after another in this one process (a test helper).

    python tests/integration/run_many.py SPEC.json OUT.json

SPEC.json: [[module or script.py, [args...]], ...]. Each command runs as ``python -m module args`` (or
``python script.py args``) would (``runpy`` with ``sys.argv`` set), with its stdout and stderr captured and
Hydra's global state cleared after it; OUT.json gets one {"returncode", "stdout", "stderr"} per command. A
process start with torch costs seconds on a small machine: tests that run several short commands pay it once.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
import traceback


def run_one(module: str, args: list[str]) -> dict:
    from hydra.core.global_hydra import GlobalHydra

    out, err = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = [module, *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if module.endswith(".py"):  # a script, as `python path/to/script.py` runs it
                runpy.run_path(module, run_name="__main__")
            else:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 (an uncaught error is what `python -m` would print)
            traceback.print_exc()
            code = 1
    GlobalHydra.instance().clear()
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    spec_path, out_path = sys.argv[1:3]
    specs = json.loads(open(spec_path).read())
    results = [run_one(module, list(args)) for module, args in specs]
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
