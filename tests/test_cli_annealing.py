"""Temperature annealing through the real fairseq-train: T logged per update, resumed from the checkpoint,
T = 1 in validation, refused with a teacher cache (as is --teacher-smoothing)."""
import json
import os

import pytest
from cli_runner import train

from fairseq_pdd.distill.temperature import TemperatureSchedule

SCHEDULE = TemperatureSchedule(initial=4.0, start=2, end=8)
ANNEAL = ["--init-temp", "4", "--anneal-start", "2", "--anneal-end", "8"]


def records(log: str, kind: str):
    """The ``--log-format json`` records of ``kind`` (train_inner, valid)."""
    out = []
    for line in log.splitlines():
        start = line.find("{")
        if f"| {kind} |" in line and start >= 0:
            out.append(json.loads(line[start:]))
    return out


def logged_temperatures(log: str) -> dict:
    """num_updates -> the teacher temperature logged for that update (log interval 1)."""
    return {int(r["num_updates"]): float(r["teacher_temperature"]) for r in records(log, "train_inner")}


def distil(toy_mt, save, max_update, extra=(), expect_failure=False):
    proc = train(toy_mt.data, save, toy_mt.root,
                 ["--task", "distillation", "--ensemble-paths", ":".join(toy_mt.teachers),
                  "--criterion", "sequence_distribution_distillation", "--max-update", str(max_update),
                  "--log-interval", "1", "--log-format", "json", "--seed", "3", "--validate-interval-updates", "4",
                  *ANNEAL, *extra], expect_failure)
    return proc.stdout + proc.stderr


def test_temperature_is_logged_per_update_and_resumes_from_the_checkpoint(toy_mt):
    save = os.path.join(toy_mt.root, "annealed")
    first = logged_temperatures(distil(toy_mt, save, 5))
    resumed_log = distil(toy_mt, save, 10)
    resumed = logged_temperatures(resumed_log)
    assert sorted(first) == [1, 2, 3, 4, 5] and sorted(resumed) == [6, 7, 8, 9, 10]
    # update n is the (n-1)-th fairseq update_num: T0 = 4 up to update_num 2, then linear to 1 at 8
    for n, t in {**first, **resumed}.items():
        assert t == pytest.approx(SCHEDULE(n - 1), abs=1e-4), (n, t)
    assert first[1] == 4.0 and resumed[6] == pytest.approx(2.5) and resumed[10] == 1.0
    valid = records(resumed_log, "valid")
    assert valid and all("teacher_temperature" not in r for r in valid)


def test_validation_uses_temperature_one(toy_mt):
    """The valid statistics of an annealed run (T0 = 4 still) equal those of a run without annealing."""
    annealed = records(distil(toy_mt, os.path.join(toy_mt.root, "valid_annealed"), 4), "valid")
    plain = records(distil(toy_mt, os.path.join(toy_mt.root, "valid_plain"), 4, ["--init-temp", "1"]), "valid")
    for key in ("valid_ensemble_mkl", "valid_ensemble_epkl", "valid_ensemble_precision"):
        assert annealed[-1][key] == plain[-1][key], key


def test_annealing_is_refused_with_a_teacher_cache(toy_mt, tmp_path):
    log = distil(toy_mt, str(tmp_path / "cached"), 2, ["--teacher-cache", str(tmp_path / "cache")],
                 expect_failure=True)
    assert "holds only their T = 1 statistics" in log


@pytest.mark.parametrize("extra,problem", [
    (["--teacher-smoothing", "1e-3", "--teacher-cache", "CACHE"], "--teacher-cache holds only the ensemble mean's top-k"),
    (["--teacher-smoothing", "1"], "--teacher-smoothing must be in [0, 1), got 1.0"),
])
def test_bad_teacher_smoothing_is_refused(toy_mt, tmp_path, extra, problem):
    extra = [str(tmp_path / "cache") if a == "CACHE" else a for a in extra]
    log = distil(toy_mt, str(tmp_path / "smoothed"), 2, ["--init-temp", "1", *extra], expect_failure=True)
    assert problem in log


def test_anneal_end_before_start_is_refused(toy_mt, tmp_path):
    log = distil(toy_mt, str(tmp_path / "bad"), 2, ["--anneal-start", "8", "--anneal-end", "3"], expect_failure=True)
    assert "needs --anneal-end > --anneal-start" in log


def test_tempered_student_is_refused_by_a_criterion_that_cannot_temper_it(toy_mt, tmp_path):
    proc = train(toy_mt.data, str(tmp_path / "sd"), toy_mt.root,
                 ["--task", "distillation", "--ensemble-paths", toy_mt.teachers[0], "--criterion",
                  "gt_mixed_self_distillation", "--max-update", "1", *ANNEAL, "--temper-student"], expect_failure=True)
    assert "--temper-student: criterion 'gt_mixed_self_distillation' does not temper" in proc.stdout + proc.stderr
