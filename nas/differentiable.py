"""Differentiable search over a space's supernet: `darts`, `gumbel-darts` (NNI) and `dass`.

`dass` adds to the DARTS loop DASS's sparse-aware objective (the supernet's sparse candidates
learn their masks' scores) and a latency term from a `LatencyTable` measured on the target
device through the RPC path: every candidate of every searched choice is compiled on its own
at its real shape in the supernet and timed with the device's protocol. A search ends with
`supernet.derive()`, an arch that the trial loop then trains, compiles and measures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import compile as hw_compile
from hw_profiles.measure import measure_library
from hw_profiles.profiles import Profile
from hw_profiles.rpc import Tracker
from nas.errors import UserError
from search_spaces.data import Dataset
from search_spaces.ops import SparseConv2d
from search_spaces.spaces import Space
from search_spaces.supernet import MixedKernelDepthwise, MixedSparsityConv2d, Supernet

__all__ = [
    "DIFFERENTIABLE_STRATEGIES",
    "DifferentiableSettings",
    "LatencyTable",
    "SearchOutcome",
    "derive_several",
    "differentiable_search",
    "expected_latency",
    "measure_latency_table",
    "mixture_weights",
]

DIFFERENTIABLE_STRATEGIES = ("darts", "gumbel-darts", "dass")
TABLE_VERSION = 1


# --------------------------------------------------------------------------- latency table


@dataclass
class LatencyTable:
    """Per-op latencies (ms) of a supernet's candidates on one device, plus the fixed rest.

    `ms[choice][i]` is the time of candidate i of `choice` (all the supernet's layers that the
    choice mixes, at their real shapes); `signatures[choice][i]` are the arch values that
    candidate sets. A net's predicted latency is `constant_ms` + its candidates' times.
    """

    space: str
    profile: str
    fixed: dict[str, Any]
    candidates: dict[str, list[Any]]
    ms: dict[str, list[float]]
    signatures: dict[str, list[dict[str, Any]]]
    constant_ms: float
    cheapest_arch: dict[str, Any] = field(default_factory=dict)
    cheapest_measured_ms: float = 0.0
    example_shape: list[int] = field(default_factory=list)
    version: int = TABLE_VERSION

    def selected(self, arch: Mapping[str, Any]) -> dict[str, int]:
        """The candidate index of each choice that `arch` uses (the best-matching signature)."""
        picks = {}
        for choice, signatures in self.signatures.items():
            scores = [sum(arch.get(k) == v for k, v in sig.items()) for sig in signatures]
            picks[choice] = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return picks

    def predict(self, arch: Mapping[str, Any]) -> float:
        """Predicted latency (ms) of the net `arch` describes."""
        picks = self.selected(arch)
        return self.constant_ms + sum(self.ms[c][i] for c, i in picks.items())

    def cheapest_ms(self) -> float:
        """The smallest latency the table can predict (every choice at its cheapest)."""
        return self.constant_ms + sum(min(v) for v in self.ms.values())

    def priciest_ms(self) -> float:
        """The largest latency the table can predict."""
        return self.constant_ms + sum(max(v) for v in self.ms.values())

    def expected_latency(self, supernet: Supernet) -> torch.Tensor:
        """sum over choices of softmax(alpha) . ms + constant, differentiable in the logits."""
        return expected_latency(self, supernet)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        return cls(**data)


def expected_latency(
    table: LatencyTable,
    supernet: Supernet,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The supernet's expected latency under its mixture weights (softmax of its logits, or
    `weights` by choice name), as a differentiable scalar tensor in ms."""
    logits = supernet.named_arch_parameters()
    missing = sorted(set(table.ms) - set(logits))
    if missing:
        raise UserError(f"the latency table has choice {missing[0]!r} that the supernet lacks")
    total: torch.Tensor | float = table.constant_ms
    for choice, times in table.ms.items():
        alpha = logits[choice]
        probs = weights[choice] if weights is not None else torch.softmax(alpha, dim=0)
        total = total + (probs * probs.new_tensor(times)).sum()
    return total


def table_key(space: str, fixed: Mapping[str, Any], profile: str, example_shape: Sequence[int]):
    """The cache key of a table: space, fixed choices, profile name and input shape."""
    text = json.dumps(
        [space, dict(sorted(fixed.items())), profile, list(example_shape)], sort_keys=True
    )
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class _OpGroup(nn.Module):
    """Several ops, each on its own input shape, run from one flat input (so one library can
    time them all): slices of the input are reshaped, fed to the ops, outputs concatenated."""

    def __init__(self, ops: Sequence[nn.Module], shapes: Sequence[torch.Size]) -> None:
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.shapes = [tuple(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]

    def example(self) -> torch.Tensor:
        return torch.randn(1, sum(self.sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        start = 0
        for op, shape, size in zip(self.ops, self.shapes, self.sizes, strict=True):
            y = op(x[:, start : start + size].reshape(shape))
            outs.append(y.flatten(1))
            start += size
        return torch.cat(outs, dim=1)


def _mixed_layers(supernet: Supernet, example: torch.Tensor) -> dict[str, list]:
    """Choice name -> [(mixed layer, its input shape)], found by one forward pass."""
    by_alpha = {id(a): name for name, a in supernet.named_arch_parameters().items()}
    found: dict[str, list] = {name: [] for name in by_alpha.values()}
    handles = []
    for module in supernet.modules():
        if isinstance(module, (MixedSparsityConv2d, MixedKernelDepthwise)):
            name = by_alpha[id(module._alpha[0])]

            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                found[name].append((mod, args[0].shape))

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            supernet.eval()(example)
    finally:
        for h in handles:
            h.remove()
    empty = [name for name, layers in found.items() if not layers]
    if empty:
        raise UserError(
            f"the supernet's choice {empty[0]!r} mixes no per-layer op that a latency table can "
            "time (only mbv2-sparse-like supernets are supported): use darts or gumbel-darts"
        )
    return found


def _candidate_layer(mixed: nn.Module, index: int) -> nn.Module:
    """The discrete layer that candidate `index` of a mixed layer stands for."""
    if isinstance(mixed, MixedSparsityConv2d):
        sparsity = mixed.sparsities[index]
        args = (mixed.in_channels, mixed.out_channels, mixed.kernel_size, mixed.stride)
        kwargs = {"padding": mixed.padding, "bias": mixed.bias is not None}
        if sparsity == 0.0:
            return nn.Conv2d(*args, **kwargs)
        layer = SparseConv2d(
            *args, **kwargs, sparsity=sparsity, pattern=mixed.pattern, block=mixed.block
        )
        layer.update_mask()  # by magnitude of random weights: a random mask of the pattern
        return layer
    if isinstance(mixed, MixedKernelDepthwise):
        k = mixed.kernels[index]
        c = mixed.in_channels
        return nn.Conv2d(c, c, k, mixed.stride, k // 2, groups=c, bias=False)
    raise TypeError(f"no discrete candidate for {type(mixed).__name__}")


@contextlib.contextmanager
def _picked(supernet: Supernet, picks: Mapping[str, int]) -> Iterator[None]:
    """Temporarily sets the logits so that each choice in `picks` argmaxes at its index."""
    logits = supernet.named_arch_parameters()
    saved = {name: a.detach().clone() for name, a in logits.items()}
    try:
        with torch.no_grad():
            for name, index in picks.items():
                logits[name].fill_(0.0)
                logits[name][index] = 10.0
        yield
    finally:
        with torch.no_grad():
            for name, a in logits.items():
                a.copy_(saved[name])


def _signatures(supernet: Supernet) -> dict[str, list[dict[str, Any]]]:
    """Per choice and candidate, the arch values that candidate sets (the keys that vary)."""
    base = dict.fromkeys(supernet.arch_names, 0)
    result = {}
    for name, candidates in supernet.arch_candidates.items():
        archs = []
        for i in range(len(candidates)):
            with _picked(supernet, {**base, name: i}):
                archs.append(supernet.derive())
        varying = [k for k in archs[0] if len({json.dumps(a[k]) for a in archs}) > 1]
        result[name] = [{k: a[k] for k in varying} for a in archs]
    return result


def _time_module(
    module: nn.Module, example: torch.Tensor, profile: Profile, tracker: Tracker, what: str
) -> float:
    """Compiles `module` for the profile (checked against torch), measures it, returns ms."""
    module = module.eval()
    try:
        compiled = hw_compile.build(module, example, profile, check=True, tracker=tracker)
    except hw_compile.CompileError as exc:
        raise UserError(f"cannot compile {what} for the latency table: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="hwnas-latency-") as tmp:
        lib = compiled.export_library(Path(tmp) / "op.so")
        m = measure_library(lib, [example.numpy()], profile, tracker)
    if m.error or m.median_ms is None:
        raise UserError(f"measuring {what} on {profile.name} failed: {m.error}")
    return float(m.median_ms)


def measure_latency_table(
    space: Space,
    supernet: Supernet,
    profile: Profile,
    tracker: Tracker,
    example_shape: Sequence[int],
    cache_path: str | Path | None = None,
    *,
    progress: Any = None,
) -> LatencyTable:
    """Times every candidate of every searched choice of `supernet` on the profile's device,
    and the net at every choice's cheapest candidate (whose surplus over the ops is the
    table's constant). Reads/writes `cache_path` (JSON, keyed by space, fixed choices, profile
    and input shape), so a resumed search measures nothing again."""
    fixed = dict(supernet.arch)
    key = table_key(space.name, fixed, profile.name, example_shape)
    cache = _read_cache(cache_path)
    if key in cache:
        return LatencyTable.from_dict(cache[key])
    torch.manual_seed(0)
    example = torch.randn(*example_shape)
    layers = _mixed_layers(supernet, example)
    ms: dict[str, list[float]] = {}
    for name, candidates in supernet.arch_candidates.items():
        ms[name] = []
        for i, candidate in enumerate(candidates):
            group = _OpGroup(
                [_candidate_layer(mixed, i) for mixed, _ in layers[name]],
                [shape for _, shape in layers[name]],
            )
            what = f"{name}={candidate}"
            ms[name].append(_time_module(group, group.example(), profile, tracker, what))
            if progress:
                progress(f"latency table: {what}: {ms[name][-1]:.4f} ms")
    cheapest = {name: min(range(len(v)), key=v.__getitem__) for name, v in ms.items()}
    with _picked(supernet, cheapest):
        arch = supernet.derive()
    torch.manual_seed(0)
    net = space.build(
        arch,
        num_classes=_num_classes(supernet),
        in_channels=example.shape[1],
        image_size=example.shape[-1],
    )
    measured = _time_module(net, example, profile, tracker, "the net at its cheapest ops")
    table = LatencyTable(
        space=space.name,
        profile=profile.name,
        fixed=fixed,
        candidates={n: list(c) for n, c in supernet.arch_candidates.items()},
        ms=ms,
        signatures=_signatures(supernet),
        constant_ms=measured - sum(ms[n][i] for n, i in cheapest.items()),
        cheapest_arch=arch,
        cheapest_measured_ms=measured,
        example_shape=list(example_shape),
    )
    if cache_path is not None:
        cache[key] = table.to_dict()
        path = Path(cache_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    return table


def _num_classes(supernet: Supernet) -> int:
    linears = [m for m in supernet.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features


def _read_cache(cache_path: str | Path | None) -> dict[str, Any]:
    if cache_path is None or not Path(cache_path).exists():
        return {}
    try:
        data = json.loads(Path(cache_path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(
            f"cannot read the latency table cache {cache_path} ({exc}): delete it to re-measure"
        ) from None
    return {k: v for k, v in data.items() if v.get("version") == TABLE_VERSION}


# --------------------------------------------------------------------------- search


@contextlib.contextmanager
def mixture_weights(supernet: Supernet, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block the supernet's mixed ops blend their candidates with `weights` (by
    choice name, each summing to 1) instead of softmax(logits): e.g. Gumbel-softmax samples.

    The mixed ops read their logits from lists they share with the supernet; those entries
    are swapped for log(weights), whose softmax is the weights themselves, and restored.
    """
    logits = supernet.named_arch_parameters()
    swap = {id(logits[name]): torch.log(w.clamp_min(1e-30)) for name, w in weights.items()}
    changed: list[tuple[list, int, Any]] = []
    seen: set[int] = set()
    found: set[int] = set()
    for module in supernet.modules():
        for value in vars(module).values():
            if not isinstance(value, list) or id(value) in seen:
                continue
            seen.add(id(value))
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor) and id(item) in swap:
                    changed.append((value, i, item))
                    found.add(id(item))
                    value[i] = swap[id(item)]
    try:
        if found != set(swap):
            raise RuntimeError("the supernet's mixed ops do not read all of its logits")
        yield
    finally:
        for target, i, item in changed:
            target[i] = item


@dataclass(frozen=True)
class DifferentiableSettings:
    """Hyper-parameters of the bilevel loop (first-order DARTS, as in DASS)."""

    weight_lr: float = 5e-3
    arch_lr: float = 3e-3
    arch_weight_decay: float = 1e-3
    batch_size: int = 64
    temperature: tuple[float, float] = (1.0, 0.1)


@dataclass
class SearchOutcome:
    """A differentiable search's derived arch, its predicted latency and the search's log."""

    arch: dict[str, Any]
    predicted_latency_ms: float | None
    history: list[dict[str, Any]]
    strategy: str = ""
    latency_weight: float = 0.0
    max_latency_ms: float | None = None
    driven_by: str = "hwnas"


def differentiable_search(
    strategy: str,
    space: Space,
    data: Dataset,
    *,
    epochs: int,
    seed: int,
    device: str = "cpu",
    latency_table: LatencyTable | None = None,
    latency_weight: float = 1.0,
    max_latency_ms: float | None = None,
    fixed: Mapping[str, Any] | None = None,
    settings: DifferentiableSettings | None = None,
) -> SearchOutcome:
    """Searches `space`'s supernet on `data` and derives one arch.

    `darts` / `gumbel-darts` are NNI's one-shot DARTS / GumbelDARTS (CE only); `dass` is the
    first-order bilevel loop with loss = CE + latency term: `latency_weight * relu(E[lat] -
    budget) / budget` with `max_latency_ms`, else `latency_weight * E[lat] / reference` (the
    uniform mixture's expected latency). The table must come from the same supernet
    (`fixed` choices and input shape).
    """
    if strategy not in DIFFERENTIABLE_STRATEGIES:
        known = ", ".join(DIFFERENTIABLE_STRATEGIES)
        raise UserError(f"unknown differentiable strategy {strategy!r}: choose one of {known}")
    if epochs < 1:
        raise UserError(f"epochs must be >= 1 for a differentiable search, got {epochs}")
    if max_latency_ms is not None and max_latency_ms <= 0:
        raise UserError(f"max_latency_ms must be > 0, got {max_latency_ms}")
    s = settings or DifferentiableSettings()
    torch.manual_seed(seed)
    image_size = int(data.train_x.shape[-1])
    try:
        supernet = space.supernet(data.num_classes, data.in_channels, image_size, fixed=fixed)
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    _check_table(latency_table, supernet, space)
    train, val = _split(data, seed)
    if strategy in ("darts", "gumbel-darts"):
        from nas.nni_strategies import OneShotSettings, run_nni_oneshot

        probs = run_nni_oneshot(
            strategy,
            supernet,
            train,
            val,
            epochs=epochs,
            seed=seed,
            num_classes=data.num_classes,
            settings=OneShotSettings(s.weight_lr, s.arch_lr, s.batch_size, s.temperature),
        )
        history = [{"epoch": epochs, "probabilities": probs}]
        latency_weight, driven_by = 0.0, "nni"
    else:
        history = _dass_loop(
            supernet,
            train,
            val,
            s,
            epochs,
            seed,
            device,
            latency_table,
            latency_weight,
            max_latency_ms,
        )
        driven_by = "hwnas"
    supernet = supernet.cpu()
    arch = space.validate(supernet.derive())
    predicted = latency_table.predict(arch) if latency_table is not None else None
    return SearchOutcome(
        arch, predicted, history, strategy, latency_weight, max_latency_ms, driven_by
    )


def _check_table(table: LatencyTable | None, supernet: Supernet, space: Space) -> None:
    if table is None:
        return
    if table.space != space.name or table.fixed != dict(supernet.arch):
        raise UserError(
            f"the latency table was measured for {table.space} with other fixed choices: "
            "measure it from this search's supernet"
        )


def _split(data: Dataset, seed: int) -> tuple[tuple, tuple]:
    """The training set halved at random: weights learn on one half, logits on the other."""
    order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))
    half = len(order) // 2
    a, b = order[:half], order[half:]
    return (data.train_x[a], data.train_y[a]), (data.train_x[b], data.train_y[b])


def _dass_loop(
    supernet: Supernet,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    s: DifferentiableSettings,
    epochs: int,
    seed: int,
    device: str,
    table: LatencyTable | None,
    latency_weight: float,
    budget: float | None,
) -> list[dict[str, Any]]:
    """First-order DARTS with DASS's latency-aware objective on the arch step."""
    dev = torch.device(device)
    supernet.to(dev).train()
    w_opt = torch.optim.Adam(supernet.weight_parameters(), lr=s.weight_lr)
    a_opt = torch.optim.Adam(
        supernet.arch_parameters(),
        lr=s.arch_lr,
        betas=(0.5, 0.999),
        weight_decay=s.arch_weight_decay,
    )
    reference = None
    if table is not None:
        with torch.no_grad():
            uniform = {
                n: torch.full_like(a, 1.0 / a.numel())
                for n, a in supernet.named_arch_parameters().items()
            }
            reference = float(expected_latency(table, supernet, uniform))
    g = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        t_order = torch.randperm(len(train[0]), generator=g)
        v_order = torch.randperm(len(val[0]), generator=g)
        steps = max(1, len(t_order) // s.batch_size)
        total_ce = total_lat = 0.0
        for step in range(steps):
            vi = v_order[(step * s.batch_size) % len(v_order) :][: s.batch_size]
            ti = t_order[step * s.batch_size : (step + 1) * s.batch_size]
            # Architecture step on the held-out half.
            a_opt.zero_grad()
            ce = F.cross_entropy(supernet(val[0][vi].to(dev)), val[1][vi].to(dev))
            loss = ce + _latency_term(table, supernet, latency_weight, budget, reference)
            loss.backward()
            a_opt.step()
            # Weight step (weights and mask scores) on the training half.
            w_opt.zero_grad()
            ce_w = F.cross_entropy(supernet(train[0][ti].to(dev)), train[1][ti].to(dev))
            ce_w.backward()
            w_opt.step()
            total_ce += ce_w.item()
            total_lat += (loss - ce).item()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_ce": total_ce / steps,
            "latency_term": total_lat / steps,
            "probabilities": supernet.probabilities(),
        }
        if table is not None:
            with torch.no_grad():
                record["expected_latency_ms"] = float(expected_latency(table, supernet))
        history.append(record)
    return history


def _latency_term(
    table: LatencyTable | None,
    supernet: Supernet,
    weight: float,
    budget: float | None,
    reference: float | None,
) -> torch.Tensor:
    """DASS's latency penalty: over-budget fraction with a budget, else latency / reference."""
    if table is None or weight == 0.0:
        return torch.zeros(())
    lat = expected_latency(table, supernet)
    if budget is not None:
        return weight * F.relu(lat - budget) / budget
    return weight * lat / reference


def derive_several(
    strategy: str,
    space: Space,
    data: Dataset,
    *,
    count: int,
    epochs: int,
    seed: int,
    device: str = "cpu",
    latency_table: LatencyTable | None = None,
    latency_weight: float = 1.0,
    max_latency_ms: float | None = None,
    fixed: Mapping[str, Any] | None = None,
    settings: DifferentiableSettings | None = None,
) -> list[SearchOutcome]:
    """`count` searches, each deriving one arch for the trial loop to evaluate.

    `dass` sweeps the latency budget geometrically from the table's cheapest prediction up
    to `max_latency_ms` (without a budget: from the table's cheapest to its priciest), so
    the archs spread along the latency axis; `darts` / `gumbel-darts` (no latency term) and
    `dass` without a table repeat the search with seeds seed, seed+1, ...
    """
    if count < 1:
        raise UserError(f"count must be >= 1, got {count}")
    budgets: list[float | None] = [max_latency_ms] * count
    if strategy == "dass" and latency_table is not None and count > 1:
        low = latency_table.cheapest_ms()
        high = max_latency_ms or latency_table.priciest_ms()
        low = min(low, high)
        budgets = [low * (high / low) ** (i / (count - 1)) for i in range(count)]
    sweep = strategy == "dass" and latency_table is not None
    return [
        differentiable_search(
            strategy,
            space,
            data,
            epochs=epochs,
            seed=seed if sweep else seed + i,
            device=device,
            latency_table=latency_table,
            latency_weight=latency_weight,
            max_latency_ms=budget,
            fixed=fixed,
            settings=settings,
        )
        for i, budget in enumerate(budgets)
    ]
