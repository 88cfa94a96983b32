"""The `hwnas` command line: search, report, export, devices, spaces, profiles."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

from nas.config import SearchConfig
from nas.errors import UserError

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"hwnas: error: {message} (see `{self.prog} --help`)\n")


# Exception types that mean bad input, by module. Only the modules already imported are looked
# at (an exception cannot come from a module never imported): importing them all to test one
# error imported torch and TVM, 3.5 s before a one-line error.
_USER_ERRORS = (
    ("hw_profiles.profiles", "ProfileError"),
    ("hw_profiles.rpc", "DeviceError"),
    ("search_spaces.data", "DatasetError"),
    ("search_spaces.spaces", "UnknownSpace"),
    ("reports", "ReportError"),
    ("compile.export", "ExportError"),
)


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, UserError):
        return True
    for module, name in _USER_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return True
    return False


def _cmd_search(args: argparse.Namespace) -> int:
    from nas.search import search
    from reports import write_report

    # Defaults, then the configuration file, then the flags given on the command line.
    values = SearchConfig.from_toml(Path(args.config)) if args.config else {}
    flags = {f.name: getattr(args, f.name, None) for f in fields(SearchConfig)}
    values.update({name: value for name, value in flags.items() if value is not None})
    config = SearchConfig.from_dict(values)
    worker = args.worker_index
    progress = (lambda line: print(line, flush=True)) if worker == 0 else (lambda line: None)
    strategies = [name.strip() for name in config.strategy.split(",")]
    if len(strategies) == 1:
        search(config, progress=progress, worker=worker)
        if worker == 0:
            print(f"report: {write_report(Path(config.out))}")
        return 0
    return _compare_strategies(config, strategies, progress)


def _compare_strategies(
    config: SearchConfig, strategies: list[str], progress: Callable[[str], None]
) -> int:
    """Runs each strategy with the same budget (trials, and minutes when given) into
    `<out>/<strategy>`, then writes one page comparing them."""
    from nas.search import prepare, search
    from reports import write_comparison, write_report

    runs = [
        replace(config, strategy=name, out=str(Path(config.out) / name)) for name in strategies
    ]
    for run in runs:
        prepare(run)  # every strategy's input is checked before any of them starts
    for run in runs:
        progress(f"== {run.strategy}: {run.out}")
        search(run, progress=progress)
        write_report(Path(run.out))
    out = write_comparison([Path(run.out) for run in runs], Path(config.out) / "comparison.html")
    print(f"comparison: {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from reports import write_comparison, write_report

    runs = [Path(run) for run in args.runs]
    if len(runs) == 1:
        out = Path(args.out) if args.out else None
        print(f"report: {write_report(runs[0], out)}")
    else:
        out = Path(args.out) if args.out else Path("comparison.html")
        print(f"comparison: {write_comparison(runs, out)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from compile import export_candidate

    out = export_candidate(Path(args.run), args.trial, Path(args.out), device=args.device)
    print(f"exported trial {args.trial} to {out} (see {out / 'README.md'})")
    return 0


def _cmd_spaces(args: argparse.Namespace) -> int:
    from search_spaces.spaces import get_space, list_spaces

    if args.action == "show":
        if not args.name:
            raise UserError("`hwnas spaces show` needs a space name: see `hwnas spaces list`")
        print(get_space(args.name).describe())
    else:
        for name in list_spaces():
            print(f"{name:16s} {get_space(name).description}")
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    from hw_profiles.devices import format_profile, format_profile_table
    from hw_profiles.profiles import list_profiles, load_profile

    if args.action == "show":
        if not args.name:
            raise UserError(
                "`hwnas profiles show` needs a profile name: see `hwnas profiles list`"
            )
        print(format_profile(load_profile(args.name)))
    else:
        print(format_profile_table([load_profile(name) for name in list_profiles()]))
    return 0


def _tvm_command(module: str, *extra: str) -> int:
    """Runs one of TVM's own RPC programs in the foreground, as a user would (without torch,
    which it does not need: see `hw_profiles.rpc.tool_env`)."""
    from hw_profiles.rpc import tool_env

    cmd = [sys.executable, "-m", module, *extra]
    try:
        return subprocess.call(cmd, env=tool_env())
    except KeyboardInterrupt:
        return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    from hw_profiles.rpc import parse_tracker, tracker_summary

    if args.action == "tracker":
        if args.host == "0.0.0.0":
            print(
                "hwnas: warning: TVM RPC has no authentication; 0.0.0.0 exposes it to the network",
                file=sys.stderr,
            )
        return _tvm_command(
            "tvm.exec.rpc_tracker",
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--port-end",
            str(args.port + 1),
        )
    if args.action == "serve":
        if not args.key:
            raise UserError("`hwnas devices serve` needs --key KEY")
        tracker = parse_tracker(args.tracker)
        return _tvm_command(
            "tvm.exec.rpc_server",
            "--tracker",
            f"{tracker.host}:{tracker.port}",
            "--key",
            args.key,
            "--host",
            args.host,
        )
    if args.action == "emulate":
        from hw_profiles.emulate import serve_emulated

        serve_emulated(args.tracker, key=args.key or "qemu-aarch64", arch=args.arch, cpu=args.cpu)
        return 0
    tracker = parse_tracker(args.tracker)
    if args.action == "list":
        from hw_profiles.devices import format_devices
        from hw_profiles.profiles import list_profiles, load_profile

        summary = tracker_summary(tracker)  # first: an unreachable tracker fails at once
        profiles = [load_profile(name) for name in list_profiles()]
        print(format_devices(summary, profiles, tracker))
        return 0
    if args.action == "check":
        from hw_profiles.devices import check_device, format_check
        from hw_profiles.profiles import load_profile

        if not args.name:
            raise UserError("`hwnas devices check` needs a profile name, e.g. x86-local")
        result = check_device(load_profile(args.name), tracker)
        print(format_check(result))
        return 0 if result.ok else EXIT_INTERNAL
    raise UserError(f"unknown devices action {args.action!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hwnas", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("search", help="search a space for accurate and fast networks")
    s.add_argument("--config", help="a TOML file of these options (flags override it)")
    s.add_argument("--space", help="a search space (hwnas spaces list); default mbv2-sparse")
    s.add_argument(
        "--strategy",
        help="random (default), tpe, nsga2, nni-random, nni-evolution, darts, gumbel-darts, dass",
    )
    s.add_argument("--device", help="a profile name (hwnas profiles list) or a TOML file")
    s.add_argument("--trials", type=int, help="finished trials the study should hold; default 6")
    s.add_argument(
        "--budget-minutes",
        type=float,
        help="stop starting trials after this long; with several --strategy a,b each gets it",
    )
    s.add_argument("--epochs", type=int, help="training epochs per candidate; default 2")
    s.add_argument("--dataset", help="digits (default), cifar10:PATH or folder:PATH")
    s.add_argument("--tracker", help="HOST:PORT of an RPC tracker; default: start one here")
    s.add_argument("--storage", help="an Optuna storage URL; default sqlite in the run directory")
    s.add_argument("--workers", type=int, help="local worker processes sharing the study")
    s.add_argument("--seed", type=int, help="fixes sampling, the data split and initialisation")
    s.add_argument("--train-device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--max-latency-ms", type=float, help="constraint on the measured latency")
    s.add_argument("--max-params", type=int, help="constraint on the parameter count")
    s.add_argument(
        "--baseline",
        help="evaluate each proposed arch's baseline instead: dense, dense-then-prune, random, "
        "random-erk, small-dense or sparse-ift (compare the runs with hwnas report A B)",
    )
    s.add_argument(
        "--dense-twin",
        action="store_true",
        default=None,
        help="also time each candidate built all dense, for its speedup over its dense twin",
    )
    s.add_argument(
        "--layer-times",
        action="store_true",
        default=None,
        help="also time each layer's kernels alone on the device, for the report's per-layer "
        "times (one more timing per layer)",
    )
    s.add_argument("--out", help="run directory; its name names the study; default runs/demo")
    s.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    s.set_defaults(func=_cmd_search)

    r = sub.add_parser("report", help="render a run's HTML report, or compare several runs")
    r.add_argument("runs", nargs="+", help="run directories (the --out of searches)")
    r.add_argument(
        "--out", help="the HTML file; default RUN/report.html, or comparison.html for several"
    )
    r.set_defaults(func=_cmd_report)

    e = sub.add_parser("export", help="a trial's deployable library, weights and how to load it")
    e.add_argument("run", help="the run directory (the --out of a search)")
    e.add_argument("--trial", type=int, required=True, help="the trial number (see the report)")
    e.add_argument("--out", required=True, help="the directory to write")
    e.add_argument("--device", help="a profile of the run; default its first device")
    e.set_defaults(func=_cmd_export)

    d = sub.add_parser("devices", help="run a tracker, serve a device, list or check devices")
    d.add_argument("action", choices=["tracker", "serve", "list", "check", "emulate"])
    d.add_argument("name", nargs="?", help="profile name, for check")
    d.add_argument("--tracker", default="127.0.0.1:9190")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=9190)
    d.add_argument("--key", default=None, help="the RPC key a served device registers under")
    d.add_argument("--arch", default="aarch64", help="emulated architecture (aarch64)")
    d.add_argument("--cpu", default="cortex-a72", help="the emulated board's core, for emulate")
    d.set_defaults(func=_cmd_devices)

    sp = sub.add_parser("spaces", help="list search spaces or show one's choices")
    sp.add_argument("action", nargs="?", default="list", choices=["list", "show"])
    sp.add_argument("name", nargs="?")
    sp.set_defaults(func=_cmd_spaces)

    p = sub.add_parser("profiles", help="list device profiles or show one")
    p.add_argument("action", nargs="?", default="list", choices=["list", "show"])
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_cmd_profiles)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Library deprecation chatter (optuna's experimental APIs, torch.export internals) is
        # not the user's business; -v shows it.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("hwnas: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`hwnas profiles | head`); nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if _is_user_error(exc):
            print(f"hwnas: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


if __name__ == "__main__":
    sys.exit(main())
