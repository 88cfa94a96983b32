"""Search strategies behind one interface: each is an Optuna sampler over the space's choices."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from nas.errors import UserError


def _random(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _tpe(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)


def _nsga2(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)


STRATEGIES: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "random": _random,
    "tpe": _tpe,
    "nsga2": _nsga2,
}


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for strategy `name`, seeded so that a run can be repeated."""
    try:
        factory = STRATEGIES[name]
    except KeyError:
        known = ", ".join(STRATEGIES)
        raise UserError(f"unknown strategy {name!r}: choose one of {known}") from None
    return factory(seed)


def distributions(choices: dict[str, tuple]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The space's choices as Optuna distributions (every choice is a finite set)."""
    return {
        name: optuna.distributions.CategoricalDistribution(values)
        for name, values in choices.items()
    }
