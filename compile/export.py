"""`export_candidate`: rebuild one trial of a finished run and write a deployable bundle.

Reads only the run's files (`config.toml`, the Optuna study, `trials/<n>/arch.json` and
`weights.pt`), so it depends on `search_spaces` and `hw_profiles`, never on `nas`.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compile._build import CompiledModel, build
from compile.errors import CompileError

__all__ = [
    "ArtifactMissing",
    "ExportError",
    "RunInfo",
    "TrialNotExportable",
    "TrialNotFound",
    "export_candidate",
    "read_run",
]

CONFIG_FILE = "config.toml"
LIBRARY = "model.so"
# Loading the weights and arch must not need the data set, so the data shape comes from the
# config (image size) and the weights (input channels of the first conv, classes of the last
# layer); a strict load_state_dict then confirms the rebuilt model.
DEFAULT_IMAGE_SIZE = 32


class ExportError(CompileError):
    """A run directory or trial that cannot be exported; the message is one line."""


class TrialNotFound(ExportError):
    """The run's study has no trial with that number."""


class TrialNotExportable(ExportError):
    """The trial did not complete (failed, pruned or still running)."""


class ArtifactMissing(ExportError):
    """The trial's arch.json or weights.pt is missing or unreadable."""


@dataclass(frozen=True)
class RunInfo:
    """What a run directory says about itself: study storage and name, space, devices, image
    size (from `config.toml`, then the study's user attrs)."""

    run_dir: Path
    storage: str
    study_name: str
    space: str
    devices: tuple[str, ...]
    image_size: int


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ExportError(f"{path} is not readable TOML ({exc}): fix or remove it") from None


def read_run(run_dir: str | Path) -> RunInfo:
    """The run's study location and settings; `ExportError` when it holds no study."""
    import optuna

    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    storage = config.get("storage") or f"sqlite:///{(run_dir / 'study.db').resolve()}"
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        raise ExportError(f"{run_dir} holds no study.db: pass the directory of an hwnas run")
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # a corrupt or foreign database
        raise ExportError(
            f"cannot read the study in {storage}: {str(exc).splitlines()[0]}"
        ) from None
    name = run_dir.resolve().name
    if name not in names:
        if len(names) != 1:
            raise ExportError(f"{storage} holds no study named {name!r}: pass the run's directory")
        name = names[0]
    attrs = optuna.load_study(study_name=name, storage=storage).user_attrs
    space = config.get("space") or attrs.get("space")
    device = config.get("device") or attrs.get("device")
    if not space or not device:
        raise ExportError(f"{run_dir} names no space or device (config.toml or study attrs)")
    return RunInfo(
        run_dir=run_dir,
        storage=storage,
        study_name=name,
        space=str(space),
        devices=tuple(d.strip() for d in str(device).split(",") if d.strip()),
        image_size=int(config.get("image_size", DEFAULT_IMAGE_SIZE)),
    )


def _trial_dir(info: RunInfo, trial_number: int) -> tuple[Path, dict[str, Any]]:
    """The directory holding the trial's artifacts (a trial that reused an earlier identical
    arch points at that trial's), and its user attrs."""
    import optuna

    study = optuna.load_study(study_name=info.study_name, storage=info.storage)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(trial_number)
    if trial is None:
        last = max(trials) if trials else None
        have = f"trials 0-{last}" if last is not None else "no trials"
        raise TrialNotFound(f"the study has no trial {trial_number} ({have}): pick another")
    if trial.state != optuna.trial.TrialState.COMPLETE:
        why = trial.user_attrs.get("fail_reason")
        detail = f": {why}" if why else ""
        raise TrialNotExportable(
            f"trial {trial_number} is {trial.state.name.lower()}{detail}; export a completed trial"
        )
    number = int(trial.user_attrs.get("same_as_trial", trial_number))
    return info.run_dir / "trials" / str(number), dict(trial.user_attrs)


def _data_shape(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(input channels, classes): the first 4-D weight's inputs, the last weight's outputs."""
    weights = [(k, v) for k, v in state.items() if k.endswith("weight") and v.dim() >= 2]
    convs = [v for _, v in weights if v.dim() == 4]
    if not convs or not weights:
        raise ArtifactMissing("weights.pt holds no conv and linear weights: not an hwnas model")
    return int(convs[0].shape[1]), int(weights[-1][1].shape[0])


def _load_model(trial_dir: Path, space_name: str, image_size: int) -> torch.nn.Module:
    from search_spaces.spaces import UnknownSpace, get_space

    arch_path, weights_path = trial_dir / "arch.json", trial_dir / "weights.pt"
    for path in (arch_path, weights_path):
        if not path.is_file():
            raise ArtifactMissing(f"{path} is missing: the trial's artifacts were removed")
    try:
        arch = json.loads(arch_path.read_text())
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactMissing(f"cannot read {trial_dir}: {str(exc).splitlines()[0]}") from None
    try:
        space = get_space(space_name)
    except UnknownSpace as exc:
        raise ExportError(f"the run's space is unknown here: {exc}") from None
    in_channels, num_classes = _data_shape(state)
    model = space.build(
        arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactMissing(
            f"{weights_path} does not fit the {space_name} model of arch.json: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return model.eval()


def _readme(info: RunInfo, trial_number: int, profile, compiled: CompiledModel, shape) -> str:
    kind = compiled.target.kind.name
    device = "tvm.cuda(0)" if kind == "cuda" else "tvm.cpu(0)"
    remote_device = "remote.cuda(0)" if kind == "cuda" else "remote.cpu(0)"
    batch_shape = ", ".join(str(d) for d in shape)
    sparse = ", ".join(compiled.sparse_layers) or "none"
    return f"""# hwnas candidate: trial {trial_number} of `{info.study_name}`

Space `{info.space}`, built for device profile `{profile.name}` ({profile.description}).
`model.so` is a TVM {_tvm_version()} Relax library for `{compiled.target.kind.name}` with the
weights inside; layers on our sparse kernels: {sparse}.

Files: `model.so` (the library), `weights.pt` (torch state dict), `arch.json` (the space's
choices), `check.npz` (an input and torch's output on it, to check the library on the device).

## Run it with the TVM runtime alone

Input: float32 NCHW of shape ({batch_shape}), normalised like the training data.
Output: logits of shape {tuple(compiled.output_shape)}.

```python
import numpy as np
import tvm
from tvm import relax

lib = tvm.runtime.load_module("model.so")
dev = {device}
vm = relax.VirtualMachine(lib, dev)
check = np.load("check.npz")
out = vm["main"](tvm.runtime.tensor(check["input"], dev)).numpy()
np.testing.assert_allclose(out, check["output"], rtol=1e-4, atol=1e-4 * abs(check["output"]).max())
```

The library was {"cross-" if compiled.cross_compiler else ""}compiled for the device
(`{profile.name}`); on a board reached through TVM RPC, `remote.upload("model.so")`, then
`relax.VirtualMachine(remote.load_module("model.so"), {remote_device})`.
"""


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


def export_candidate(
    run_dir: str | Path, trial_number: int, out_dir: str | Path, *, device: str | None = None
) -> Path:
    """Rebuild trial `trial_number` of the run in `run_dir` for the run's device profile (or
    `device`, a profile name) and write `model.so`, `weights.pt`, `arch.json`, `check.npz` and
    a `README.md` into `out_dir`; return `out_dir`. Raises `ExportError` subclasses."""
    from hw_profiles.profiles import ProfileError, load_profile

    info = read_run(run_dir)
    trial_dir, _ = _trial_dir(info, trial_number)
    model = _load_model(trial_dir, info.space, info.image_size)
    try:
        profile = load_profile(device or info.devices[0])
    except ProfileError as exc:
        raise ExportError(str(exc)) from None
    in_channels = _data_shape(model.state_dict())[0]
    example = torch.randn(
        1,
        in_channels,
        info.image_size,
        info.image_size,
        generator=torch.Generator().manual_seed(0),
    )
    compiled = build(model, example, profile)  # checked against torch where it runs here
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    compiled.export_library(out_dir / LIBRARY)
    shutil.copyfile(trial_dir / "weights.pt", out_dir / "weights.pt")
    shutil.copyfile(trial_dir / "arch.json", out_dir / "arch.json")
    np.savez(out_dir / "check.npz", input=compiled.example_input, output=compiled.expected_output)
    readme = _readme(info, trial_number, profile, compiled, tuple(example.shape))
    (out_dir / "README.md").write_text(readme)
    return out_dir
