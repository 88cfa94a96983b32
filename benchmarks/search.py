"""The search loop's speed: trials per hour on the defaults and the hardware-in-the-loop
overhead per candidate (compile + upload + measure), from a real `hwnas search` run.

Runs `hwnas search` (mbv2-sparse, random, x86-local, digits) into a scratch directory and reads
the study's per-trial figures; TVM runs one thread (TVM_NUM_THREADS=1, set by `e2e`). Writes
benchmarks/out/search.json and the `## Search loop` section of benchmarks/RESULTS.md:
``python benchmarks/search.py [--trials 8] [--epochs 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).parent))
from e2e import machine  # noqa: E402

OUT = Path(__file__).parent / "out"
RESULTS = Path(__file__).parent / "RESULTS.md"


def run_search(run: Path, trials: int, epochs: int, space: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "nas.cli",
            "search",
            "--space",
            space,
            "--trials",
            str(trials),
            "--epochs",
            str(epochs),
            "--out",
            str(run),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def summarise(run: Path, wall_s: float) -> dict:
    study = optuna.load_study(study_name=run.name, storage=f"sqlite:///{run / 'study.db'}")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    fresh = [t for t in trials if "same_as_trial" not in t.user_attrs]

    def median(key: str) -> float:
        return statistics.median(t.user_attrs[key] for t in fresh)

    overhead = [t.user_attrs["compile_s"] + t.user_attrs["measure_s"] for t in fresh]
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    return {
        "trials": len(trials),
        "wall_s": round(wall_s, 1),
        "trials_per_hour": round(3600 * len(trials) / wall_s, 1),
        "median_trial_s": round(statistics.median(durations), 2),
        "median_train_s": round(median("train_s"), 2),
        "median_compile_s": round(median("compile_s"), 2),
        "median_measure_s": round(median("measure_s"), 2),
        "median_overhead_s": round(statistics.median(overhead), 2),
        "max_overhead_s": round(max(overhead), 2),
        "failed": len(study.get_trials(states=(optuna.trial.TrialState.FAIL,))),
    }


def write_results(result: dict) -> None:
    r = result["search"]
    m = result["machine"]
    section = (
        "## Search loop (`benchmarks/search.py`)\n\n"
        f"{m['cpu']}, {m['cores']} cores, {m['date']}. `hwnas search --space {result['space']} "
        f"--strategy random --device x86-local --trials {r['trials']} --epochs "
        f"{result['epochs']}` (digits, a local tracker and rpc_server started by the search; "
        "wall time includes their start and the first imports; TVM on one thread).\n\n"
        "| figure | value |\n| --- | ---: |\n"
        f"| trials per hour | {r['trials_per_hour']} |\n"
        f"| median trial (s) | {r['median_trial_s']} |\n"
        f"| median training (s) | {r['median_train_s']} |\n"
        f"| median compile (s) | {r['median_compile_s']} |\n"
        f"| median upload + measure (s) | {r['median_measure_s']} |\n"
        f"| median hardware-in-the-loop overhead, compile + measure (s) | "
        f"{r['median_overhead_s']} |\n"
        f"| worst overhead (s) | {r['max_overhead_s']} |\n"
        f"| failed trials | {r['failed']} |\n\n"
        "The compile time includes timing each sparse layer's sparse and dense kernel on the "
        "first build of a shape (cached in `~/.cache/hwnas/kernel_times.json` afterwards).\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    marker = "## Search loop"
    if marker in text:
        head, _, tail = text.partition(marker)
        rest = tail.split("\n## ", 1)
        text = head + section + ("\n## " + rest[1] if len(rest) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--space", default="mbv2-sparse")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "bench"
        wall = run_search(run, args.trials, args.epochs, args.space)
        result = {
            "machine": machine(),
            "space": args.space,
            "epochs": args.epochs,
            "search": summarise(run, wall),
        }
    OUT.mkdir(exist_ok=True)
    (OUT / "search.json").write_text(json.dumps(result, indent=2))
    write_results(result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
