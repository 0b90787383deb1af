"""Uncertainty end to end through the real CLIs: fairseq-pdd-generate on the teachers (ensemble) and on a
PD-EnD2 student (Dirichlet; ``conftest.students``), in-domain and on two OOD sets, then fairseq-pdd-evaluate
on both systems.

OOD sets, built from the toy corpus of ``conftest.toy_mt``:

* ``unseen``: sources made of words ``s40 .. s79`` that never occur in training (``<unk>`` after
  binarising), the toy analogue of a source in another language; mutual information detects it
  (ROC-AUC about 1.0 for the ensemble and the student);
* ``perm``: the in-domain sources with their words shuffled (``fairseq_pdd.evaluation.ood_sets
  permute``). The toy task translates word by word, so this is *not* a shift for it (ROC-AUC about
  0.5); it is evaluated as a second OOD set, but its AUC is not asserted.

Every decode passes ``--required-batch-size-multiple 1``: with fairseq's default of 8 the last batch is
cut to a multiple of 8 (fairseq issue #5036), so 4 of the 100 test sentences would never be decoded.
The subprocesses run two at a time.
"""
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from cli_runner import run

from fairseq_pdd.cli import user_dir
from fairseq_pdd.evaluation.ood_sets import make_permuted_set
from fairseq_pdd.data.toy_mt import write_unseen_vocabulary_split

N_SENTENCES = 100  #: size of the toy test split and of each OOD split
NBEST = 3
SETS = {"test": "test", "perm": "perm", "unseen": "unseen"}  #: set name -> JSONL stem
DECODE = ["--beam", "5", "--nbest", str(NBEST), "--batch-size", "64", "--required-batch-size-multiple", "1",
          "--scoring", "sacrebleu", "--cpu"]
#: sequence measures of both kinds of model (fairseq_pdd.decoding.uncertainty)
COMMON_MEASURES = {"total_uncertainty", "data_uncertainty", "mutual_information", "epkl", "mkl", "nll",
                   "expected_nll", "nll_mkl", "log_prob", "score"}
ENSEMBLE_ONLY = {"ep_total_uncertainty", "ep_mutual_information", "ep_epkl", "ep_mkl", "ep_nll", "ep_nll_mkl",
                 "ep_log_prob", "var", "var_combo", "logvar", "logvar_combo"}
LINE_PREFIXES = ("S", "T", "H", "D", "P", "U")
LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------ fixtures


def _make_ood_data(toy_mt, work):
    """Raw perm / unseen splits under ``work/raw_ood``, binarised with the toy dictionaries into
    ``work/bin_ood`` (subset ``test`` = perm, ``test1`` = unseen)."""
    raw = os.path.join(work, "raw_ood")
    src_raw = os.path.join(toy_mt.root, "raw")
    # in-process (what `python -m fairseq_pdd.evaluation.ood_sets permute` runs), sparing a fairseq import
    make_permuted_set(f"{src_raw}/test.src", f"{src_raw}/test.tgt", f"{raw}/perm.src", f"{raw}/perm.tgt")
    write_unseen_vocabulary_split(raw, "unseen", N_SENTENCES)
    dest = os.path.join(work, "bin_ood")
    run("fairseq-preprocess",
        ["--source-lang", "src", "--target-lang", "tgt", "--testpref", f"{raw}/perm,{raw}/unseen",
         "--destdir", dest, "--srcdict", os.path.join(toy_mt.data, "dict.src.txt"),
         "--tgtdict", os.path.join(toy_mt.data, "dict.tgt.txt"), "--workers", "1"], work)
    return dest


class Decodes:
    """Everything the tests read: paths, fairseq-pdd-generate outputs and the student's training log."""

    def __init__(self, work, ensemble, student, student_log):
        self.work, self.ensemble, self.student, self.student_log = work, ensemble, student, student_log
        self.dirs = {"ensemble": os.path.join(work, "decode", "ensemble"),
                     "student": os.path.join(work, "decode", "student")}
        self.stdout = {}  #: (system, set) -> stdout of fairseq-pdd-generate
        self.plain_student_stdout = None  #: plain fairseq-generate on the student, in-domain
        #: per system, the in-domain records with the measures re-scored (``--uncertainty-from rescore``;
        #: the default measures in the beam), in length groups of at most 8 tokens
        self.switched = {system: os.path.join(work, "switched", system, "test.jsonl") for system in self.dirs}

    def jsonl(self, system, set_name):
        return os.path.join(self.dirs[system], f"{SETS[set_name]}.jsonl")


def _generate(tool, data, subset, path, cwd, extra=()):
    return run(tool, [data, "--user-dir", user_dir(), "--path", path, "--gen-subset", subset, *DECODE, *extra],
               cwd).stdout


@pytest.fixture(scope="module")
def decodes(toy_mt, students):
    work = os.path.join(toy_mt.root, "uncertainty")
    os.makedirs(work, exist_ok=True)
    ensemble = ":".join(toy_mt.teachers)
    where = {"test": (toy_mt.data, "test")}  #: set -> (data, subset); the OOD sets once binarised
    out = Decodes(work, ensemble, *students.pd)
    systems = (("ensemble", ensemble), ("student", out.student))

    def decode(system, path, set_name):
        data, subset = where[set_name]
        extra = ["--uncertainty-reference", "--uncertainty-output", out.jsonl(system, set_name)]
        if set_name != "test":  # in-domain runs print the per-sentence lines, the OOD runs are --quiet
            extra.append("--quiet")
        return _generate("fairseq-pdd-generate", data, subset, path, work, extra)

    with ThreadPoolExecutor(max_workers=2) as pool:  # two subprocesses at a time, in submission order
        jobs = {(system, "test"): pool.submit(decode, system, path, "test") for system, path in systems}
        bin_ood = _make_ood_data(toy_mt, work)
        where.update(perm=(bin_ood, "test"), unseen=(bin_ood, "test1"))
        jobs.update({(system, s): pool.submit(decode, system, path, s)
                     for system, path in systems for s in ("perm", "unseen")})
        plain = pool.submit(_generate, "fairseq-generate", toy_mt.data, "test", out.student, work)
        switched = [pool.submit(_generate, "fairseq-pdd-generate", toy_mt.data, "test", path, work,
                                ["--uncertainty-reference", "--uncertainty-from", "rescore",
                                 "--uncertainty-max-tokens", "8",
                                 "--quiet", "--uncertainty-output", out.switched[system]])
                    for system, path in systems]
        out.stdout = {key: job.result() for key, job in jobs.items()}
        out.plain_student_stdout = plain.result()
        for job in switched:
            job.result()
    return out


@pytest.fixture(scope="module")
def report(decodes):
    """fairseq-pdd-evaluate on both systems with OOD sets perm and unseen: (report dict, out dir, stdout)."""
    out_dir = os.path.join(decodes.work, "report")
    proc = run("fairseq-pdd-evaluate",
               ["--system", f"ensemble={decodes.dirs['ensemble']}", "--system", f"student={decodes.dirs['student']}",
                "--in-domain", "test.jsonl", "--ood", "perm=perm.jsonl", "--ood", "unseen=unseen.jsonl",
                "--task", "mt", "--nbest", "all", "--weighting", "bs", "--out-dir", out_dir], decodes.work)
    with open(os.path.join(out_dir, "report.json")) as f:
        rep = json.load(f, parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    return rep, out_dir, proc.stdout


# ------------------------------------------------------------------------------------------- helpers


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def parse_lines(stdout):
    """fairseq-generate's per-sentence lines: {prefix: {id: [fields after the id, one list per line]}}."""
    out = {p: {} for p in LINE_PREFIXES}
    for line in stdout.splitlines():
        m = re.match(r"([STHDPU])-(\d+)\t(.*)$", line)
        if m:
            out[m.group(1)].setdefault(int(m.group(2)), []).append(m.group(3).split("\t"))
    return out


def bleu(stdout, subset="test"):
    m = re.search(rf"Generate {subset} with beam=5: BLEU = ([\d.]+)", stdout)
    assert m, f"no BLEU line in:\n{stdout[-2000:]}"
    return float(m.group(1))


def numbers(x, path=""):
    """(path, value) for every number (bools excluded) in a nested JSON value."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from numbers(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


def nulls(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from nulls(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from nulls(v, f"{path}[{i}]")
    elif x is None:
        yield path


# --------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("system", ["ensemble", "student"])
@pytest.mark.parametrize("set_name", list(SETS))
def test_jsonl_records(decodes, system, set_name):
    """One record per (id, rank) with ranks -1 .. NBEST-1 for every sentence; finite numbers; the
    measures of the model's kind; per-token lists as long as the hypothesis (EOS included)."""
    records = read_jsonl(decodes.jsonl(system, set_name))
    assert not os.path.exists(decodes.jsonl(system, set_name) + ".tmp")  # renamed when decoding ended
    keys = [(r["id"], r["rank"]) for r in records]
    assert len(keys) == len(set(keys)), "duplicate (id, rank)"
    assert set(keys) == {(i, k) for i in range(N_SENTENCES) for k in range(-1, NBEST)}
    kind = "ensemble" if system == "ensemble" else "dirichlet"
    expected = COMMON_MEASURES | (ENSEMBLE_ONLY if kind == "ensemble" else set())
    for r in records:
        where = (system, set_name, r["id"], r["rank"])
        assert r["model"] == kind, where
        assert set(r["sequence"]) == expected, (where, sorted(set(r["sequence"]) ^ expected))
        assert any(k.startswith("ep_") for k in r["token"]) == (kind == "ensemble"), where
        bad = [p for p, v in numbers(r) if not math.isfinite(v)]
        assert not bad, (where, bad)
        assert r["sequence"]["log_prob"] == r["log_prob"] and r["sequence"]["score"] == pytest.approx(r["score"], abs=1e-4)
        length = r["length"]
        assert len(r["tokens"]) == length - 1, where  # without EOS
        assert all(len(v) == length for v in r["token"].values()), where
        assert r["sequence"]["mutual_information"] >= -1e-6 and r["sequence"]["total_uncertainty"] >= 0, where
        if r["rank"] == -1:
            assert len(r["token_confidence"]) == length and set(r["token_correct"]) <= {0, 1}, where
            assert all(0 < c <= 1 for c in r["token_confidence"]), where
            assert r["hypothesis"] == r["reference"], where
        elif r["rank"] == 0:
            assert "reference_tokens" in r, where
    ranks = {}
    for r in records:
        if r["rank"] >= 0:
            ranks.setdefault(r["id"], []).append(r)
    for hyps in ranks.values():  # n-best in fairseq's order: non-increasing score
        scores = [h["score"] for h in sorted(hyps, key=lambda h: h["rank"])]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("system", ["ensemble", "student"])
def test_generate_output_lines(decodes, system):
    """Not --quiet: fairseq's S-/T-/H-/D-/P- lines plus one U- line per JSONL record, whose values are the
    record's sequence measures; H-/P- scores are fairseq's (base 2) and agree with the record's ``score``
    and the re-scored ``log_prob``, i.e. beam search and the re-scoring use the same predictive."""
    stdout = decodes.stdout[(system, "test")]
    lines = parse_lines(stdout)
    ids = set(range(N_SENTENCES))
    for p in LINE_PREFIXES:
        assert set(lines[p]) == ids, f"{p}- lines"
    assert all(len(lines["S"][i]) == 1 and len(lines["T"][i]) == 1 for i in ids)
    assert all(len(lines[p][i]) == NBEST for p in "HDP" for i in ids)
    assert all(len(lines["U"][i]) == NBEST + 1 for i in ids)
    assert bleu(stdout) > 0
    records = {(r["id"], r["rank"]): r for r in read_jsonl(decodes.jsonl(system, "test"))}
    for i in ids:
        for fields in lines["U"][i]:
            rank, shown = int(fields[0]), dict(kv.split("=") for kv in fields[1].split())
            r = records[(i, rank)]
            assert set(shown) == set(r["sequence"])
            for k, v in shown.items():
                assert float(v) == pytest.approx(r["sequence"][k], abs=1e-4), (i, rank, k)
        assert lines["T"][i][0][0] == records[(i, -1)]["reference"]
        assert lines["S"][i][0][0] == records[(i, 0)]["source"]
        for rank, (h, p) in enumerate(zip(lines["H"][i], lines["P"][i])):
            r = records[(i, rank)]
            assert h[1] == r["hypothesis"]
            assert float(h[0]) * LN2 == pytest.approx(r["score"], abs=1e-5)
            positional = [float(x) for x in p[0].split()]
            assert len(positional) == r["length"]
            assert sum(positional) * LN2 == pytest.approx(r["log_prob"], abs=1e-3)  # P- has 4 decimals


def test_bleu_lines_and_quiet_runs(decodes):
    """fairseq's BLEU line in every run; --quiet runs (the OOD sets) print no S-/T-/H-/D-/P-/U- lines."""
    for (system, set_name), stdout in decodes.stdout.items():
        subset = "test1" if set_name == "unseen" else "test"
        score = bleu(stdout, subset)
        if set_name == "test":
            assert score > 10, (system, score)  # both learned the task (an untrained model scores ~0)
        else:
            assert not any(parse_lines(stdout)[p] for p in LINE_PREFIXES), (system, set_name)


def test_student_decodes_with_the_dirichlet_mean(toy_mt, decodes):
    """Plain fairseq-generate ranks the student's hypotheses with softmax(z); fairseq-pdd-generate with the
    Dirichlet mean (exp(z) + offset) / (sum exp(z) + K * offset). The student was trained with
    model_offset 1, so the two give different scores for the same hypothesis (offset 0 would not)."""
    offset = re.search(r"'model_offset': ([\d.]+)", decodes.student_log)
    assert offset and float(offset.group(1)) == 1.0
    plain, pdd = parse_lines(decodes.plain_student_stdout), parse_lines(decodes.stdout[("student", "test")])
    assert not plain["U"]
    assert plain["S"] == pdd["S"] and plain["T"] == pdd["T"]
    diffs = []
    for i, hyps in pdd["H"].items():
        plain_scores = {h[1]: float(h[0]) for h in plain["H"][i]}
        diffs += [abs(float(h[0]) - plain_scores[h[1]]) for h in hyps if h[1] in plain_scores]
    assert len(diffs) > N_SENTENCES  # most hypotheses are the same strings in both n-best lists
    assert min(diffs) > 1e-3, min(diffs)  # every shared hypothesis is scored differently


@pytest.mark.parametrize("system", ["ensemble", "student"])
def test_beam_measures_equal_rescoring_in_length_groups(decodes, system):
    """The measures computed inside beam search (the default) equal those of re-scoring the n-best lists
    teacher-forced (``--uncertainty-from rescore``), here in length groups of at most 8
    padded tokens (mostly one row each, ordered by length, not by row): same records, same order, same
    numbers to float32 rounding."""
    default, rescored = read_jsonl(decodes.jsonl(system, "test")), read_jsonl(decodes.switched[system])
    assert [(r["id"], r["rank"], r["hypothesis"]) for r in rescored] == \
        [(r["id"], r["rank"], r["hypothesis"]) for r in default]
    assert max(r["length"] for r in default) > 8  # rows longer than the budget are groups of their own
    for a, b in zip(default, rescored):
        values_a, values_b = dict(numbers(a)), dict(numbers(b))
        assert values_a.keys() == values_b.keys()
        for key, value in values_a.items():
            assert values_b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (a["id"], a["rank"], key)


# -------------------------------------------------------------------------------------------- evaluate


REPORT_CONFIG_KEYS = {"task", "nbest", "weighting", "temperature", "weight_key", "negated_measures", "prr_error",
                      "ece_bins", "bleu_tokenize", "sentence_bleu", "lowercase_wer"}
SYSTEM_KEYS = {"files", "n_samples", "quality", "ood_quality", "ood", "ood_reference", "error_detection",
               "token_error_detection", "calibration"}


def test_report_schema_and_numbers(report, decodes):
    rep, out_dir, stdout = report
    assert set(rep) == {"config", "systems"}
    assert set(rep["config"]) == REPORT_CONFIG_KEYS
    assert rep["config"]["nbest"] == "all" and rep["config"]["task"] == "mt"
    assert set(rep["systems"]) == {"ensemble", "student"}
    # strict JSON: every number finite (parse_constant rejects NaN/Infinity); null only where the schema
    # allows an undefined metric. With forced references present nothing here is undefined.
    bad = [p for p, v in numbers(rep) if not math.isfinite(v)]
    assert not bad, bad
    assert not list(nulls(rep)), list(nulls(rep))
    for name, res in rep["systems"].items():
        kind = "ensemble" if name == "ensemble" else "dirichlet"
        assert set(res) == SYSTEM_KEYS, (name, set(res) ^ SYSTEM_KEYS)
        assert res["n_samples"] == N_SENTENCES
        assert res["files"]["in_domain"] == decodes.jsonl(name, "test")
        assert res["files"]["ood"] == {s: decodes.jsonl(name, s) for s in ("perm", "unseen")}
        assert set(res["quality"]) == {"bleu", "bleu_signature", "sentence_bleu_mean", "nll"}
        assert res["quality"]["bleu"] > 10 and res["quality"]["nll"] > 0
        assert set(res["ood_quality"]) == {"perm", "unseen"}
        for od in res["ood_quality"].values():
            assert set(od) == {"bleu", "bleu_signature", "nll"}
        # an unseen source is much harder than the in-domain test set
        assert res["ood_quality"]["unseen"]["nll"] > res["quality"]["nll"]
        measures = COMMON_MEASURES | (ENSEMBLE_ONLY if kind == "ensemble" else set())
        for key in ("ood", "ood_reference"):
            assert set(res[key]) == {"perm", "unseen"}
            for set_name, per in res[key].items():
                assert set(per) == measures, (name, key, set_name)
                for m, v in per.items():
                    assert set(v) == {"roc_auc", "pr_auc"} and all(0 <= x <= 1 for x in v.values()), (m, v)
        assert set(res["error_detection"]) == measures
        assert all(-1 <= v <= 1 for v in res["error_detection"].values())
        assert set(res["token_error_detection"]) == {"reference", "hypothesis"}
        for block in res["token_error_detection"].values():
            assert set(block) == {"error_rate", "n_tokens", "measures"} and block["n_tokens"] > 0
            assert 0 < block["error_rate"] < 1
        cal = res["calibration"]
        assert set(cal) == {"ece", "n_bins", "n_tokens", "accuracy", "mean_confidence"}
        assert 0 <= cal["ece"] <= 1 and cal["n_tokens"] > 0
    assert "OOD detection ROC-AUC (%): unseen" in stdout and "OOD detection ROC-AUC (%): perm" in stdout
    with open(os.path.join(out_dir, "report.txt")) as f:
        assert f.read() == stdout


def test_unseen_vocabulary_is_detected_by_mutual_information(report):
    """The ensemble's disagreement on <unk> sources, and the student's distilled version of it. (On the
    permuted set, which is no shift for this word-by-word task, the AUC is about 0.5 and not asserted.)"""
    rep = report[0]
    for name in ("ensemble", "student"):
        auc = rep["systems"][name]["ood"]["unseen"]["mutual_information"]["roc_auc"]
        assert auc > 0.8, (name, auc)
        assert rep["systems"][name]["ood_reference"]["unseen"]["mutual_information"]["roc_auc"] > 0.8


def test_report_plots(report):
    rep, out_dir, _ = report
    plots = os.path.join(out_dir, "plots")
    expected = ["roc_perm.png", "roc_unseen.png", "reliability.png", "rejection_mutual_information.png",
                "rejection_ep_mutual_information.png"]
    for name in expected:
        path = os.path.join(plots, name)
        assert os.path.getsize(path) > 1000, name
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


# ------------------------------------------------------------------------------------------ bad input


def test_predictive_dirichlet_needs_one_dirichlet_checkpoint(toy_mt, decodes):
    out = os.path.join(decodes.work, "bad")
    cases = [
        (decodes.ensemble, "--predictive dirichlet takes one checkpoint; several are decoded as an ensemble"),
        (toy_mt.teachers[0], "--predictive dirichlet needs a checkpoint trained with a Dirichlet criterion, "
                             "not 'cross_entropy'"),
    ]

    def fails(k, path):
        target = os.path.join(out, f"case{k}.jsonl")
        proc = run("fairseq-pdd-generate",
                   [toy_mt.data, "--user-dir", user_dir(), "--path", path, "--gen-subset", "test", *DECODE,
                    "--uncertainty-reference", "--predictive", "dirichlet", "--uncertainty-output", target],
                   decodes.work, expect_failure=True)
        return proc, target

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(fails, range(len(cases)), [c[0] for c in cases]))
    for (proc, target), (_, message) in zip(results, cases):
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1] == f"fairseq-pdd-generate: error: {message}", proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert not os.path.exists(target) and not os.path.exists(target + ".tmp")


def test_evaluate_mismatched_id_sets(decodes):
    """The student's in-domain file without its last 50 sentences: the systems no longer share their ids."""
    cut = os.path.join(decodes.work, "bad", "student_test_cut.jsonl")
    os.makedirs(os.path.dirname(cut), exist_ok=True)
    with open(decodes.jsonl("student", "test")) as src, open(cut, "w") as dst:
        dst.writelines(line for line in src if json.loads(line)["id"] < N_SENTENCES // 2)
    proc = run("fairseq-pdd-evaluate",
               ["--system", f"ensemble={decodes.jsonl('ensemble', 'test')}", "--system", f"student={cut}",
                "--out-dir", os.path.join(decodes.work, "bad", "report")], decodes.work, expect_failure=True)
    assert proc.returncode == 1
    assert "fairseq-pdd-evaluate: error: mismatched id sets between ensemble" in proc.stderr, proc.stderr[-2000:]
    assert f"50 ids only in ensemble ({decodes.jsonl('ensemble', 'test')})" in proc.stderr
    assert not os.path.exists(os.path.join(decodes.work, "bad", "report", "report.json"))
