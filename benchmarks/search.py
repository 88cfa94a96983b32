"""The search loop's speed: trials per hour on the defaults and the hardware-in-the-loop
overhead per candidate (compile + upload + measure), from a real `hwnas search` run.

Runs `hwnas search` (mbv2-sparse, random, x86-local, digits) twice into scratch directories and
reads the study's per-trial figures: first with an empty kernel cache (`$HWNAS_CACHE`: built
kernels and kernel timings), as on a new machine, then again with another seed and the cache
the first run filled, as in a longer search. TVM runs one thread (TVM_NUM_THREADS=1, set by
`e2e`). Writes benchmarks/out/search.json and the `## Search loop` section of
benchmarks/RESULTS.md: ``python benchmarks/search.py [--trials 8] [--epochs 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_search(run: Path, trials: int, epochs: int, space: str, seed: int, cache: Path) -> float:
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
            "--seed",
            str(seed),
            "--out",
            str(run),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "HWNAS_CACHE": str(cache)},
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
        "compile_s": [t.user_attrs["compile_s"] for t in fresh],
        "measure_s": [t.user_attrs["measure_s"] for t in fresh],
    }


def write_results(result: dict) -> None:
    m = result["machine"]
    cold, warm = result["cold"], result["warm"]
    rows = [
        ("trials per hour", "trials_per_hour"),
        ("median trial (s)", "median_trial_s"),
        ("median training (s)", "median_train_s"),
        ("median compile + export (s)", "median_compile_s"),
        ("median upload + measure (s)", "median_measure_s"),
        ("**median hardware-in-the-loop overhead (s)**", "median_overhead_s"),
        ("worst overhead (s)", "max_overhead_s"),
        ("failed trials", "failed"),
    ]
    table = "".join(f"| {label} | {cold[key]} | {warm[key]} |\n" for label, key in rows)
    section = (
        "## Search loop (`benchmarks/search.py`)\n\n"
        f"{m['cpu']}, {m['cores']} cores, {m['date']}. `hwnas search --space {result['space']} "
        f"--strategy random --device x86-local --trials {cold['trials']} --epochs "
        f"{result['epochs']}` (digits, a local tracker and rpc_server started by the search; "
        "wall time includes their start and the first imports; TVM on one thread). The "
        "overhead is compile + export + upload + measure.\n\n"
        "| figure | empty kernel cache | cache filled by the first run (another seed) |\n"
        "| --- | ---: | ---: |\n" + table + "\n"
        "An empty cache builds every kernel (parse and compile) and times each sparse layer's "
        "sparse and dense kernel once; both are cached under `$HWNAS_CACHE` "
        "(`~/.cache/hwnas`) and shared by every later candidate, run and worker.\n"
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
    result = {"machine": machine(), "space": args.space, "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch) / "cache"
        for name, seed in (("cold", 0), ("warm", 1)):
            run = Path(scratch) / name
            wall = run_search(run, args.trials, args.epochs, args.space, seed, cache)
            result[name] = summarise(run, wall)
    OUT.mkdir(exist_ok=True)
    (OUT / "search.json").write_text(json.dumps(result, indent=2))
    write_results(result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
