"""Several runs compared on one page: a common reference point, one series per run."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
from test_reports import HOSTILE, POINTS, make_run

from reports import (
    ReportError,
    build_comparison_info,
    build_info,
    render_comparison_html,
    write_comparison,
)

# Every trial of the worse run is less accurate and slower than its twin in the better run.
WORSE = [(acc - 0.05, lat * 1.3) for acc, lat in POINTS]


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        make_run(tmp_path, "better"),
        make_run(tmp_path, "worse", points=WORSE, with_others=False),
    ]


def _set_attr(run: Path, key: str, value: object) -> None:
    study = optuna.load_study(study_name=run.name, storage=f"sqlite:///{run / 'study.db'}")
    study.set_user_attr(key, value)


def test_common_reference_makes_the_curves_compare(runs: list[Path]) -> None:
    info = build_comparison_info(runs)
    slowest = max(lat for _, lat in POINTS + WORSE)
    assert info.reference_latency_ms == pytest.approx(slowest * 1.1)
    better, worse = info.runs
    assert (better.label, worse.label) == ("better", "worse")
    for run in info.runs:
        values = [h.hypervolume for h in run.hypervolume_history]
        assert [h.number for h in run.hypervolume_history] == [p.number for p in run.info.trials]
        assert all(b >= a for a, b in zip(values, values[1:], strict=False))
        assert run.hypervolume == values[-1]
    assert better.hypervolume > worse.hypervolume
    # Trial for trial, the better run's front dominates the worse run's.
    for b, w in zip(better.hypervolume_history, worse.hypervolume_history, strict=True):
        assert b.hypervolume > w.hypervolume
    # The worse run holds the slowest trial, so its own reference is the common one ...
    assert worse.hypervolume == pytest.approx(worse.info.hypervolume)
    # ... while the better run's own, nearer reference gives another number.
    assert better.hypervolume != pytest.approx(better.info.hypervolume)
    assert (better.n_trials, worse.n_trials) == (len(POINTS) + 1, len(POINTS))
    assert better.most_accurate.number == 6 and better.fastest.number == 0
    assert info.warnings == []


def test_comparison_page_has_one_series_per_run(runs: list[Path], tmp_path: Path) -> None:
    third = make_run(tmp_path / "b", "better", points=POINTS[:2], with_others=False)
    path = write_comparison([*runs, third], tmp_path / "out" / "compare.html")
    page = path.read_text(encoding="utf-8")
    info = build_comparison_info([*runs, third])
    # Two runs named alike are told apart by their parent directory.
    assert [r.label for r in info.runs] == [
        f"{tmp_path.name}/better",
        f"{tmp_path.name}/worse",
        "b/better",
    ]
    for svg_id in ("compare-scatter", "compare-hv"):
        svg = re.search(rf"<svg id='{svg_id}'.*?</svg>", page, re.DOTALL).group(0)
        assert sorted(set(re.findall(r"data-series='(\d+)'", svg))) == ["0", "1", "2"]
    assert page.count("<tr data-run=") == 3
    svgs = "".join(re.findall(r"<svg.*?</svg>", page, re.DOTALL))
    assert "nan" not in svgs and "inf" not in svgs


def test_comparison_escapes_run_strings(tmp_path: Path) -> None:
    odd = make_run(tmp_path, "<svg onload=alert(1)>", points=POINTS[:3], with_others=False)
    _set_attr(odd, "strategy", HOSTILE)
    _set_attr(odd, "device", HOSTILE)
    page = render_comparison_html(build_comparison_info([odd, make_run(tmp_path, "plain")]))
    assert HOSTILE not in page and "<svg onload" not in page
    assert "&lt;svg onload=alert(1)&gt;" in page and "&lt;script&gt;alert(1)" in page
    assert page.lower().count("<script") == page.lower().count("</script") == 1
    assert not re.search(r"https?://", page)


def test_comparison_warns_when_runs_do_not_compare(runs: list[Path], tmp_path: Path) -> None:
    _set_attr(runs[1], "device", "arm/rpi4")
    empty = make_run(tmp_path, "empty", points=[], with_others=False)
    info = build_comparison_info([*runs, empty])
    assert any("different devices" in w for w in info.warnings)
    assert any("empty" in w and "no completed trial" in w for w in info.warnings)
    assert info.runs[2].hypervolume == 0.0 and info.runs[2].fastest is None
    assert "different devices" in render_comparison_html(info)


def test_comparison_of_nothing_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no run to compare"):
        build_comparison_info([])
    with pytest.raises(ReportError, match="no study at"):
        build_comparison_info([tmp_path / "missing"])
    empty = make_run(tmp_path, "empty", points=[], with_others=False)
    info = build_comparison_info([empty])
    assert info.reference_latency_ms is None and info.runs[0].hypervolume_history == []
    assert "No completed trial" in render_comparison_html(info)
    assert build_info(empty).trials == []
