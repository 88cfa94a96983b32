"""Search strategies behind one interface: each is an Optuna sampler over the space's choices."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import optuna

from nas.errors import UserError

Constraints = Callable[[optuna.trial.FrozenTrial], Sequence[float]] | None


def _random(seed: int, constraints: Constraints) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _tpe(seed: int, constraints: Constraints) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(
        seed=seed, multivariate=True, n_startup_trials=5, constraints_func=constraints
    )


def _nsga2(seed: int, constraints: Constraints) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(
        seed=seed, population_size=8, constraints_func=constraints
    )


STRATEGIES: dict[str, Callable[[int, Constraints], optuna.samplers.BaseSampler]] = {
    "random": _random,
    "tpe": _tpe,
    "nsga2": _nsga2,
}


NNI_STRATEGIES = ("nni-random", "nni-evolution")
# Differentiable strategies derive their archs up front (nas.differentiable) and enqueue them;
# their sampler only serves if those run out.
DIFFERENTIABLE_STRATEGIES = ("darts", "gumbel-darts", "dass")


def make_sampler(
    name: str, seed: int, choices: dict[str, tuple], constraints: Constraints = None
) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for strategy `name` over `choices`, seeded so a run can be repeated.

    `constraints` maps a finished trial to values that are <= 0 when it is feasible.
    """
    if name in DIFFERENTIABLE_STRATEGIES:
        return optuna.samplers.RandomSampler(seed=seed)
    if name in NNI_STRATEGIES:
        from nas.nni_strategies import make_nni_sampler  # NNI takes seconds to import

        return make_nni_sampler(name, seed, choices)
    try:
        factory = STRATEGIES[name]
    except KeyError:
        known = ", ".join((*STRATEGIES, *NNI_STRATEGIES, *DIFFERENTIABLE_STRATEGIES))
        raise UserError(f"unknown strategy {name!r}: choose one of {known}") from None
    return factory(seed, constraints)


def distributions(choices: dict[str, tuple]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The space's choices as Optuna distributions (every choice is a finite set)."""
    return {
        name: optuna.distributions.CategoricalDistribution(values)
        for name, values in choices.items()
    }
