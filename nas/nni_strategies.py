"""NNI's random and regularized-evolution strategies as Optuna samplers (the only NNI imports).

NNI's `Strategy.run()` pushes models into an execution engine and blocks until they are
trained there; our loop pulls (`study.ask` -> train, compile, measure -> `study.tell`). So each
`sample_relative` takes one step of NNI's own loop with NNI's own strategy objects: it restores
the strategy's state from the study through NNI's checkpoint interface (`load_state_dict`:
the evolution's population, the dedup history), then asks `Random.random` or
`RegularizedEvolution.random` / `new_individual` for the next sample. The study stays the one
record of every trial, so a resumed run or a fresh sampler continues where the study stands.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from nas.errors import UserError

try:
    with warnings.catch_warnings():
        # NNI 3.0 warns about torch classes it does not know (torch is newer than NNI).
        warnings.simplefilter("ignore")
        from nni.mutable import Categorical, MutableDict
        from nni.nas.execution import SequentialExecutionEngine
        from nni.nas.space import ExecutableModelSpace, RawFormatModelSpace
        from nni.nas.strategy import Random, RegularizedEvolution
        from nni.nas.strategy.evolution import Individual
        from nni.nas.strategy.utils import DeduplicationHelper, RetrySamplingHelper
except ImportError as exc:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None
    # NNI logs every sample at INFO on its own stdout handler; keep our progress lines readable.
    logging.getLogger("nni").setLevel(logging.WARNING)

log = logging.getLogger(__name__)

NNI_STRATEGIES = ("nni-random", "nni-evolution")
SAMPLING_RETRIES = 500  # NNI's own default: tries to find a sample not seen before


@dataclass(frozen=True)
class EvolutionSettings:
    """Regularized (aging) evolution: population, tournament size, mutation and scalarization.

    `mutation_prob=None` mutates each choice with probability 1/len(choices), one change per
    child on average (NNI's 0.05 is meant for spaces with hundreds of choices).
    `latency_weight` is the accuracy a halving of latency is worth, see `scalarize`.
    """

    population_size: int = 8
    sample_size: int = 3
    mutation_prob: float | None = None
    latency_weight: float = 0.05

    def validate(self) -> None:
        if not 1 <= self.sample_size <= self.population_size:
            raise UserError(
                f"evolution sample_size must be in 1..population_size ({self.population_size}),"
                f" got {self.sample_size}"
            )
        if self.mutation_prob is not None and not 0 < self.mutation_prob <= 1:
            raise UserError(f"mutation_prob must be in (0, 1], got {self.mutation_prob}")
        if self.latency_weight < 0:
            raise UserError(f"latency_weight must be >= 0, got {self.latency_weight}")


def scalarize(accuracy: float, latency_ms: float, reference_ms: float, weight: float) -> float:
    """One number for NNI's single-objective evolution: accuracy minus a log-latency penalty.

    score = accuracy - weight * log2(latency_ms / reference_ms). The reference is the median
    latency of the study's complete trials; it shifts every score equally, so the evolution's
    tournaments rank candidates by accuracy and latency ratio only (with weight 0.05, halving
    the latency is worth 5 points of accuracy).
    """
    tiny = 1e-12
    return accuracy - weight * math.log2(max(latency_ms, tiny) / max(reference_ms, tiny))


def nni_model_space(choices: dict[str, Sequence[Any]]) -> ExecutableModelSpace:
    """The space's choices as NNI mutables: one `Categorical` per choice, labelled by its name."""
    if not choices:
        raise ValueError("the space has no choices: nothing to search")
    mutables = MutableDict({name: Categorical(list(v), label=name) for name, v in choices.items()})
    return RawFormatModelSpace(mutables, None)


class NNISampler(optuna.samplers.BaseSampler):
    """An Optuna sampler whose proposals come from one of NNI's NAS strategies.

    `strategy` is "random" (NNI's `Random`) or "evolution" (NNI's `RegularizedEvolution` on
    the scalarized score). Both never repeat an arch of the study until the space runs out,
    then repeat rather than stop. Parameters outside `choices` are sampled at random.
    """

    def __init__(
        self,
        choices: dict[str, Sequence[Any]],
        *,
        strategy: str = "random",
        seed: int = 0,
        evolution: EvolutionSettings | None = None,
    ) -> None:
        _require_nni()
        self._choices = {name: tuple(values) for name, values in choices.items()}
        self._space = nni_model_space(self._choices)
        self._distributions = {
            name: CategoricalDistribution(values) for name, values in self._choices.items()
        }
        self._settings = evolution or EvolutionSettings()
        self._settings.validate()
        self._strategy = self._make_strategy(strategy, seed)
        # A strategy is attached to a space through an engine; ours never receives a model.
        self._strategy.initialize(self._space, SequentialExecutionEngine())
        self._repeat = Random(dedup=False, seed=seed)
        self._independent = optuna.samplers.RandomSampler(seed=seed)
        self.strategy_name = strategy

    def _make_strategy(self, strategy: str, seed: int) -> Random | RegularizedEvolution:
        if strategy == "random":
            return Random(dedup=True, seed=seed)
        if strategy == "evolution":
            s = self._settings
            prob = s.mutation_prob if s.mutation_prob is not None else 1 / len(self._choices)
            return RegularizedEvolution(
                population_size=s.population_size,
                sample_size=s.sample_size,
                mutation_prob=prob,
                dedup=True,
                seed=seed,
            )
        raise UserError(f"unknown NNI strategy {strategy!r}: choose random or evolution")

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return dict(self._distributions)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        others = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.number != trial.number and set(self._choices) <= set(t.params)
        ]
        arch = self.propose(others, study.directions)
        return {name: arch[name] for name in search_space if name in arch}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        self._independent.reseed_rng()

    def propose(
        self, history: Sequence[FrozenTrial], directions: Sequence[StudyDirection]
    ) -> dict[str, Any]:
        """The next arch: NNI's strategy restored to `history` (trials in any state), one step."""
        population = self._restore(history, directions)
        retry = RetrySamplingHelper(SAMPLING_RETRIES)
        if isinstance(self._strategy, RegularizedEvolution):
            # NNI's `_run`: random individuals until the population is full, then mutants.
            if population < self._settings.population_size:
                model = retry.retry(self._strategy.random)
            else:
                model = retry.retry(self._strategy.new_individual)
        else:
            model = retry.retry(self._strategy.random, self._space)
        if model is None:
            log.warning("every arch of the space has been tried: repeating one")
            model = self._repeat.random(self._space)
        return {name: model.sample[name] for name in self._choices}

    def _restore(
        self, history: Sequence[FrozenTrial], directions: Sequence[StudyDirection]
    ) -> int:
        """Loads the study's trials into the strategy as NNI's own checkpoint would.

        Returns the size of the restored population (0 for random search).
        """
        seen = DeduplicationHelper()
        for t in history:
            seen.dedup(self._arch(t))
        state = self._strategy.state_dict()
        state.update(seen.state_dict())
        population: list[Individual] = []
        if isinstance(self._strategy, RegularizedEvolution):
            population = self._population(history, directions)
            state["population"] = population
            state["num_running_models"] = 0
        self._strategy.load_state_dict(state)
        return len(population)

    def _arch(self, trial: FrozenTrial) -> dict[str, Any]:
        return {name: trial.params[name] for name in self._choices}

    def _population(
        self, history: Sequence[FrozenTrial], directions: Sequence[StudyDirection]
    ) -> list[Individual]:
        """The newest `population_size` complete trials, each with its scalar score."""
        complete = sorted(
            (t for t in history if t.state == TrialState.COMPLETE and t.values is not None),
            key=lambda t: t.number,
        )
        if not complete:
            return []
        scores = self.scores(complete, directions)
        recent = list(zip(complete, scores, strict=True))[-self._settings.population_size :]
        return [Individual(self._arch(t), score) for t, score in recent]

    def scores(
        self, trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]
    ) -> list[float]:
        """Each trial's single number for the evolution (higher is better), see `scalarize`."""
        dirs = list(directions)
        if len(dirs) == 1:
            sign = 1.0 if dirs[0] == StudyDirection.MAXIMIZE else -1.0
            return [sign * t.values[0] for t in trials]
        if dirs != [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]:
            raise ValueError(
                "nni-evolution needs a study of one objective or of [maximize accuracy, "
                f"minimize latency], got {[d.name.lower() for d in dirs]}"
            )
        reference = statistics.median(t.values[1] for t in trials)
        weight = self._settings.latency_weight
        return [scalarize(t.values[0], t.values[1], reference, weight) for t in trials]


def make_nni_sampler(
    name: str,
    seed: int,
    choices: dict[str, Sequence[Any]],
    evolution: EvolutionSettings | None = None,
) -> NNISampler:
    """The sampler for `nni-random` or `nni-evolution`, seeded so that a run can be repeated."""
    if name not in NNI_STRATEGIES:
        known = ", ".join(NNI_STRATEGIES)
        raise UserError(f"unknown NNI strategy {name!r}: choose one of {known}")
    return NNISampler(choices, strategy=name.removeprefix("nni-"), seed=seed, evolution=evolution)


def _require_nni() -> None:
    if _IMPORT_ERROR is not None:
        raise UserError(
            f"the nni-* strategies need NNI ({_IMPORT_ERROR}): "
            "pip install 'nni==3.0' 'pytorch-lightning'"
        )


# ---------------------------------------------------------------------------------------------
# One-shot (differentiable) strategies: NNI's DARTS and GumbelDARTS driving our supernets.
#
# Our supernets already hold the weight-sharing mixed ops (`search_spaces.supernet`); NNI's
# built-in mixed layers would rebuild them without the shared sparse scores. So the NNI model
# space is the supernet plus one `_ChoiceSlot` per searched choice (a `Categorical` labelled by
# the choice name). NNI's DARTS turns each slot into a `_MixedSlot` holding NNI's own logits and
# softmax (plain for DARTS, `GumbelSoftmax` with NNI's temperature annealing for GumbelDARTS);
# in the forward pass the mixture weights NNI computes are fed into the supernet's mixed ops.
# NNI's Lightning module runs the first-order bilevel loop and its Adam updates the logits.
# ---------------------------------------------------------------------------------------------

ONESHOT_STRATEGIES = ("darts", "gumbel-darts")

if _IMPORT_ERROR is None:
    import torch
    from torch import nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pytorch_lightning as pl
        from nni.nas.evaluator.pytorch import Classification
        from nni.nas.evaluator.pytorch import DataLoader as NNIDataLoader
        from nni.nas.nn.pytorch import ModelSpace, MutableModule
        from nni.nas.oneshot.pytorch.supermodule.base import BaseSuperNetModule
        from nni.nas.strategy import DARTS, GumbelDARTS

    class _ChoiceSlot(MutableModule):
        """One searched choice of the supernet as an NNI mutable (values: candidate indices)."""

        def __init__(self, label: str, size: int) -> None:
            super().__init__()
            self.label = label
            self.size = size
            self.add_mutable(Categorical(list(range(size)), label=label))

    class _MixedSlot(BaseSuperNetModule):
        """A slot after NNI's mutation: NNI's logits and softmax for one choice."""

        def __init__(self, label: str, alpha: nn.Parameter, softmax: nn.Module) -> None:
            super().__init__()
            self.label = label
            self._arch_alpha = alpha
            self._softmax = softmax

        def weights(self) -> torch.Tensor:
            return self._softmax(self._arch_alpha)

        def arch_parameters(self) -> list[nn.Parameter]:
            return [self._arch_alpha]

        def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
            return {}

        def export(self, memo: dict[str, Any]) -> dict[str, Any]:
            if self.label in memo:
                return {}
            return {self.label: int(torch.argmax(self._arch_alpha.detach()))}

        def export_probs(self, memo: dict[str, Any]) -> dict[str, Any]:
            if self.label in memo:
                return {}
            probs = torch.softmax(self._arch_alpha.detach(), dim=-1).tolist()
            return {self.label: dict(enumerate(probs))}

        @classmethod
        def mutate(
            cls, module: nn.Module, name: str, memo: dict[str, Any], kwargs: dict[str, Any]
        ) -> tuple[BaseSuperNetModule, bool] | None:
            if not isinstance(module, _ChoiceSlot):
                return None
            return cls(module.label, memo[module.label], kwargs["softmax"]), True

    class SupernetModelSpace(ModelSpace):
        """Our supernet as an NNI model space: the net plus one NNI mutable per choice."""

        def __init__(self, supernet: nn.Module) -> None:
            super().__init__()
            self.supernet = supernet
            self.slots = nn.ModuleList(
                _ChoiceSlot(name, len(values)) for name, values in supernet.arch_candidates.items()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            from nas.differentiable import mixture_weights

            if not all(isinstance(s, _MixedSlot) for s in self.slots):
                return self.supernet(x)  # not mutated by a one-shot strategy yet
            weights = {slot.label: slot.weights() for slot in self.slots}
            with mixture_weights(self.supernet, weights):
                return self.supernet(x)

        def nni_logits(self) -> dict[str, torch.Tensor]:
            """NNI's logits by choice name (after the strategy has mutated the space)."""
            return {s.label: s._arch_alpha.detach().clone() for s in self.slots}


@dataclass(frozen=True)
class OneShotSettings:
    """Hyper-parameters of NNI's one-shot run (first-order DARTS, as NNI implements it)."""

    weight_lr: float = 5e-3
    arch_lr: float = 3e-3
    batch_size: int = 64
    temperature: tuple[float, float] = (1.0, 0.1)  # GumbelDARTS: linear from init to min


def run_nni_oneshot(
    name: str,
    supernet: Any,
    train: tuple[Any, Any],
    val: tuple[Any, Any],
    *,
    epochs: int,
    seed: int,
    num_classes: int,
    settings: OneShotSettings | None = None,
) -> dict[str, list[float]]:
    """Runs NNI's `DARTS` (`darts`) or `GumbelDARTS` (`gumbel-darts`) strategy in this process
    on `supernet`: weights on `train`, logits on `val` (each an (x, y) pair of tensors).

    Copies NNI's final logits into the supernet's own (so `supernet.derive()` reads NNI's
    result) and returns NNI's `export_probs` by choice name.
    """
    _require_nni()
    if name not in ONESHOT_STRATEGIES:
        raise UserError(f"unknown one-shot strategy {name!r}: choose darts or gumbel-darts")
    s = settings or OneShotSettings()
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.space import RawFormatModelSpace

    torch.manual_seed(seed)
    space = SupernetModelSpace(supernet)
    generator = torch.Generator().manual_seed(seed)

    def loader(pair: tuple[Any, Any]) -> Any:
        dataset = torch.utils.data.TensorDataset(*pair)
        return NNIDataLoader(dataset, batch_size=s.batch_size, shuffle=True, generator=generator)

    evaluator = Classification(
        learning_rate=s.weight_lr,
        train_dataloaders=loader(train),
        val_dataloaders=loader(val),
        num_classes=num_classes,
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    hooks = [_MixedSlot.mutate]
    if name == "darts":
        strategy = DARTS(mutation_hooks=hooks, arc_learning_rate=s.arch_lr)
    else:
        strategy = GumbelDARTS(
            mutation_hooks=hooks, arc_learning_rate=s.arch_lr, temperature=s.temperature
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.seed_everything(seed, verbose=False)
        with _quiet("lightning.pytorch", "pytorch_lightning", "nni"):
            strategy.initialize(RawFormatModelSpace(space, evaluator), SequentialExecutionEngine())
            strategy.run()
    probs = strategy.oneshot_module.export_probs()
    with torch.no_grad():
        for label, alpha in space.nni_logits().items():
            supernet.named_arch_parameters()[label].copy_(alpha)
    return {label: [p[i] for i in sorted(p)] for label, p in probs.items()}


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Lightning's and NNI's banners and one-shot notices at ERROR only, for the block."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
