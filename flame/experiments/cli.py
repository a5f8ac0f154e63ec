"""``python -m flame.experiment {plan,run,status,report} SPEC.toml``: the experiment command.

Exit codes: 0 done, 2 bad input (one message naming the file, stage and key; nothing started, nothing
in the experiment folder touched), 1 the experiment stopped (max_failures, nothing left to link to),
75 interrupted by SIGTERM/SIGINT after the running trials saved (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import json
import sys

from flame.config.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flame.experiment", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        (
            "plan",
            "the dry run: expand and validate every trial that can be expanded now; print the trials and the launch plan; write nothing",
        ),
        ("run", "run the experiment, or resume it where it stopped"),
        ("status", "every stage and trial: parameters, status, step, metric, folder, each stage's best"),
        ("report", "write <root>/report/ (report.md, report.html, plots, best_<stage>.toml) and <root>/summary.txt"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("spec", help="the experiment TOML (configs/experiments/*.toml)")
        p.add_argument("--launcher", choices=("local", "slurm"), help="overrides [experiment] launcher")
        if name == "status":
            p.add_argument("--watch", action="store_true", help="refresh until the experiment ends (Ctrl-C stops)")
            p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes of --watch")
        if name in ("plan", "status"):
            p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
        elif name == "run":
            p.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    args = parser.parse_args(argv)
    from flame.experiments import api
    from flame.experiments.driver import Interrupted
    from flame.experiments.plan import ExperimentError
    from flame.experiments.status import table

    try:
        if args.command == "run":
            api.run(args.spec, launcher=args.launcher, retry_failed=args.retry_failed)
            return 0
        if args.command == "report":
            from flame.experiments.report import report

            report(args.spec, args.launcher)
            return 0
        if args.command == "status" and args.watch:
            from flame.experiments.live import watch

            exp = api._spec(args.spec, args.launcher)
            return watch(lambda: api.status(exp), exp.root, interval=args.interval)
        result = api.plan(args.spec, args.launcher) if args.command == "plan" else api.status(args.spec, args.launcher)
    except ConfigError as e:
        print(f"flame: error: {e.format()}", file=sys.stderr)
        return 2
    except ExperimentError as e:
        print(f"flame: experiment stopped: {e}", file=sys.stderr)
        return 1
    except Interrupted:
        print(
            "flame: interrupted; running trials saved a checkpoint. Run the same command again to resume.",
            file=sys.stderr,
        )
        return 75
    if args.json:
        print(json.dumps(result, indent=1, default=str))
        return 0
    print(table(result))
    for line in result.get("launch", []):
        print(line)
    return 0
