"""NNI's strategies behind Optuna's ask/tell, on toy spaces whose optimum is known."""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from nas.errors import UserError
from nas.nni_strategies import (
    NNI_STRATEGIES,
    EvolutionSettings,
    make_nni_sampler,
    scalarize,
)
from nas.strategies import distributions

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
DIRECTIONS = ["maximize", "minimize"]

# 4 choices of 5 values: accuracy falls with the distance of c0..c2 from TARGET and rises a
# little with c3, but each step of c3 doubles the latency, which costs more than it gains.
TOY = {f"c{i}": tuple(range(5)) for i in range(4)}
TARGET = (3, 1, 2, 0)

Arch = dict[str, int]
Objective = Callable[[Arch], tuple[float, float]]


def toy_objective(arch: Arch) -> tuple[float, float]:
    i = [arch[f"c{k}"] for k in range(4)]
    distance = sum(abs(i[k] - TARGET[k]) for k in range(3))
    return 0.9 - 0.04 * distance + 0.03 * i[3], 2.0 * 2.0 ** i[3]


def ranked_archs(objective: Objective, choices: dict[str, tuple]) -> list[tuple]:
    """Every arch of the space, best first by the documented scalarization."""
    archs = [dict(zip(choices, v, strict=True)) for v in itertools.product(*choices.values())]
    values = [objective(a) for a in archs]
    reference = statistics.median(v[1] for v in values)
    weight = EvolutionSettings().latency_weight
    scores = [scalarize(acc, lat, reference, weight) for acc, lat in values]
    order = sorted(range(len(archs)), key=lambda k: -scores[k])
    return [tuple(archs[k].values()) for k in order]


def search(
    study: optuna.Study, choices: dict[str, tuple], budget: int, objective: Objective
) -> list[tuple]:
    """The trial loop of nas.search without the work: ask an arch, evaluate it, tell."""
    dists = distributions(choices)
    archs = []
    for _ in range(budget):
        trial = study.ask(dists)
        arch = {name: trial.params[name] for name in choices}
        archs.append(tuple(arch.values()))
        try:
            values = objective(arch)
        except RuntimeError:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        study.tell(trial, list(values))
    return archs


def run(
    name: str, seed: int, budget: int, choices: dict = TOY, objective: Objective = toy_objective
) -> list[tuple]:
    sampler = make_nni_sampler(name, seed, choices)
    study = optuna.create_study(directions=DIRECTIONS, sampler=sampler)
    return search(study, choices, budget, objective)


def test_random_proposes_valid_archs_and_covers_the_space() -> None:
    small = {"op": ("dense", "sparse"), "sparsity": (0.5, 0.7, 0.9), "k": (3, 5), "w": (0.5, 1.0)}
    size = 2 * 3 * 2 * 2
    archs = run("nni-random", seed=3, budget=size + 5, choices=small, objective=lambda a: (0.5, 1))
    for arch in archs:
        assert all(v in small[name] for name, v in zip(small, arch, strict=True))
    assert len(set(archs[:size])) == size  # every arch once before any repeats
    assert set(archs[size:]) <= set(archs[:size])  # then repeats instead of stopping


@pytest.mark.parametrize("name", NNI_STRATEGIES)
def test_a_seed_repeats_its_proposals(name: str) -> None:
    first = run(name, seed=7, budget=20)
    assert run(name, seed=7, budget=20) == first
    assert run(name, seed=8, budget=20) != first


def test_evolution_finds_the_optimum_more_often_than_random() -> None:
    ranked = ranked_archs(toy_objective, TOY)
    assert ranked[0] == (*TARGET[:3], 0)
    best, top5 = ranked[0], set(ranked[:5])
    hits: dict[str, list[int]] = {name: [0, 0] for name in NNI_STRATEGIES}
    for name in NNI_STRATEGIES:
        for seed in range(20):
            archs = set(run(name, seed, budget=60))
            hits[name][0] += best in archs
            hits[name][1] += bool(top5 & archs)
    (random_best, random_top5), (evo_best, evo_top5) = hits["nni-random"], hits["nni-evolution"]
    # Random hits the optimum with p = 60/625 per seed (about 2 of 20), evolution about half.
    assert evo_best >= 2 * random_best + 2, hits
    assert evo_top5 > random_top5, hits


def test_a_resumed_study_restores_the_population(tmp_path: Path) -> None:
    """A fresh sampler on a stored study mutates its best trial instead of starting over."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    settings = EvolutionSettings(population_size=8, sample_size=8, mutation_prob=0.05)
    ranked = ranked_archs(toy_objective, TOY)
    for seed in range(3):
        name = f"s{seed}"
        sampler = make_nni_sampler("nni-evolution", seed, TOY, settings)
        study = optuna.create_study(
            study_name=name, storage=storage, directions=DIRECTIONS, sampler=sampler
        )
        first = search(study, TOY, 8, toy_objective)
        resumed = optuna.load_study(study_name=name, storage=storage)
        resumed.sampler = make_nni_sampler("nni-evolution", seed + 8, TOY, settings)
        (child,) = search(resumed, TOY, 1, toy_objective)
        parent = min(first, key=ranked.index)
        changed = sum(a != b for a, b in zip(child, parent, strict=True))
        assert child not in first
        assert 1 <= changed <= 2, (parent, child)


def test_failed_trials_leave_the_population_and_are_not_repeated() -> None:
    def fails_on_c0_zero(arch: Arch) -> tuple[float, float]:
        if arch["c0"] == 0:
            raise RuntimeError("does not compile")
        return toy_objective(arch)

    sampler = make_nni_sampler("nni-evolution", 1, TOY)
    study = optuna.create_study(directions=DIRECTIONS, sampler=sampler)
    archs = search(study, TOY, 40, fails_on_c0_zero)
    states = {t.state for t in study.trials}
    assert optuna.trial.TrialState.FAIL in states and optuna.trial.TrialState.COMPLETE in states
    assert len(set(archs)) == len(archs)


def test_a_single_objective_study_is_searched_on_its_value() -> None:
    sampler = make_nni_sampler("nni-evolution", 0, TOY)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    search(study, TOY, 30, lambda a: (sum(a.values()),))
    assert study.best_value < 4


def test_scalarize_trades_accuracy_for_latency_ratios() -> None:
    assert scalarize(0.8, 3.0, 3.0, 0.05) == pytest.approx(0.8)
    assert scalarize(0.8, 1.5, 3.0, 0.05) == pytest.approx(0.85)
    assert scalarize(0.8, 5.0, 1.0, 0.0) == pytest.approx(0.8)
    # The reference shifts every score equally: rankings do not depend on it.
    for ref in (0.1, 1.0, 10.0):
        assert scalarize(0.80, 1.0, ref, 0.05) > scalarize(0.84, 2.0, ref, 0.05)


def test_bad_names_and_settings_are_user_errors() -> None:
    with pytest.raises(UserError, match="nni-random"):
        make_nni_sampler("nni-tpe", 0, TOY)
    with pytest.raises(UserError, match="sample_size"):
        make_nni_sampler("nni-evolution", 0, TOY, EvolutionSettings(population_size=2))
    sampler = make_nni_sampler("nni-evolution", 0, TOY)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    with pytest.raises(ValueError, match="maximize accuracy"):
        search(study, TOY, 9, toy_objective)


def test_only_nas_nni_strategies_imports_nni() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+nni\b", re.MULTILINE)
    skip = {".venv", ".git", "build", "dist", "node_modules"}
    importers = [
        str(path.relative_to(REPO))
        for path in REPO.rglob("*.py")
        if not skip & set(path.relative_to(REPO).parts)
        and pattern.search(path.read_text(errors="replace"))
    ]
    assert importers == ["nas/nni_strategies.py"]
