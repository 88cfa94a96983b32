"""The resolved configuration of one search, kept beside its study to repeat the run."""

from __future__ import annotations

import json
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
    seed: int = 0
    train_device: str = "cpu"
    image_size: int = 32

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    @property
    def study_name(self) -> str:
        return self.run_dir.resolve().name

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{(self.run_dir / 'study.db').resolve()}"

    def validate(self) -> None:
        """Checks what can be checked without touching the disk or the network."""
        if self.trials <= 0:
            raise UserError(f"--trials must be a positive number, got {self.trials}")
        if self.epochs <= 0:
            raise UserError(f"--epochs must be a positive number, got {self.epochs}")
        if self.train_device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--train-device must be auto, cpu or cuda, got {self.train_device!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> SearchConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown configuration key(s) {', '.join(unknown)}")
        return cls(**data)
