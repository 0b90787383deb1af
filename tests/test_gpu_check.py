"""benchmarks/gpu_check.sh: its CPU mode run end to end (so the GPU check cannot rot), and its parts.

The CPU mode runs every step of the GPU check at tiny sizes: synthetic data, teachers, the three timed
fairseq-train runs (CE, PD-EnD2 online, PD-EnD2 from a teacher cache), bench_criteria and the decodes
with their hypotheses checks. The report must have every section with numbers that make sense.
"""
import json
import os
import subprocess
import sys

import pytest

from cli_runner import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_check  # noqa: E402

CPU = gpu_check.SIZES["cpu"]


def run_cpu_check(root):
    """``bash benchmarks/gpu_check.sh --cpu`` into ``root``: (root, the report, the console output)."""
    out = root / "report.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--cpu", "--work",
                           str(root / "work"), "--out", str(out)], env=env, capture_output=True, text=True, timeout=900,
                          cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # nothing written outside WORK (e.g. ./checkpoints) but the report and fairseq's log beside it
    assert sorted(os.listdir(root)) == ["report.json", "report.log", "work"]
    assert "fairseq_cli.train | done training" in (root / "report.log").read_text()
    return root, json.loads(out.read_text()), proc.stdout


BACKGROUND = {"cpu_check": run_cpu_check}  #: the run starts with the session (conftest.Background)


@pytest.fixture(scope="module")
def cpu_check(background):
    return background.result(run_cpu_check)


def test_report_has_every_section(cpu_check):
    _, report, stdout = cpu_check
    assert {"device", "data", "teachers", "training", "criteria", "generate", "stages_s", "table"} <= set(report)
    assert report["device"] == "cpu" and report["data"]["vocab"] == CPU["vocab"]
    assert set(report["stages_s"]) == {"data", "teachers", "training", "generate", "criteria"}
    assert report["table"] in stdout  # the table printed is the one stored


def test_training_throughput_and_teachers(cpu_check):
    _, report, _ = cpu_check
    training = report["training"]
    assert report["teachers"]["members"] == CPU["members"] == training["pd_end2_online"]["members"]
    assert training["pd_end2_cache"]["members"] == CPU["members"]
    assert "tokens_per_s" not in report["teachers"]  # its intervals hold checkpoint saves: not timed
    for name in ("ce", "pd_end2_online", "pd_end2_cache"):
        run = training[name]
        assert run["updates"] == CPU["updates"] and run["timed_updates"] == CPU["updates"] - CPU["log_interval"]
        assert run["tokens_per_s"] > 0 and 0 < run["tokens_per_update"] <= CPU["max_tokens"]
        assert run["peak_bytes"] is None  # peak memory is measured on CUDA only
    for name in ("pd_end2_online", "pd_end2_cache"):
        ratio = training[name]["x_ce_tokens_per_s"]
        assert ratio == pytest.approx(training[name]["tokens_per_s"] / training["ce"]["tokens_per_s"])
    assert training["cache_build"]["topk"] == gpu_check.TOPK and training["cache_build"]["bytes"] > 0


def test_criteria_section_is_bench_criterias_report(cpu_check):
    _, report, _ = cpu_check
    criteria = report["criteria"]
    runs = {(r["method"], r["members"]) for r in criteria["results"]}
    assert {("ce", 0), ("rkl", 1), ("rkl", 2), ("rkl_materialized", 2), ("rkl_cache", 2)} <= runs
    assert all(r["step_time_s"] > 0 and r["tokens_per_s"] > 0 for r in criteria["results"])
    assert criteria["config"]["vocab"] == 1000 and criteria["targets"]


def test_decodes_are_timed_and_hypotheses_compared(cpu_check):
    root, report, _ = cpu_check
    generate = report["generate"]
    assert {(r["model"], r["variant"]) for r in generate["results"]} == set(gpu_check.DECODES)
    for r in generate["results"]:
        assert r["gen_s"] > 0 and r["wall_s"] >= r["gen_s"] and r["gen_ratio"] > 0
        assert len(r["gen_s_all"]) == CPU["repeats"]
    for check in generate["checks"]:
        assert check["identical"] and check["sentences"] == check["expected"] == CPU["test"], check
    assert generate["student_dirichlet_vs_plain"]["sentences"] == CPU["test"]
    # the checks read the decodes' own output: every test sentence has its H- line there
    for model, a, b in gpu_check.CHECKS:
        for variant in (a, b):
            path = root / "work" / "decodes" / f"{model}-{variant}" / "generate-test.txt"
            assert len(gpu_check.hypotheses(str(path))) == CPU["test"]


def test_compare_hypotheses_finds_differences_and_gaps():
    a = {0: "w1 w2", 1: "w3", 2: ""}
    assert gpu_check.compare_hypotheses(a, dict(a), 3)["identical"]
    changed = gpu_check.compare_hypotheses(a, {0: "w1 w2", 1: "w4", 2: ""}, 3)
    assert not changed["identical"] and changed["differ"] == 1
    assert changed["first_difference"] == {"id": 1, "a": "w3", "b": "w4"}
    gap = gpu_check.compare_hypotheses(a, {0: "w1 w2", 1: "w3"}, 3)
    assert not gap["identical"] and gap["missing"] == 1 and gap["differ"] == 0
    assert not gpu_check.compare_hypotheses({}, {}, 3)["identical"]  # nothing decoded is no agreement
    assert not gpu_check.compare_hypotheses({0: "x"}, {0: "x"}, 3)["identical"]  # sentences missing from both


def test_hypotheses_reads_h_lines(tmp_path):
    path = tmp_path / "generate-test.txt"
    path.write_text("S-1\tw1 w2\nT-1\tw3\nH-1\t-0.5\tw9 w8\nD-1\t-0.5\tw9 w8\nP-1\t-0.1 -0.2\nH-0\t-1.0\t\n")
    assert gpu_check.hypotheses(str(path)) == {1: "w9 w8", 0: ""}


def test_gen_seconds_reads_the_translated_line():
    records = [("fairseq_cli.generate", "NOTE: hypothesis and token scores are output in base 2"),
               ("fairseq_cli.generate", "Translated 1,000 sentences (24,000 tokens) in 2.5s (400.00 sentences/s, "
                                        "9600.00 tokens/s)")]
    assert gpu_check.gen_seconds(records) == pytest.approx(2.5)
    with pytest.raises(gpu_check.ToolFailed, match="no 'Translated"):
        gpu_check.gen_seconds(records[:1])


def test_throughput_skips_the_first_interval():
    records = [("train_inner", json.dumps({"num_updates": str(u), "wpb": str(wpb), "wps": str(wps)}))
               for u, wpb, wps in ((10, 8000, 1000), (20, 8000, 4000), (30, 6000, 2000))]
    records.insert(1, ("fairseq.trainer", "not a record"))
    got = gpu_check.throughput(records)
    # updates 11-30: 80,000 + 60,000 tokens in 20 s + 30 s
    assert got["tokens_per_s"] == pytest.approx(140000 / 50)
    assert got["timed_updates"] == 20 and got["updates"] == 30 and got["tokens_per_update"] == pytest.approx(7000)
    with pytest.raises(gpu_check.ToolFailed, match="1 train_inner records"):
        gpu_check.throughput(records[:2])
