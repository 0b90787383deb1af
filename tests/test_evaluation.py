"""fairseq_pdd.evaluation: metrics against sklearn / sacrebleu / hand computation, I/O validation, CLI end to end."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
from sklearn.metrics import average_precision_score, roc_auc_score

from fairseq_pdd.evaluation import aggregate, cli, io, metrics, ood_sets, quality, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a cat dog sat ran on under mat house red blue big small quickly slowly and but".split()


# ------------------------------------------------------------------------------------ synthetic decodes


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, size=n))


def make_records(n_ids=40, nbest=3, ood=False, seed=0, model="ensemble", id_offset=0, extra_measure=False):
    """Synthetic JSONL records: uncertainty grows with the hypothesis' error, OOD sets are more uncertain."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n_ids):
        sid = i + id_offset
        ref_words = list(rng.choice(WORDS, size=int(rng.integers(4, 12))))
        ref = " ".join(ref_words)
        src = _sentence(rng, len(ref_words))
        difficulty = rng.uniform(0.0, 1.0) + (1.0 if ood else 0.0)
        for rank in range(nbest):
            words = list(ref_words)
            n_err = int(rng.binomial(len(words), min(0.9, 0.1 + 0.4 * difficulty + 0.05 * rank)))
            for j in rng.choice(len(words), size=n_err, replace=False):
                words[j] = str(rng.choice(WORDS))
            if rng.uniform() < 0.2 * difficulty:
                words = words[:-1]
            hyp = " ".join(words)
            n_tok = len(words) + 1  # + EOS
            tu = difficulty + 0.3 * rng.normal() + 0.1 * rank
            lp = -(0.3 + tu) * n_tok
            seq = {"total_uncertainty": tu, "data_uncertainty": 0.7 * tu + 0.1 * rng.normal(),
                   "mutual_information": 0.3 * tu + 0.1 * rng.normal(), "epkl": 0.4 * tu + 0.1 * rng.normal(),
                   "mkl": 0.2 * tu + 0.1 * rng.normal(), "score": lp / n_tok, "log_prob": lp}
            if extra_measure:
                seq["var"] = tu ** 2
            tok_tu = np.abs(tu + 0.5 * rng.normal(size=n_tok))
            recs.append({
                "id": sid, "rank": rank, "source": src, "reference": ref, "hypothesis": hyp,
                "score": lp / n_tok, "log_prob": lp, "length": n_tok,
                "token": {"total_uncertainty": tok_tu.tolist(), "log_prob": (-tok_tu).tolist()},
                "sequence": seq, "model": model, "tokens": words, "reference_tokens": ref_words,
            })
        n_tok = len(ref_words) + 1
        correct = (rng.uniform(size=n_tok) > 0.2 + 0.3 * min(difficulty, 1.0)).astype(int)
        conf = np.clip(0.5 + 0.4 * correct - 0.2 * difficulty + 0.1 * rng.normal(size=n_tok), 0.01, 0.99)
        tok_tu = 1.0 - conf + 0.1 * rng.uniform(size=n_tok)
        tu = difficulty + 0.2 * rng.normal()
        lp = -(0.2 + tu) * n_tok
        seq = {"total_uncertainty": tu, "data_uncertainty": 0.7 * tu, "mutual_information": 0.3 * tu,
               "epkl": 0.4 * tu, "mkl": 0.2 * tu, "score": lp / n_tok, "log_prob": lp}
        if extra_measure:
            seq["var"] = tu ** 2
        recs.append({
            "id": sid, "rank": -1, "source": src, "reference": ref, "hypothesis": ref, "score": lp / n_tok,
            "log_prob": lp, "length": n_tok,
            "token": {"total_uncertainty": tok_tu.tolist(), "log_prob": np.log(conf).tolist()},
            "sequence": seq, "token_confidence": conf.tolist(), "token_correct": correct.tolist(), "model": model,
        })
    return recs


def write_jsonl(path, records, shuffle_seed=None):
    records = list(records)
    if shuffle_seed is not None:  # input order must not matter
        order = np.random.default_rng(shuffle_seed).permutation(len(records))
        records = [records[i] for i in order]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


# ----------------------------------------------------------------------------------------- isolation


def test_evaluation_imports_neither_torch_nor_fairseq():
    code = (
        "import os, sys, types\n"
        "pkg = types.ModuleType('fairseq_pdd'); pkg.__path__ = [os.path.join(sys.argv[1], 'fairseq_pdd')]\n"
        "sys.modules['fairseq_pdd'] = pkg  # skip the plugin's __init__, which registers with fairseq\n"
        "import fairseq_pdd.evaluation.cli, fairseq_pdd.evaluation.report, fairseq_pdd.evaluation.ood_sets\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fairseq')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------- metrics


def test_ood_detection_by_hand_and_sklearn():
    ind, ood = [0.1, 0.4, 0.35], [0.8, 0.3]
    res = metrics.ood_detection(ind, ood)
    assert res["roc_auc"] == pytest.approx(4 / 6)  # pairs (ood > in): 3 + 1 of 6
    assert res["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 4)  # AP: hits at ranks 1 and 4
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(0.7, size=150)
    y = np.r_[np.zeros(200), np.ones(150)]
    res = metrics.ood_detection(a, b)
    assert res["roc_auc"] == pytest.approx(roc_auc_score(y, np.r_[a, b]))
    assert res["pr_auc"] == pytest.approx(average_precision_score(y, np.r_[a, b]))
    const = metrics.ood_detection(np.ones(5), np.ones(3))
    assert const["roc_auc"] == pytest.approx(0.5) and const["pr_auc"] == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="NaN"):
        metrics.ood_detection([0.1, float("nan")], [0.2])


def test_prr_by_hand():
    e = np.array([0.5, 0.0, 1.0])
    assert metrics.prediction_rejection_ratio(e, [2.0, 1.0, 3.0]) == pytest.approx(1.0)  # oracle order
    assert metrics.prediction_rejection_ratio(e, [3.0, 1.0, 2.0]) == pytest.approx(0.5)
    assert metrics.prediction_rejection_ratio(e, [2.0, 3.0, 1.0]) == pytest.approx(-1.0)  # reverse order
    # ties average over rejection orders: (PRR of order 2,0,1 = 1 and of 2,1,0 = 0.5) / 2
    assert metrics.prediction_rejection_ratio(e, [1.0, 1.0, 2.0]) == pytest.approx(0.75)
    c = metrics.rejection_curve(e, [3.0, 1.0, 2.0])
    np.testing.assert_allclose(c.fraction, [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(c.measure, [0.5, 1 / 3, 0, 0])
    np.testing.assert_allclose(c.oracle, [0.5, 0.5 / 3, 0, 0])
    np.testing.assert_allclose(c.random, [0.5, 1 / 3, 1 / 6, 0])


def test_prr_oracle_random_antioracle_constant():
    rng = np.random.default_rng(123)
    e = rng.uniform(size=20000)
    assert metrics.prediction_rejection_ratio(e, e) == pytest.approx(1.0)
    assert metrics.prediction_rejection_ratio(e, 5 * e + 1) == pytest.approx(1.0)  # only the order matters
    rnd = metrics.prediction_rejection_ratio(e, rng.normal(size=e.size))
    assert abs(rnd) < 0.1
    anti = metrics.prediction_rejection_ratio(e, -e)
    assert -1.1 < anti < -0.9
    assert metrics.prediction_rejection_ratio(e, np.zeros_like(e)) == pytest.approx(0.0, abs=1e-9)
    binary = (rng.uniform(size=500) < 0.3).astype(float)
    assert metrics.prediction_rejection_ratio(binary, -binary) == pytest.approx(-1.0)


def test_prr_deterministic_ties_and_bad_input():
    rng = np.random.default_rng(1)
    e = rng.uniform(size=300)
    u = rng.integers(0, 5, size=300).astype(float)  # heavy ties
    p = rng.permutation(300)
    assert metrics.prediction_rejection_ratio(e, u) == pytest.approx(metrics.prediction_rejection_ratio(e[p], u[p]))
    assert math.isnan(metrics.prediction_rejection_ratio(np.full(10, 0.3), rng.normal(size=10)))  # nothing to rank
    with pytest.raises(ValueError, match="NaN"):
        metrics.prediction_rejection_ratio(e[:3], [0.1, float("nan"), 0.2])
    with pytest.raises(ValueError, match="lengths differ"):
        metrics.prediction_rejection_ratio(e[:3], [0.1, 0.2])


def test_ece_by_hand():
    conf = [0.05, 0.15, 0.12, 0.95, 0.95, 0.55]
    correct = [0, 0, 1, 1, 0, 1]
    # bins of width 0.1: {0.05}: |0 - .05|; {.15, .12}: |.5 - .135|; {.55}: |1 - .55|; {.95, .95}: |.5 - .95|
    expected = (1 * 0.05 + 2 * 0.365 + 1 * 0.45 + 2 * 0.45) / 6
    assert metrics.expected_calibration_error(conf, correct, n_bins=10) == pytest.approx(expected)
    b = metrics.reliability_bins([0.0, 0.1, 1.0], [1, 1, 1], n_bins=10)
    assert b["count"][0] == 1 and b["count"][1] == 1 and b["count"][9] == 1  # 1.0 falls in the last bin
    assert metrics.expected_calibration_error([0.3, 0.3], [1, 0], n_bins=1) == pytest.approx(0.2)
    assert metrics.expected_calibration_error([1.0, 1.0], [1, 1], n_bins=15) == pytest.approx(0.0)


def test_token_error_detection_matches_sklearn():
    rng = np.random.default_rng(2)
    y = (rng.uniform(size=400) < 0.25).astype(int)
    s = y + rng.normal(size=400)
    res = metrics.error_detection(s, y)
    assert res["pr_auc"] == pytest.approx(average_precision_score(y, s))
    assert res["roc_auc"] == pytest.approx(roc_auc_score(y, s))
    assert res["error_rate"] == pytest.approx(y.mean())
    assert math.isnan(metrics.error_detection([0.1, 0.2], [0, 0])["pr_auc"])  # no errors: undefined


# --------------------------------------------------------------------------------------- quality


def test_bleu_matches_sacrebleu():
    hyps = ["the cat sat on the mat .", "a dog ran under the house", "big red house"]
    refs = ["the cat sat on a mat .", "the dog ran under the big house", "a big red house"]
    score, sig = quality.corpus_bleu(hyps, refs)
    assert score == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert "tok:13a" in sig and "version:" in sig and "nrefs:1" in sig
    sb = quality.sentence_bleu(hyps, refs)
    expect = [sacrebleu.sentence_bleu(h, [r], smooth_method="floor", smooth_value=1.1).score
              for h, r in zip(hyps, refs)]
    np.testing.assert_allclose(sb, expect)
    # floor smoothing by hand: precisions 3/4, 1/3, (0 -> 1.1/2), (0 -> 1.1/1), brevity penalty 1
    hand = 100 * (0.75 * (1 / 3) * 0.55 * 1.1) ** 0.25
    assert quality.sentence_bleu(["a b c d"], ["a b x d"])[0] == pytest.approx(hand)
    exp = quality.sentence_bleu(["a b c d"], ["a b x d"], smooth_method="exp")[0]
    assert exp == pytest.approx(sacrebleu.sentence_bleu("a b c d", ["a b x d"]).score)


def _naive_distance(a, b):
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def test_wer_and_alignment_labels():
    we = quality.word_errors("a b c d", "a x c d e")
    assert (we.hits, we.substitutions, we.deletions, we.insertions, we.ref_len) == (3, 1, 0, 1, 4)
    assert quality.token_error_labels("a b c d".split(), "a x c d e".split()).tolist() == [0, 1, 0, 0, 1]
    assert quality.token_error_labels("a b c".split(), "a c".split()).tolist() == [0, 0]  # deletion skipped
    assert quality.token_error_labels("a b".split(), "x a b".split()).tolist() == [1, 0, 0]  # insertion
    ops = [p.op for p in quality.align("a b c".split(), "a c".split())]
    assert ops == ["C", "D", "C"]
    np.testing.assert_allclose(quality.sentence_wer(["a x c d e", "", "x y", ""], ["a b c d", "a b", "", ""]),
                               [50.0, 100.0, 200.0, 0.0])
    assert quality.corpus_wer(["a x c d e", "a"], ["a b c d", "a b"]) == pytest.approx(100 * 3 / 6)
    assert quality.word_errors("A b", "a b", lowercase=True).errors == 0
    rng = np.random.default_rng(3)
    for _ in range(200):
        a = list(rng.choice(list("abcd"), size=int(rng.integers(0, 9))))
        b = list(rng.choice(list("abcd"), size=int(rng.integers(0, 9))))
        steps = quality.align(a, b)
        assert sum(s.op != "C" for s in steps) == _naive_distance(a, b)
        assert [s.hyp_index for s in steps if s.hyp_index is not None] == list(range(len(b)))
        assert [s.ref_index for s in steps if s.ref_index is not None] == list(range(len(a)))


# ------------------------------------------------------------------------------------ io / aggregation


def test_load_groups_sorts_and_aggregates(tmp_path):
    recs = make_records(n_ids=6, nbest=3, seed=4)
    ds = io.load(write_jsonl(tmp_path / "a.jsonl", recs, shuffle_seed=0))
    assert ds.ids.tolist() == list(range(6)) and ds.has_forced and ds.has_hypotheses and ds.model == "ensemble"
    assert [h.rank for h in ds.samples[2].hypotheses] == [0, 1, 2]
    assert "score" in ds.sequence_measures and "total_uncertainty" in ds.token_measures
    assert [len(x) for x in io.select_nbest(ds, 1)] == [1] * 6
    assert [len(x) for x in io.select_nbest(ds, None)] == [3] * 6
    s = ds.samples[0]
    lp = np.array([h.log_prob for h in s.hypotheses])
    w = np.exp(lp - lp.max()) / np.exp(lp - lp.max()).sum()
    tu = np.array([h.sequence["total_uncertainty"] for h in s.hypotheses])
    sc = np.array([h.sequence["score"] for h in s.hypotheses])
    bs = aggregate.sequence_measures(ds, nbest=None, weighting="bs")
    mc = aggregate.sequence_measures(ds, nbest=None, weighting="mc")
    top = aggregate.sequence_measures(ds, nbest=1)
    assert bs["total_uncertainty"][0] == pytest.approx(w @ tu)
    assert mc["total_uncertainty"][0] == pytest.approx(tu.mean())
    assert mc["score"][0] == pytest.approx(-sc.mean())  # negated: lower score = more uncertain
    assert top["score"][0] == pytest.approx(-sc[0])
    kept = aggregate.sequence_measures(ds, nbest=1, negated=())
    assert kept["score"][0] == pytest.approx(sc[0])
    hot = aggregate.nbest_weights([0.0, -1.0], "bs", temperature=0.5)
    assert hot == pytest.approx(np.exp([0.0, -2.0]) / np.exp([0.0, -2.0]).sum())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda lines: [], "empty file"),
        (lambda lines: lines[:3] + ['{"id": 1, "rank": 0,'] + lines[3:], r"line 4: invalid JSON"),
        (lambda lines: lines[:1] + [json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "hypothesis"})]
         + lines[2:], r"line 2: missing field\(s\) hypothesis"),
        (lambda lines: lines[:2] + [_drop_measure(lines[2], "epkl")] + lines[3:],
         r"line 3: sequence measure\(s\) 'epkl' missing"),
        (lambda lines: lines[:1] + [_set_measure(lines[1], "mkl", float("nan"))] + lines[2:],
         r"line 2: sequence measure 'mkl' contains NaN"),
        (lambda lines: lines[:1] + [_set_measure(lines[1], "mkl", float("inf"))] + lines[2:], r"line 2: .*infinite"),
        (lambda lines: lines + [lines[0]], r"duplicate record for id 0 rank 0"),
        (lambda lines: [ln for ln in lines if json.loads(ln)["rank"] != 1], r"ranks \[0, 2\]"),
        (lambda lines: [_short_token(lines[0])] + lines[1:], r"line 1: per-token lists have different lengths"),
        (lambda lines: [lines[0].replace('"id": 0', '"id": "0"', 1)] + lines[1:], r"line 1: field 'id' has type str"),
        (lambda lines: ['{"id": 1, "rank": 0}'], r"line 1: missing field\(s\) reference, hypothesis, score"),
    ],
)
def test_bad_input_errors_name_file_and_line(tmp_path, mutate, message):
    lines = [json.dumps(r) for r in make_records(n_ids=3, nbest=3, seed=5)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(mutate(lines)) + "\n")
    with pytest.raises(ValueError, match=message) as exc:
        io.load(str(path))
    assert str(path) in str(exc.value)


def _drop_measure(line, name):
    r = json.loads(line)
    del r["sequence"][name]
    return json.dumps(r)


def _set_measure(line, name, value):
    r = json.loads(line)
    r["sequence"][name] = value
    return json.dumps(r)  # writes NaN / Infinity literals, which json.loads accepts


def _short_token(line):
    r = json.loads(line)
    r["token"]["log_prob"] = r["token"]["log_prob"][:-1]
    return json.dumps(r)


# ----------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def decodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("decodes")
    for k, name in enumerate(("ensemble", "student")):
        d = root / name
        extra = name == "ensemble"
        write_jsonl(d / "test.jsonl", make_records(60, 3, seed=10 + k, model=name, extra_measure=extra), shuffle_seed=k)
        write_jsonl(d / "perm.jsonl", make_records(40, 3, ood=True, seed=20 + k, model=name, extra_measure=extra))
        write_jsonl(d / "de.jsonl", make_records(40, 3, ood=True, seed=30 + k, model=name, extra_measure=extra))
    return root


def test_cli_end_to_end_two_systems(decodes, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = cli.main([
        "--system", f"ensemble={decodes / 'ensemble'}", "--system", f"student={decodes / 'student'}",
        "--in-domain", "test.jsonl", "--ood", "perm=perm.jsonl", "--ood", "de=de.jsonl",
        "--task", "mt", "--nbest", "all", "--weighting", "bs", "--out-dir", str(out),
    ])
    printed = capsys.readouterr().out
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["systems"]) == {"ensemble", "student"}
    assert rep["config"]["nbest"] == "all" and rep["config"]["negated_measures"] == ["score", "log_prob", "ep_log_prob"]
    for name, res in rep["systems"].items():
        assert set(res["ood"]) == {"perm", "de"}
        sections = ("quality", "ood_quality", "ood", "ood_reference", "error_detection", "token_error_detection",
                    "calibration")
        for section in sections:
            nums = list(_numbers(res[section]))
            assert nums and all(math.isfinite(x) for x in nums), (name, section)
        assert 0 <= res["quality"]["bleu"] <= 100 and "tok:13a" in res["quality"]["bleu_signature"]
        assert res["ood"]["perm"]["total_uncertainty"]["roc_auc"] > 0.8
        assert res["ood"]["perm"]["score"]["roc_auc"] > 0.8  # negated score: sign convention applied
        assert res["error_detection"]["total_uncertainty"] > 0.2
        assert 0 <= res["calibration"]["ece"] <= 1 and res["calibration"]["n_bins"] == 15
        assert set(res["token_error_detection"]) == {"reference", "hypothesis"}
        assert json.dumps(res).count("null") == 0
        forced = [json.loads(ln) for ln in open(decodes / name / "test.jsonl")]
        nll = np.mean([-r["log_prob"] / r["length"] for r in forced if r["rank"] == -1])
        assert res["quality"]["nll"] == pytest.approx(nll)
        assert set(res["ood_quality"]) == {"perm", "de"} and res["ood_quality"]["perm"]["bleu"] < res["quality"]["bleu"]
    assert "var" in rep["systems"]["ensemble"]["error_detection"]
    assert "var" not in rep["systems"]["student"]["error_detection"]
    for text in ("ensemble", "student", "PRR", "ROC-AUC (%): perm", "BLEU signature"):
        assert text in printed
    assert (out / "report.txt").read_text() == printed
    pngs = sorted(os.listdir(out / "plots"))
    for f in ("rejection_total_uncertainty.png", "rejection_var.png", "roc_perm.png", "roc_de.png", "reliability.png"):
        assert f in pngs
        assert (out / "plots" / f).stat().st_size > 1000


def test_cli_asr_file_specs_and_single_system(decodes, tmp_path, capsys):
    ens = decodes / "ensemble"
    rc = cli.main([
        "--system", f"a={ens / 'test.jsonl'},perm:{ens / 'perm.jsonl'}", "--task", "asr", "--nbest", "1",
        "--weighting", "mc", "--ece-bins", "10", "--no-plots", "--out-dir", str(tmp_path / "asr"),
    ])
    assert rc == 0
    rep = json.loads((tmp_path / "asr" / "report.json").read_text())
    q = rep["systems"]["a"]["quality"]
    assert "wer" in q and "bleu" not in q and q["wer"] > 0
    assert rep["config"]["prr_error"] == "wer" and rep["systems"]["a"]["calibration"]["n_bins"] == 10
    assert not (tmp_path / "asr" / "plots").exists()
    assert "WER (%)" in capsys.readouterr().out
    rc = cli.main(["--in-domain", str(ens / "test.jsonl"), "--ood", f"de={ens / 'de.jsonl'}",
                   "--out-dir", str(tmp_path / "one"), "--no-plots"])
    assert rc == 0
    rep = json.loads((tmp_path / "one" / "report.json").read_text())
    assert list(rep["systems"]) == ["ensemble"]  # named after the records' "model" field


def test_cli_mismatched_ids_and_bad_files(decodes, tmp_path, capsys):
    other = write_jsonl(tmp_path / "other" / "test.jsonl", make_records(60, 3, seed=11, id_offset=2))
    rc = cli.main(["--system", f"ensemble={decodes / 'ensemble' / 'test.jsonl'}", "--system", f"student={other}",
                   "--out-dir", str(tmp_path / "x"), "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "mismatched id sets between ensemble" in err
    assert "2 ids only in ensemble" in err and "2 ids only in student" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert cli.main(["--in-domain", str(empty), "--out-dir", str(tmp_path / "y")]) == 1
    assert "empty file" in capsys.readouterr().err
    lines = [json.dumps(r) for r in make_records(5, 2, seed=6)]
    nan = tmp_path / "nan.jsonl"
    nan.write_text("\n".join(lines[:4] + [_set_measure(lines[4], "epkl", float("nan"))] + lines[5:]) + "\n")
    assert cli.main(["--in-domain", str(nan), "--out-dir", str(tmp_path / "z")]) == 1
    assert f"{nan}, line 5: sequence measure 'epkl' contains NaN" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    missing.write_text("\n".join(lines[:2] + [_drop_measure(lines[2], "mkl")] + lines[3:]) + "\n")
    assert cli.main(["--in-domain", str(missing), "--out-dir", str(tmp_path / "w")]) == 1
    assert "line 3: sequence measure(s) 'mkl' missing" in capsys.readouterr().err


def test_report_handles_reference_only_and_constant_measures(tmp_path):
    recs = [r for r in make_records(20, 1, seed=7) if r["rank"] == 0]
    for r in recs:
        r["sequence"]["total_uncertainty"] = 1.0  # constant measure: PRR exactly 0, OOD AUC 0.5
    ind = io.load(write_jsonl(tmp_path / "in.jsonl", recs))
    ood_recs = [r for r in make_records(10, 1, seed=8, ood=True, id_offset=100) if r["rank"] == 0]
    for r in ood_recs:
        r["sequence"]["total_uncertainty"] = 1.0
    od = io.load(write_jsonl(tmp_path / "ood.jsonl", ood_recs))
    res, _ = report.evaluate_system(report.SystemData("s", ind, {"o": od}), report.EvalConfig())
    assert res["error_detection"]["total_uncertainty"] == pytest.approx(0.0, abs=1e-12)
    assert res["ood"]["o"]["total_uncertainty"]["roc_auc"] == pytest.approx(0.5)
    assert res["calibration"]["ece"] is None and "ood_reference" not in res
    assert res["quality"]["nll"] is None


# -------------------------------------------------------------------------------------- OOD sets


def test_ood_set_builders(tmp_path):
    src = ["the cat sat on the mat", "one", "", "a b c d e f g"]
    tgt = ["die Katze", "eins", "", "x"]
    (tmp_path / "t.en").write_text("\n".join(src) + "\n")
    (tmp_path / "t.de").write_text("\n".join(tgt) + "\n")
    a = ood_sets.make_permuted_set(str(tmp_path / "t.en"), str(tmp_path / "t.de"),
                                   str(tmp_path / "p1" / "t.en"), str(tmp_path / "p1" / "t.de"), seed=3)
    ood_sets.make_permuted_set(str(tmp_path / "t.en"), str(tmp_path / "t.de"),
                               str(tmp_path / "p2" / "t.en"), str(tmp_path / "p2" / "t.de"), seed=3)
    perm = ood_sets.read_lines(a[0])
    assert perm == ood_sets.read_lines(str(tmp_path / "p2" / "t.en"))  # seeded
    assert ood_sets.read_lines(a[1]) == tgt
    assert [sorted(p.split()) for p in perm] == [sorted(s.split()) for s in src]
    assert perm[1] == "one" and perm[2] == "" and perm[3] != src[3]
    (tmp_path / "t.fr").write_text("le chat\nun\n\nabc\n")
    rc = ood_sets.main(["swap", "--other-source", str(tmp_path / "t.fr"), "--target", str(tmp_path / "t.de"),
                        "--out-source", str(tmp_path / "fr" / "t.en"), "--out-target", str(tmp_path / "fr" / "t.de")])
    assert rc == 0
    assert ood_sets.read_lines(str(tmp_path / "fr" / "t.en")) == ["le chat", "un", "", "abc"]
    assert ood_sets.read_lines(str(tmp_path / "fr" / "t.de")) == tgt
    (tmp_path / "short.fr").write_text("le chat\n")
    with pytest.raises(ValueError, match="has 1 lines but"):
        ood_sets.make_swapped_source_set(str(tmp_path / "short.fr"), str(tmp_path / "t.de"),
                                         str(tmp_path / "s.en"), str(tmp_path / "s.de"))
    ood_sets.make_swapped_source_set(str(tmp_path / "short.fr"), str(tmp_path / "t.de"),
                                     str(tmp_path / "s.en"), str(tmp_path / "s.de"), truncate=True)
    assert ood_sets.read_lines(str(tmp_path / "s.de")) == ["die Katze"]
