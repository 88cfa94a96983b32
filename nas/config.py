"""The resolved configuration of one search, kept beside its study to repeat the run."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from nas.errors import UserError


@dataclass(frozen=True)
class SearchConfig:
    """Everything `hwnas search` takes; `out`'s last component names the study."""

    out: str = "runs/demo"
    space: str = "mbv2-sparse"
    strategy: str = "random"
    device: str = "x86-local"
    trials: int = 6
    epochs: int = 2
    dataset: str = "digits"
    tracker: str | None = None
    storage: str | None = None
    workers: int = 1
    seed: int = 0
    train_device: str = "cpu"
    image_size: int = 32
    max_latency_ms: float | None = None
    max_params: int | None = None
    baseline: str | None = None
    budget_minutes: float | None = None
    dense_twin: bool = False
    layer_times: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    @property
    def study_name(self) -> str:
        return self.run_dir.resolve().name

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{(self.run_dir / 'study.db').resolve()}"

    def validate(self) -> None:
        """Checks what can be checked without touching the disk or the network."""
        for name in ("trials", "epochs", "workers"):
            value = getattr(self, name)
            if value <= 0:
                raise UserError(f"--{name} must be a positive number, got {value}")
        for name in ("max_latency_ms", "max_params", "budget_minutes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} must be positive, got {value}: no candidate can meet it")
        if self.train_device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--train-device must be auto, cpu or cuda, got {self.train_device!r}")

    def to_toml(self) -> str:
        """The configuration as TOML; `hwnas search --config FILE` reads it back."""
        lines = ["# hwnas search configuration; run it again with `hwnas search --config FILE`"]
        for key, value in asdict(self).items():
            if value is None:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif not isinstance(value, (int, float)):
                value = _toml_string(str(value))
            lines.append(f"{key} = {value}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, data: dict, source: str = "the configuration") -> SearchConfig:
        data = {key.replace("-", "_"): value for key, value in data.items()}
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(
                f"unknown key(s) {', '.join(unknown)} in {source}: known keys are "
                f"{', '.join(known)}"
            )
        for key, value in data.items():
            expected = _FIELD_TYPES[known[key].type.split("|")[0].strip()]
            wrong_bool = isinstance(value, bool) and expected is not bool
            if value is not None and (wrong_bool or not isinstance(value, expected)):
                raise UserError(f"{key} in {source} must be a {known[key].type}, got {value!r}")
        return cls(**data)

    @classmethod
    def from_toml(cls, path: Path) -> dict:
        """The keys of a configuration file (to merge with the command line's flags)."""
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path} is not valid TOML ({exc}): fix the file") from None
        cls.from_dict(data, source=str(path))  # reject unknown keys before anything runs
        return {key.replace("-", "_"): value for key, value in data.items()}


_FIELD_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
