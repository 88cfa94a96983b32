"""compile.export_candidate on a run directory made here: a real Optuna study in SQLite, trial
directories with arch.json and weights.pt of a `tiny-sparse` model, and the exported library
loaded back with the TVM runtime alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import tvm
from tvm import relax

import compile as hw_compile
from search_spaces.spaces import get_space

IMAGE_SIZE = 12
ARCH = {"width": 8, "op": "sparse", "sparsity": 0.75, "block": "4x1", "classifier.sparsity": 0.5}


def _make_run(run_dir: Path) -> torch.nn.Module:
    """A run whose study has trial 0 complete (with artifacts), 1 failed, 2 complete but with
    its weights removed, 3 a repeat of trial 0 (no artifacts of its own)."""
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(
        f'out = "{run_dir}"\nspace = "tiny-sparse"\ndevice = "x86-local"\n'
        f'dataset = "digits"\nimage_size = {IMAGE_SIZE}\n'
    )
    study = optuna.create_study(
        study_name=run_dir.name,
        storage=f"sqlite:///{run_dir / 'study.db'}",
        directions=["maximize", "minimize"],
    )
    study.set_metric_names(["accuracy", "latency_ms"])
    study.set_user_attr("space", "tiny-sparse")
    study.set_user_attr("device", "x86-local")
    torch.manual_seed(0)
    model = get_space("tiny-sparse").build(
        ARCH, num_classes=10, in_channels=1, image_size=IMAGE_SIZE
    )
    for module in model.modules():
        if hasattr(module, "update_mask"):
            module.update_mask()
    model.eval()
    complete = optuna.trial.TrialState.COMPLETE
    attrs = [
        ({"arch": ARCH}, complete, [0.9, 1.0]),
        ({"arch": ARCH, "fail_reason": "TrainingDiverged: NaN loss"}, "FAIL", None),
        ({"arch": ARCH}, complete, [0.5, 2.0]),
        ({"arch": ARCH, "same_as_trial": 0}, complete, [0.9, 1.0]),
    ]
    for number, (user_attrs, state, values) in enumerate(attrs):
        state = optuna.trial.TrialState.FAIL if state == "FAIL" else state
        study.add_trial(
            optuna.trial.create_trial(state=state, values=values, user_attrs=user_attrs)
        )
        if number in (0, 2):
            trial_dir = run_dir / "trials" / str(number)
            trial_dir.mkdir(parents=True)
            (trial_dir / "arch.json").write_text(json.dumps(ARCH))
            if number == 0:
                torch.save(model.state_dict(), trial_dir / "weights.pt")
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    return run_dir, _make_run(run_dir)


def test_export_writes_a_library_the_tvm_runtime_alone_runs(run, tmp_path):
    run_dir, model = run
    out = hw_compile.export_candidate(run_dir, 0, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "arch.json",
        "check.npz",
        "model.so",
        "weights.pt",
    ]
    assert json.loads((out / "arch.json").read_text()) == ARCH
    readme = (out / "README.md").read_text()
    assert "tvm.runtime.load_module" in readme and "relax.VirtualMachine" in readme
    assert f"(1, 1, {IMAGE_SIZE}, {IMAGE_SIZE})" in readme
    assert "The library was compiled for the device" in readme

    lib = tvm.runtime.load_module(str(out / "model.so"))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    x = torch.randn(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    got = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    check = np.load(out / "check.npz")
    assert (
        hw_compile.compare_outputs(
            vm["main"](tvm.runtime.tensor(check["input"])).numpy(), check["output"]
        )
        is None
    )


def test_a_repeated_trial_exports_the_earlier_trials_artifacts(run, tmp_path):
    run_dir, _ = run
    out = hw_compile.export_candidate(run_dir, 3, tmp_path / "export")
    assert (out / "weights.pt").read_bytes() == (run_dir / "trials/0/weights.pt").read_bytes()


@pytest.mark.parametrize(
    ("trial", "error", "message"),
    [
        (7, hw_compile.TrialNotFound, "no trial 7 .trials 0-3."),
        (1, hw_compile.TrialNotExportable, "trial 1 is fail: TrainingDiverged"),
        (2, hw_compile.ArtifactMissing, "weights.pt is missing"),
    ],
)
def test_export_errors_are_one_line_compile_errors(run, tmp_path, trial, error, message):
    run_dir, _ = run
    with pytest.raises(error, match=message) as info:
        hw_compile.export_candidate(run_dir, trial, tmp_path / "export")
    assert isinstance(info.value, hw_compile.CompileError)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "export").exists()


def test_a_directory_without_a_study_is_an_export_error(tmp_path):
    with pytest.raises(hw_compile.ExportError, match="holds no study.db"):
        hw_compile.export_candidate(tmp_path, 0, tmp_path / "export")
