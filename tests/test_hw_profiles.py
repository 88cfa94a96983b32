"""Profiles: every shipped profile loads and builds its TVM target; bad files and names give a
one-line ProfileError naming the file, line or field."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

from hw_profiles import format_profile, format_profile_table
from hw_profiles.profiles import (
    PATH_ENV,
    SHIPPED_DIR,
    Profile,
    ProfileError,
    Protocol,
    list_profiles,
    load_profile,
)

REQUIRED = {
    "x86/local": None,
    "x86/avx2": None,
    "x86/avx512": "znver4",
    "x86/xeon": None,
    "arm/rpi4": "cortex-a72",
    "arm/rpi5": "cortex-a76",
    "arm/jetson-orin-cpu": None,
    "arm/graviton3": None,
    "arm/qemu-aarch64": "cortex-a72",
}
CUDA_ARCH = {
    "cuda/t4": "sm_75",
    "cuda/a100": "sm_80",
    "cuda/sm86": "sm_86",
    "cuda/jetson-orin": "sm_87",
    "cuda/sm89": "sm_89",
    "cuda/h100": "sm_90",
}


@pytest.fixture(autouse=True)
def _no_user_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PATH_ENV, raising=False)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_required_profiles_are_shipped() -> None:
    names = set(list_profiles())
    assert set(REQUIRED) | set(CUDA_ARCH) <= names


@pytest.mark.parametrize("name", list_profiles())
def test_every_shipped_profile_loads_and_builds_its_target(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.family == name.split("/")[0]
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", profile.key)
    assert profile.description
    target = profile.tvm_target()
    assert target.kind.name == profile.target["kind"]
    assert isinstance(profile.protocol, Protocol)
    assert profile.protocol.repeats >= 1 and profile.protocol.timeout_s > 0
    if profile.family == "cuda":
        assert profile.host is not None and target.host is not None
        assert profile.target["arch"] == CUDA_ARCH.get(name, profile.target["arch"])
    if profile.family == "arm":
        assert profile.target["mtriple"].startswith("aarch64")
        assert profile.cross_compiler and "aarch64" in profile.cross_compiler
    if REQUIRED.get(name):
        assert profile.target["mcpu"] == REQUIRED[name]
    # Loading the file by path gives the same profile as loading it by name.
    by_path = load_profile(profile.source)
    assert (by_path.target, by_path.host, by_path.protocol) == (
        profile.target,
        profile.host,
        profile.protocol,
    )


def test_only_the_emulated_board_is_emulated() -> None:
    emulated = {name for name in list_profiles() if load_profile(name).emulated}
    assert emulated == {"arm/qemu-aarch64"}


def test_local_profile_resolves_the_host_cpu() -> None:
    from tvm.target import codegen

    profile = load_profile("x86-local")
    assert profile.name == "x86/local"
    assert profile.target["mcpu"] == str(codegen.llvm_get_system_cpu()) != "native"
    assert profile.target["num-cores"] == len(os.sched_getaffinity(0))


def test_aliases_are_unique_and_resolve() -> None:
    seen: dict[str, str] = {}
    for name in list_profiles():
        for alias in load_profile(name).aliases:
            assert alias not in seen and alias not in list_profiles(), alias
            seen[alias] = name
            assert load_profile(alias).name == name


def test_profile_survives_a_json_round_trip() -> None:
    profile = load_profile("cuda/jetson-orin")
    data = json.loads(json.dumps(profile.to_dict()))
    again = Profile(
        **{**data, "protocol": Protocol(**data["protocol"]), "aliases": tuple(data["aliases"])}
    )
    assert again == profile


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("x86/locl")
    message = str(info.value)
    assert "x86/local" in message and "hwnas profiles list" in message
    assert "\n" not in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "nope.toml")


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.toml", 'description = "ok"\nkey = \nfamily = "x86"\n')
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(path) in str(info.value) and "line 2" in str(info.value)


MINIMAL = """\
description = "test board"
family = "x86"
key = "test-board"
[target]
kind = "llvm"
"""


def test_minimal_user_file_takes_the_base_protocol(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path / "mine.toml", MINIMAL))
    assert profile.name == "mine" and profile.key == "test-board"
    assert profile.protocol == load_profile("x86/avx2").protocol


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (MINIMAL.replace('key = "test-board"\n', ""), "'key'"),
        (MINIMAL.replace('family = "x86"\n', ""), "'family'"),
        (MINIMAL.replace('kind = "llvm"\n', 'mcpu = "znver4"\n'), "'target.kind'"),
        (MINIMAL.replace('family = "x86"', 'family = "riscv"'), "'family'"),
        (MINIMAL.replace('key = "test-board"', "key = 7"), "'key'"),
        (MINIMAL.replace('key = "test-board"', 'key = "a:b"'), "'key'"),
        (MINIMAL + "[protocol]\nrepeats = 'ten'\n", "'protocol.repeats'"),
        (MINIMAL + "[protocol]\nrepeats = 0\n", "'protocol.repeats'"),
        (MINIMAL + "[protocol]\nmax_cv = true\n", "'protocol.max_cv'"),
        (MINIMAL + "[protocol]\nwarmpu = 3\n", "'protocol.warmpu'"),
        (MINIMAL.replace("[target]", "emulated = 'yes'\n[target]"), "'emulated'"),
        (MINIMAL.replace("[target]", "colour = 'red'\n[target]"), "'colour'"),
        (MINIMAL + 'mcpuu = "znver4"\n', "'target'"),
        (MINIMAL + 'mcpu = "znver99"\n', "'target.mcpu'"),
    ],
)
def test_bad_field_is_named(tmp_path: Path, text: str, field: str) -> None:
    path = _write(tmp_path / "board.toml", text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert field in message and str(path) in message
    assert "\n" not in message


def test_unknown_arm_cpu_suggests_the_right_spelling(tmp_path: Path) -> None:
    text = 'extends = "arm/rpi5"\nkey = "x"\n[target]\nmcpu = "cortex-a67"\n'
    with pytest.raises(ProfileError, match="cortex-a76"):
        load_profile(_write(tmp_path / "pi.toml", text))


def test_extends_inherits_a_board_but_not_its_aliases(tmp_path: Path) -> None:
    text = 'extends = "rpi4"\nkey = "my-pi"\n[protocol]\nrepeats = 3\n'
    profile = load_profile(_write(tmp_path / "my-pi.toml", text))
    rpi4 = load_profile("arm/rpi4")
    assert profile.target == rpi4.target and profile.cross_compiler == rpi4.cross_compiler
    assert profile.key == "my-pi" and profile.protocol.repeats == 3
    assert profile.protocol.cooldown_ms == rpi4.protocol.cooldown_ms
    assert profile.aliases == ()


def test_extends_cycle_and_unknown_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "lab/a.toml", 'extends = "lab/b"\n')
    _write(tmp_path / "lab/b.toml", 'extends = "lab/a"\n')
    monkeypatch.setenv(PATH_ENV, str(tmp_path))
    with pytest.raises(ProfileError, match="cycle"):
        load_profile("lab/a")
    with pytest.raises(ProfileError, match="'extends'.*nope/none"):
        load_profile(_write(tmp_path / "c.toml", 'extends = "nope/none"\n'))


def test_user_directory_adds_and_shadows_profiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(
        tmp_path / "lab/_base.toml",
        'family = "arm"\n[target]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\n',
    )
    _write(
        tmp_path / "lab/board.toml",
        'description = "lab board"\nkey = "lab-1"\n'
        'aliases = ["lab-one"]\n[target]\nmcpu = "cortex-a55"\n',
    )
    _write(
        tmp_path / "arm/rpi4.toml",
        'extends = "arm/_base"\ndescription = "my pi"\n'
        'key = "pi-in-the-lab"\n[target]\nmcpu = "cortex-a72"\n',
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(PATH_ENV, os.pathsep.join([str(empty), str(tmp_path)]))
    assert "lab/board" in list_profiles()
    board = load_profile("lab-one")
    assert board.name == "lab/board" and board.family == "arm"
    assert board.target["mtriple"] == "aarch64-linux-gnu"
    assert load_profile("arm/rpi4").key == "pi-in-the-lab"


def test_format_profile_shows_what_matters() -> None:
    profile = load_profile("cuda/jetson-orin")
    text = format_profile(profile)
    assert profile.name in text and profile.key in text and "sm_87" in text
    assert "aarch64-linux-gnu-g++" in text and "min_repeat_ms" in text
    profiles = [load_profile(n) for n in ("x86/avx2", "arm/rpi4")]
    table = format_profile_table(profiles)
    assert len(table.splitlines()) == 3 and "arm/rpi4" in table


def test_replace_keeps_profile_frozen() -> None:
    profile = load_profile("x86/avx2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.key = "other"  # type: ignore[misc]
    assert SHIPPED_DIR.joinpath("x86", "avx2.toml").is_file()
