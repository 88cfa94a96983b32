"""The report's info from a real Optuna study in sqlite storage, and the HTML rendered from it."""

from __future__ import annotations

import datetime as dt
import random
import re
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState, create_trial

from reports import ReportError, build_info, render_html, write_report
from reports.info import TrialPoint, hypervolume, knee_point, pareto_front

HOSTILE = "<script>alert(1)</script>"
# (accuracy, latency_ms) per completed trial, told in this order.
POINTS = [
    (0.80, 10.0),  # 0 front: fastest
    (0.85, 20.0),  # 1 dominated by 2
    (0.90, 14.0),  # 2 front: the knee of this front
    (0.93, 30.0),  # 3 front
    (0.90, 14.0),  # 4 front: ties with 2
    (0.80, 12.0),  # 5 dominated by 0 (as accurate, slower)
    (0.95, 60.0),  # 6 front: most accurate
]
STUDY_ATTRS = {
    "space": "tiny-cnn",
    "strategy": "optuna-nsga2",
    "device": "x86/local",
    "dataset": "digits",
    "protocol": {"warmup": 2, "repeats": 5},
    "command": f"hwnas search --note '{HOSTILE}'",
    "emulated": True,
}

optuna.logging.set_verbosity(optuna.logging.WARNING)


LAYERS = ["stem.conv", "stage1.conv", f"stage2.{HOSTILE}", "head.fc"]


def _attrs(i: int, accuracy: float, latency: float) -> dict:
    """Trial attrs as nas.search writes them; odd trials also carry the per-layer timings."""
    densities = {name: round(0.2 + 0.2 * j, 2) for j, name in enumerate(LAYERS)}
    attrs = {
        "arch": {"op": "sparse" if i % 2 else "dense", "width": 8 * (i + 1), "note": HOSTILE},
        "params": 1000 + i,
        "nnz": 500 + i,
        "macs": 10_000 * (i + 1),
        "sparse_layers": i % 3,
        "sparse_layer_names": [f"stage{i}.conv"],
        "train_s": 1.0,
        "compile_s": 2.0 + i,
        "measure_s": 0.5,
        "latency_p10_ms": latency * 0.9,
        "latency_p90_ms": latency * 1.2,
        "latency_cv": 0.05,
        "measure_number": 10,
        "measure_repeats": 5,
        "densities": densities,
        "worker": "host:1",
    }
    if i % 2:
        attrs["kernels"] = {
            name: {
                "impl": "sparse" if d < 0.5 else "dense",
                "sparse_ms": latency * d / 2,
                "dense_ms": latency / 4,
            }
            for name, d in densities.items()
        }
        attrs["layer_ms"] = {name: latency / 5 for name in LAYERS}
        attrs["dense_twin_ms"] = latency * 2
        attrs["predicted_latency_ms"] = latency * 1.1
    return attrs


def make_run(root: Path, name: str = "demo", points=POINTS, with_others: bool = True) -> Path:
    """A run directory holding a real study: completed trials, one failure, pruned and running."""
    run = root / name
    run.mkdir(parents=True)
    study = optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{run / 'study.db'}",
        directions=["maximize", "minimize"],
    )
    for key, value in STUDY_ATTRS.items():
        study.set_user_attr(key, value)
    for i, (acc, lat) in enumerate(points):
        study.add_trial(create_trial(values=[acc, lat], user_attrs=_attrs(i, acc, lat)))
    if with_others:
        study.add_trial(
            create_trial(
                state=TrialState.FAIL,
                user_attrs={"arch": {"op": HOSTILE}, "fail_reason": f"OutputMismatch {HOSTILE}"},
            )
        )
        study.add_trial(create_trial(state=TrialState.PRUNED))
        study.add_trial(create_trial(state=TrialState.RUNNING))
    return run


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def test_front_matches_optuna_best_trials(run: Path) -> None:
    info = build_info(run)
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{run / 'study.db'}")
    expected = {t.number for t in study.best_trials}
    assert {p.number for p in info.front} == expected == {0, 2, 3, 4, 6}
    assert {p.number for p in info.trials if p.on_front} == expected
    latencies = [p.latency_ms for p in info.front]
    assert latencies == sorted(latencies)
    assert [p.number for p in info.trials] == list(range(len(POINTS)))


def test_trial_fields_come_from_the_study(run: Path) -> None:
    info = build_info(run)
    third = info.trials[3]
    assert (third.accuracy, third.latency_ms) == POINTS[3]
    assert third.latency_p10_ms < third.latency_ms < third.latency_p90_ms
    assert third.arch["note"] == HOSTILE
    assert (third.params, third.nnz, third.sparse_layers) == (1003, 503, 0)
    assert third.compile_s > info.trials[0].compile_s


def test_knee_is_the_front_point_nearest_the_ideal_corner(run: Path) -> None:
    info = build_info(run)
    assert info.knee is not None and info.knee.number in {2, 4}


def test_knee_needs_three_distinct_front_points() -> None:
    two = [TrialPoint(0, 0.8, 10.0), TrialPoint(1, 0.9, 20.0), TrialPoint(2, 0.9, 20.0)]
    assert knee_point(pareto_front(two)) is None
    bent = two + [TrialPoint(3, 0.7, 1.0), TrialPoint(4, 0.95, 100.0)]
    assert knee_point(pareto_front(bent)).number in {1, 2}


def test_hypervolume_is_monotone_and_grows_only_with_the_front(run: Path) -> None:
    info = build_info(run)
    values = [h.hypervolume for h in info.hypervolume_history]
    assert [h.number for h in info.hypervolume_history] == [p.number for p in info.trials]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == info.hypervolume and 0.0 < info.hypervolume < 1.0
    # Trial 1 is dominated by a later trial but not by trial 0, so it still adds area when told.
    assert values[1] > values[0]
    # Trials 4 (a tie) and 5 (dominated) add nothing.
    assert values[4] == values[3] and values[5] == values[4]
    assert values[6] > values[5]


def test_hypervolume_of_one_point_is_its_box() -> None:
    point = TrialPoint(0, 0.5, 10.0)
    assert hypervolume([point], 11.0, 1.0) == pytest.approx((11.0 - 10.0) * 0.5 / 11.0)
    assert hypervolume([point], 11.0, 1.0) == hypervolume(
        [point, TrialPoint(1, 0.4, 10.5)], 11.0, 1.0
    )


def test_failed_running_pruned_and_attrs(run: Path) -> None:
    info = build_info(run)
    assert [(f.number, f.reason) for f in info.failed] == [
        (len(POINTS), f"OutputMismatch {HOSTILE}")
    ]
    assert (info.n_running, info.n_pruned) == (1, 1)
    assert info.emulated is True
    assert list(info.study_attrs)[:7] == list(STUDY_ATTRS)
    assert info.reference_latency_ms == pytest.approx(60.0 * 1.1)


def test_budget_sums_trial_durations(tmp_path: Path) -> None:
    run = make_run(tmp_path, points=[], with_others=False)
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{run / 'study.db'}")
    start = dt.datetime(2025, 1, 1, 12, 0, 0)
    for i, seconds in enumerate((30, 90)):
        study.add_trial(
            FrozenTrial(
                number=i,
                state=TrialState.COMPLETE,
                value=None,
                values=[0.5 + i / 10, 5.0 - i],
                datetime_start=start,
                datetime_complete=start + dt.timedelta(seconds=seconds),
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values={},
                trial_id=i,
            )
        )
    info = build_info(run)
    assert info.budget_s == pytest.approx(120.0)
    assert [p.duration_s for p in info.trials] == [30.0, 90.0]


def test_bad_run_dirs_raise_report_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no study at"):
        build_info(tmp_path / "missing")
    assert not (tmp_path / "missing" / "study.db").exists()
    run = make_run(tmp_path, name="other", points=POINTS[:1], with_others=False)
    optuna.create_study(
        study_name="second",
        storage=f"sqlite:///{run / 'study.db'}",
        directions=["maximize", "minimize"],
    )
    assert build_info(run).study_name == "other"  # the one named like the directory wins
    renamed = run.rename(tmp_path / "renamed")
    with pytest.raises(ReportError, match="several studies"):
        build_info(renamed)
    optuna.create_study(study_name="single", storage=f"sqlite:///{tmp_path / 'study.db'}")
    with pytest.raises(ReportError, match="directions"):
        build_info(tmp_path)


def test_html_escapes_hostile_strings_and_loads_nothing(run: Path) -> None:
    page = render_html(build_info(run))
    assert HOSTILE not in page
    assert "alert(1)</script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown, as text
    assert page.lower().count("<script") == page.lower().count("</script") == 2
    # The new user strings: a layer name in the detail panel, and the commands.
    assert "data-layer='stage2.&lt;script&gt;" in page
    assert "--note &#x27;&lt;script&gt;" in page
    loads = re.compile(
        r"(?:src|href|action|xlink:href)\s*=\s*['\"]?\s*(?:https?:)?//|"
        r"url\(\s*['\"]?\s*(?:https?:)?//|@import",
        re.IGNORECASE,
    )
    assert not loads.search(page)
    assert not re.search(r"https?://", page)
    assert "emulated-note" in page
    assert len(re.findall(r"<circle class='pt \w+' data-trial=", page)) == len(POINTS)


def test_write_report_defaults_to_the_run_dir(run: Path, tmp_path: Path) -> None:
    path = write_report(run)
    assert path == run / "report.html" and path.read_text(encoding="utf-8").startswith("<!DOCTYPE")
    other = write_report(run, tmp_path / "out" / "r.html")
    assert other.is_file()


def test_report_without_completed_trials(tmp_path: Path) -> None:
    run = make_run(tmp_path, points=[])
    info = build_info(run)
    assert info.trials == [] and info.front == [] and info.knee is None
    assert info.hypervolume == 0.0 and len(info.failed) == 1
    page = render_html(info)
    assert "No completed trials" in page and HOSTILE not in page


def _dominated_area(points: list[TrialPoint], reference: float) -> float:
    """Union of the boxes [latency, reference] x [0, accuracy], by slicing at every latency."""
    cuts = sorted({p.latency_ms for p in points if p.latency_ms < reference} | {reference})
    area = 0.0
    for left, right in zip(cuts, cuts[1:], strict=False):
        height = max((p.accuracy for p in points if p.latency_ms <= left), default=0.0)
        area += (right - left) * height
    return area


def test_hypervolume_equals_the_union_of_dominated_boxes() -> None:
    rng = random.Random(7)
    for _ in range(20):
        points = [
            TrialPoint(i, round(rng.random(), 2), round(rng.uniform(1, 50), 1))
            for i in range(rng.randint(1, 12))
        ]
        reference = max(p.latency_ms for p in points) * 1.1
        expected = _dominated_area(points, reference) / reference
        assert hypervolume(points, reference, 1.0) == pytest.approx(expected)


@pytest.mark.parametrize(
    "points", [[(1.0, 5.0)], [(0.0, 0.5), (0.0, 0.5)], [(0.5, 3.0), (0.7, 3.0), (0.6, 9.0)]]
)
def test_degenerate_studies_render(tmp_path: Path, points: list[tuple[float, float]]) -> None:
    info = build_info(make_run(tmp_path, points=points, with_others=False))
    assert info.front and all(p.on_front for p in info.front)
    page = render_html(info)
    assert len(re.findall(r"<circle class='pt \w+' data-trial=", page)) == len(points)
    outside_templates = re.sub(r"<template.*?</template>", "", page, flags=re.DOTALL)
    svgs = "".join(re.findall(r"<svg.*?</svg>", outside_templates, re.DOTALL))
    # Scatter and hypervolume; the prediction plot too once a trial (every odd one) has one.
    expected = 2 + any(p.predicted_latency_ms is not None for p in info.trials)
    assert svgs.count("<svg") == expected and "nan" not in svgs and "inf" not in svgs
    assert page.count("<template id='detail-") == len(points)


def test_detail_data_per_trial(run: Path) -> None:
    info = build_info(run)
    trials = info.trial_by_number
    plain, timed = trials[2], trials[3]
    # Without `kernels`: layers in model order, sparse exactly where `sparse_layer_names` says.
    assert [layer.name for layer in plain.layers] == LAYERS + ["stage2.conv"]
    assert [layer.impl for layer in plain.layers] == ["dense"] * 4 + ["sparse"]
    assert plain.layers[0].density == pytest.approx(0.2) and plain.layers[-1].density is None
    assert all(layer.chosen_ms is None for layer in plain.layers)
    assert plain.dense_twin_ms is None and plain.dense_speedup is None
    assert plain.prediction_error is None
    # With `kernels` and `layer_ms`: the compiler's choice, its speedup and the device's time.
    by_name = {layer.name: layer for layer in timed.layers}
    stem = by_name["stem.conv"]
    assert stem.impl == "sparse" and stem.sparse_speedup > 1.0
    assert stem.chosen_ms == pytest.approx(timed.latency_ms / 5)  # measured beats the kernel's
    assert by_name["head.fc"].impl == "dense" and by_name["head.fc"].sparse_speedup < 1.0
    assert timed.dense_speedup == pytest.approx(2.0)
    assert timed.prediction_error == pytest.approx(0.1)
    assert (timed.measure_number, timed.measure_repeats, timed.latency_cv) == (10, 5, 0.05)
    # The command that rebuilds the candidate names the run and the trial.
    assert timed.export_command.startswith(f"hwnas export {run} --trial 3 --out ")


def test_repeated_arch_and_odd_attrs(tmp_path: Path) -> None:
    run = make_run(tmp_path, points=POINTS[:1], with_others=False)
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{run / 'study.db'}")
    odd = {"arch": {"w": 1}, "same_as_trial": 0, "densities": [0.5], "kernels": "not json"}
    odd |= {"layer_ms": {"fc": "fast"}, "dense_twin_ms": float("nan")}
    study.add_trial(create_trial(values=[0.5, 1.0], user_attrs=odd))
    repeat = build_info(run).trial_by_number[1]
    assert repeat.same_as_trial == 0 and repeat.dense_twin_ms is None
    assert [(layer.name, layer.chosen_ms) for layer in repeat.layers] == [("fc", None)]
    page = render_html(build_info(run))
    assert "The same arch as trial 0" in page


def test_detail_template_holds_the_trials_data(run: Path) -> None:
    page = render_html(build_info(run))
    templates = dict(re.findall(r"<template id='detail-(\d+)'>(.*?)</template>", page, re.DOTALL))
    assert sorted(map(int, templates)) == list(range(len(POINTS)))
    three = templates["3"]
    assert "<span class='detail-number'>3</span>" in three
    assert "2.00\u00d7" in three and "+10.0%" in three  # speedup and prediction error
    assert three.count("class='layer-row'") == len(LAYERS) + 1
    assert "time-bar" in three and "time-bar" not in templates["2"]  # ms only where timed
    assert "hwnas export" in three and "hwnas search" in three


def test_layer_times_say_where_they_were_measured(tmp_path: Path) -> None:
    run = make_run(tmp_path, points=POINTS[:2], with_others=False)
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{run / 'study.db'}")
    host_only = _attrs(1, 0.9, 10.0)
    del host_only["layer_ms"]
    study.add_trial(create_trial(values=[0.9, 10.0], user_attrs=host_only))
    info = build_info(run)
    device, host = info.trial_by_number[1], info.trial_by_number[2]
    fifth = POINTS[1][1] / 5  # trial 1's layer_ms, as `_attrs` writes them
    assert all(layer.chosen_ms == layer.measured_ms == fifth for layer in device.layers[:4])
    assert all(layer.measured_ms is None for layer in host.layers)
    assert host.layers[0].chosen_ms == host.layers[0].host_ms == host.layers[0].sparse_ms
    page = render_html(info)
    templates = dict(re.findall(r"<template id='detail-(\d+)'>(.*?)</template>", page, re.DOTALL))
    # Device times are drawn alone: the host's timings of the other kernel are not beside them.
    on_device = templates["1"]
    assert "Times measured on the device (x86/local)" in on_device
    assert "time on the device (ms)" in on_device and "on host)" in on_device
    assert "class='alt-bar'" not in on_device
    on_host = templates["2"]
    assert "kernel timings on the build host (compile time), not the device's" in on_host
    assert "time on the build host (ms)" in on_host and "class='alt-bar'" in on_host
    assert "measured on the device" not in on_host and "layer-times" not in templates["0"]


def test_a_fused_1x1_conv_points_to_the_layer_it_was_timed_in(tmp_path: Path) -> None:
    run = make_run(tmp_path, points=POINTS[:1], with_others=False)
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{run / 'study.db'}")
    attrs = _attrs(1, 0.9, 10.0)
    attrs["kernels"]["stage1.conv"]["fused_into"] = "head.fc"
    del attrs["layer_ms"]["stage1.conv"]
    study.add_trial(create_trial(values=[0.9, 10.0], user_attrs=attrs))
    layers = {layer.name: layer for layer in build_info(run).trial_by_number[1].layers}
    assert layers["stage1.conv"].fused_into == "head.fc" and layers["head.fc"].fused_into is None
    assert layers["stage1.conv"].measured_ms is None
    page = render_html(build_info(run))
    detail = re.search(r"<template id='detail-1'>(.*?)</template>", page, re.DOTALL).group(1)
    assert "timed in head.fc" in detail and detail.count("timed in ") == 1


def make_multi_device_run(root: Path, name: str = "multi", device: str = "arm/rpi4") -> Path:
    """A 3-objective study: accuracy and the latency on two devices, which rank differently."""
    run = root / name
    run.mkdir(parents=True)
    study = optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{run / 'study.db'}",
        directions=["maximize", "minimize", "minimize"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["accuracy", "latency_ms:x86/local", f"latency_ms:{device}"])
    study.set_user_attr("device", "x86/local")
    for i, (acc, lat) in enumerate(POINTS):
        # As nas records several devices: each device's figures under `per_device`.
        per_device = {
            "x86/local": {"latency_p10_ms": lat * 0.9, "latency_p90_ms": lat * 1.1},
            device: {"latency_p10_ms": 90 / lat},
        }
        attrs = _attrs(i, acc, lat) | {"per_device": per_device}
        study.add_trial(create_trial(values=[acc, lat, 100.0 / lat], user_attrs=attrs))
    return run


def test_three_objectives_give_one_front_per_device(tmp_path: Path) -> None:
    info = build_info(make_multi_device_run(tmp_path))
    assert [v.device for v in info.devices] == ["x86/local", "arm/rpi4"]
    first, second = info.devices
    assert first.trials is info.trials and {p.number for p in info.front} == {0, 2, 3, 4, 6}
    # On the second device the slowest x86 trial is the fastest: it dominates everything else.
    assert [p.number for p in second.front] == [6]
    assert {p.number for p in second.trials if p.on_front} == {6}
    assert second.trials[3].latency_ms == pytest.approx(100.0 / 30.0)
    assert second.trials[3].latency_p10_ms == pytest.approx(3.0)
    assert info.trials[3].latency_ms == 30.0  # the first device's copy is untouched
    assert info.trials[3].latencies_ms == {"x86/local": 30.0, "arm/rpi4": pytest.approx(100 / 30)}
    assert second.reference_latency_ms == pytest.approx(10.0 * 1.1)
    assert len(second.hypervolume_history) == len(POINTS) and 0 < second.hypervolume <= 1
    page = render_html(info)
    assert "id='scatter'" in page and "id='scatter-1'" in page and "id='scatter-2'" not in page


def test_device_names_are_escaped(tmp_path: Path) -> None:
    info = build_info(make_multi_device_run(tmp_path, device=HOSTILE))
    assert info.devices[1].device == HOSTILE
    page = render_html(info)
    assert HOSTILE not in page and "on &lt;script&gt;alert(1)&lt;/script&gt;" in page
