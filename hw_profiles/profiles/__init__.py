"""Device profiles: TOML files named `vendor/board`, each merged over its vendor's and the root
`_base.toml`, validated into a frozen `Profile` (TVM target, RPC key, measurement protocol)."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FAMILIES",
    "PATH_ENV",
    "SHIPPED_DIR",
    "Profile",
    "ProfileError",
    "Protocol",
    "list_profiles",
    "load_profile",
    "profile_dirs",
]

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent
PATH_ENV = "HWNAS_PROFILE_PATH"
FAMILIES = ("x86", "arm", "cuda")
_ROOT_BASE = "_base"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FIELDS = (
    "name",
    "description",
    "family",
    "target",
    "host",
    "cross_compiler",
    "key",
    "protocol",
    "emulated",
    "aliases",
    "extends",
)
# Keys a profile never inherits from the file it extends.
_NOT_INHERITED = ("name", "aliases", "extends")


class ProfileError(ValueError):
    """A profile that cannot be found, parsed or validated; the message is one line."""


@dataclass(frozen=True)
class Protocol:
    """How a library is timed: warm-up runs, `number` calibrated to `min_repeat_ms` per repeat,
    `repeats` repeats with `cooldown_ms` between them, re-measured while CV > `max_cv`."""

    warmup: int = 5
    min_repeat_ms: float = 100.0
    repeats: int = 15
    cooldown_ms: float = 0.0
    max_cv: float = 0.05
    remeasure: int = 2
    timeout_s: float = 120.0
    retries: int = 2


@dataclass(frozen=True)
class Profile:
    """One device: its TVM target (and host), how to build for it, where to find it, how to
    time it."""

    name: str
    description: str
    family: str
    target: dict[str, Any]
    host: dict[str, Any] | None
    cross_compiler: str | None
    key: str
    protocol: Protocol
    emulated: bool = False
    aliases: tuple[str, ...] = ()
    source: str = field(default="", compare=False)

    def tvm_target(self) -> Any:
        """The `tvm.target.Target` for this profile, with its host when it has one."""
        import tvm

        if self.host is None:
            return tvm.target.Target(self.target)
        return tvm.target.Target(self.target, host=self.host)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the resolved profile (the `source` path left out)."""
        data = dataclasses.asdict(self)
        data["aliases"] = list(self.aliases)
        data.pop("source")
        return data


# ---------------------------------------------------------------------------------------------
# Finding files


def profile_dirs() -> list[Path]:
    """Directories searched for `<vendor>/<board>.toml`: those in $HWNAS_PROFILE_PATH (in
    order, first wins), then the shipped ones."""
    dirs: list[Path] = []
    for part in os.environ.get(PATH_ENV, "").split(os.pathsep):
        if not part.strip():
            continue
        path = Path(part).expanduser()
        if path.is_dir():
            dirs.append(path)
        else:
            logger.warning("%s names %s, which is not a directory; ignored", PATH_ENV, path)
    dirs.append(SHIPPED_DIR)
    return dirs


def _find_file(name: str) -> Path | None:
    for directory in profile_dirs():
        candidate = directory / f"{name}.toml"
        if candidate.is_file():
            return candidate
    return None


def _catalog() -> tuple[dict[str, Path], dict[str, str]]:
    """Profile names -> file, and aliases -> name, over all search directories."""
    files: dict[str, Path] = {}
    for directory in profile_dirs():
        for path in sorted(directory.glob("*/*.toml")):
            if path.name.startswith("_"):
                continue
            name = f"{path.parent.name}/{path.stem}"
            files.setdefault(name, path)
    aliases: dict[str, str] = {}
    for name, path in files.items():
        for alias in _read_toml(path).get("aliases", []):
            if not isinstance(alias, str):
                continue  # reported when the profile itself is loaded
            if alias in files or (alias in aliases and aliases[alias] != name):
                logger.warning("profile alias '%s' of %s is already taken; ignored", alias, name)
                continue
            aliases[alias] = name
    return files, aliases


def list_profiles() -> list[str]:
    """Names (`vendor/board`) of every profile found, sorted; cheap: nothing is validated."""
    return sorted(_catalog()[0])


def _looks_like_path(name_or_path: str | os.PathLike[str]) -> bool:
    text = os.fspath(name_or_path)
    return text.endswith(".toml") or Path(text).is_file()


# ---------------------------------------------------------------------------------------------
# Reading and merging


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"{path}: invalid TOML: {err}") from None
    except OSError as err:
        raise ProfileError(f"cannot read profile file {path}: {err.strerror}") from None


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parent_file(path: Path, data: dict[str, Any]) -> tuple[Path, str] | None:
    """The file a profile file is merged over: its `extends`, else the `_base.toml` beside it,
    else the shipped root `_base.toml` (which itself has none)."""
    root = SHIPPED_DIR / f"{_ROOT_BASE}.toml"
    if "extends" in data:
        parent = data["extends"]
        if not isinstance(parent, str):
            raise ProfileError(f"{path}: field 'extends' must be a profile name, got {parent!r}")
        files, aliases = _catalog()
        parent = aliases.get(parent, parent)
        found = files.get(parent) or _find_file(parent)
        if found is None:
            raise ProfileError(f"{path}: field 'extends' names unknown profile '{parent}'")
        return found, parent
    if path.resolve() == root:
        return None
    sibling = path.parent / f"{_ROOT_BASE}.toml"
    if path.name != sibling.name and sibling.is_file():
        return sibling, f"{path.parent.name}/{_ROOT_BASE}"
    return root, _ROOT_BASE


def _merged_data(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's table merged over its parent's, recursively."""
    data = _read_toml(path)
    parent = _parent_file(path, data)
    if parent is None:
        return data
    parent_path, parent_name = parent
    if parent_path.resolve() in chain or parent_path.resolve() == path.resolve():
        raise ProfileError(f"{path}: 'extends' forms a cycle through '{parent_name}'")
    inherited = _merged_data(parent_path, (*chain, path.resolve()))
    for key in _NOT_INHERITED:
        inherited.pop(key, None)
    return _merge(inherited, data)


# ---------------------------------------------------------------------------------------------
# Validation


def _require(data: dict[str, Any], key: str, kind: type, where: Path) -> Any:
    if key not in data:
        raise ProfileError(f"{where}: missing field '{key}'")
    value = data[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ProfileError(
            f"{where}: field '{key}' must be {_type_word(kind)}, got {type(value).__name__}"
        )
    return value


def _type_word(kind: type) -> str:
    return {str: "a string", dict: "a table", bool: "true or false", list: "a list"}.get(
        kind, kind.__name__
    )


def _protocol(data: Any, where: Path) -> Protocol:
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: field 'protocol' must be a table")
    names = {f.name: f for f in dataclasses.fields(Protocol)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ProfileError(
            f"{where}: unknown field 'protocol.{unknown[0]}' (known: {', '.join(names)})"
        )
    values: dict[str, Any] = {}
    for name, spec in names.items():
        if name not in data:
            raise ProfileError(f"{where}: missing field 'protocol.{name}'")
        value = data[name]
        wants_int = spec.type == "int"
        ok_type = isinstance(value, int) if wants_int else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type:
            word = "an integer" if wants_int else "a number"
            raise ProfileError(f"{where}: field 'protocol.{name}' must be {word}, got {value!r}")
        lowest = 1 if name == "repeats" else 0
        if value < lowest or (name in ("max_cv", "timeout_s") and value <= 0):
            bound = f">= {lowest}" if name not in ("max_cv", "timeout_s") else "> 0"
            raise ProfileError(f"{where}: field 'protocol.{name}' must be {bound}, got {value}")
        values[name] = value if wants_int else float(value)
    return Protocol(**values)


def _resolve_target(target: dict[str, Any]) -> dict[str, Any]:
    """Replace `mcpu = "native"` by LLVM's host CPU name and `num-cores = "auto"` by the number
    of cores this process may run on."""
    resolved = dict(target)
    if resolved.get("mcpu") == "native" and resolved.get("kind") == "llvm":
        from tvm.target import codegen

        resolved["mcpu"] = str(codegen.llvm_get_system_cpu())
    if resolved.get("num-cores") == "auto":
        resolved["num-cores"] = len(os.sched_getaffinity(0))
    return resolved


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_target(target: dict[str, Any], host: dict[str, Any] | None, where: Path) -> None:
    """Construct the TVM target (this checks option names and types) and check that LLVM knows
    each `mcpu`, which TVM itself accepts silently."""
    import tvm
    from tvm.target import codegen

    for label, spec in (("target", target), ("host", host)):
        if spec is None:
            continue
        try:
            built = tvm.target.Target(spec)
        except Exception as err:  # TVM raises ValueError or its own ffi errors
            first = _first_line(err)
            raise ProfileError(
                f"{where}: field '{label}' is not a valid TVM target: {first}"
            ) from None
        cpu = spec.get("mcpu")
        if spec.get("kind") == "llvm" and isinstance(cpu, str):
            known = [str(c) for c in codegen.llvm_get_cpu_archlist(built)]
            if known and cpu not in known:
                close = difflib.get_close_matches(cpu, known, n=3)
                hint = f" (close: {', '.join(close)})" if close else ""
                triple = spec.get("mtriple", "the host triple")
                raise ProfileError(
                    f"{where}: field '{label}.mcpu' = '{cpu}' is not a CPU LLVM knows for "
                    f"{triple}{hint}"
                )
    if host is not None:
        try:
            tvm.target.Target(target, host=host)
        except Exception as err:
            raise ProfileError(
                f"{where}: target and host do not combine: {_first_line(err)}"
            ) from None


def _validate(name: str, data: dict[str, Any], where: Path) -> Profile:
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ProfileError(f"{where}: unknown field '{unknown[0]}' (known: {', '.join(_FIELDS)})")
    description = _require(data, "description", str, where)
    family = _require(data, "family", str, where)
    if family not in FAMILIES:
        raise ProfileError(
            f"{where}: field 'family' must be one of {', '.join(FAMILIES)}, got '{family}'"
        )
    target = _require(data, "target", dict, where)
    if not isinstance(target.get("kind"), str):
        raise ProfileError(f'{where}: missing field \'target.kind\' (e.g. "llvm" or "cuda")')
    host = data.get("host")
    if host is not None and not isinstance(host, dict):
        raise ProfileError(f"{where}: field 'host' must be a table")
    cross = data.get("cross_compiler")
    if cross is not None and not isinstance(cross, str):
        raise ProfileError(f"{where}: field 'cross_compiler' must be a string")
    key = _require(data, "key", str, where)
    if not _KEY_RE.match(key):
        raise ProfileError(
            f"{where}: field 'key' = '{key}' must be letters, digits, '.', '_' or '-' only"
        )
    emulated = _require(data, "emulated", bool, where) if "emulated" in data else False
    aliases = data.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ProfileError(f"{where}: field 'aliases' must be a list of strings")
    protocol = _protocol(data.get("protocol", {}), where)
    target = _resolve_target(target)
    host = _resolve_target(host) if host is not None else None
    _check_target(target, host, where)
    return Profile(
        name=name,
        description=description,
        family=family,
        target=target,
        host=host,
        cross_compiler=cross,
        key=key,
        protocol=protocol,
        emulated=emulated,
        aliases=tuple(aliases),
        source=str(where),
    )


# ---------------------------------------------------------------------------------------------
# Entry point


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """Load a profile by name (`x86/local`), alias (`x86-local`) or path to a TOML file."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ProfileError(f"profile file not found: {path}")
        data = _merged_data(path)
        name = data.get("name", path.stem)
        if not isinstance(name, str) or not name:
            raise ProfileError(f"{path}: field 'name' must be a non-empty string")
        return _validate(name, data, path)
    text = str(name_or_path)
    files, aliases = _catalog()
    name = aliases.get(text, text)
    if name not in files:
        close = difflib.get_close_matches(text, [*files, *aliases], n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ProfileError(
            f"unknown profile '{text}': {hint}(`hwnas profiles list` shows all; "
            "a path to a .toml file also works)"
        )
    data = _merged_data(files[name])
    data.pop("name", None)
    return _validate(name, data, files[name])
