"""Run many ``kdexp.train`` command lines in one process (one import of torch and Lightning).

Usage: ``python tests/cli_cases.py CASES.json RESULTS.json``; each case is a list of
command-line arguments. Every case runs through the real entry point, ``kdexp.train.main``,
as the console script does; its exit code and everything it printed on stderr are
collected. Used by the bad-input table test, which would otherwise pay ~5 s of imports
per case.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys


def run_case(argv: list[str]) -> dict:
    from hydra.core.global_hydra import GlobalHydra

    import kdexp.train as train

    GlobalHydra.instance().clear()
    train._task_started = False
    sys.argv = ["kdexp-train", *argv]
    stderr = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stderr):
        try:
            train.main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException as err:  # a crash the entry point let through
            import traceback

            stderr.write("Traceback (uncaught)\n" + "".join(traceback.format_exception(err)))
            code = 1
    return {"argv": argv, "code": code, "stderr": stderr.getvalue()}


if __name__ == "__main__":
    cases_path, results_path = sys.argv[1], sys.argv[2]  # run_case rewrites sys.argv
    results = [run_case(argv) for argv in json.loads(open(cases_path).read())]
    with open(results_path, "w") as f:
        json.dump(results, f)
