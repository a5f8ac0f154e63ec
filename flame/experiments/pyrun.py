"""``python -m flame.experiments.pyrun <trial>/trial.json``: run a python stage's trial.

Imports the stage's ``module:function``, calls it with the trial's values as keyword arguments (and
``trial_folder`` when the function takes it), and writes the returned dict of metrics to the trial's
``summary.json``. An exception prints its traceback and exits 1 (the trial failed); a result that is not
a dict of JSON values is an error too.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        trial = json.load(f)
    folder = os.path.dirname(os.path.abspath(argv[0]))
    module, _, name = trial["values"]["function"].partition(":")
    sys.path.insert(0, os.getcwd())
    fn = getattr(importlib.import_module(module), name)
    kwargs = dict(trial["values"]["kwargs"])
    params = inspect.signature(fn).parameters
    if "trial_folder" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs.setdefault("trial_folder", folder)
    result = fn(**kwargs)
    if not isinstance(result, dict):
        print(
            f"flame: error: {trial['values']['function']} returned {type(result).__name__}, not a dict of metrics",
            file=sys.stderr,
        )
        return 1
    tmp = os.path.join(folder, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, os.path.join(folder, "summary.json"))
    print(f"flame: {trial['values']['function']} returned {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
