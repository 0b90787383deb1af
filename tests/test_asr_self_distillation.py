"""Self-distillation with ground-truth mixing on speech, through the real CLIs on the toy speech corpus.

The previous generation is a trained VGG-Transformer of the shared fixture ``toy_asr``. One step:
``fairseq-train --task asr_distillation --ensemble-paths PREVIOUS --criterion gt_mixed_self_distillation``
(a = 0.5, and the a = 0 student that ``python -m fairseq_pdd.self_distillation.estimate_gt_weight`` mixes with the
previous generation, standing in for the step-0 model, to choose ``a`` on the dev subset), decoding
with ``fairseq-pdd-generate --scoring wer --uncertainty-reference`` and the per-step table of
``python -m fairseq_pdd.self_distillation.chain_report --task asr``; and a dry run of the recipe's speech mode.

Measured here: the previous generation (8 epochs) decodes the test subset at WER 62 %, the a = 0.5
student (3 epochs from scratch) at 90 %, an untrained model at about 270 % (tests/test_asr.py).
"""
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import torch
from cli_runner import asr_generate, asr_train, asr_wer, dry_run_recipe, last_valid, run

from fairseq_pdd.data import toy_asr as toy
from fairseq_pdd.self_distillation import estimate_gt_weight
from fairseq_pdd.teachers.checkpoints import load_raw_checkpoint

STUDENT_EPOCHS = "3"
GT_WEIGHT = 0.5
LN2 = math.log(2)
#: the logged self-distillation metrics (nats per token; nll_loss in bits)
METRICS = ("nll_loss", "distill_ce", "distill_kl", "student_entropy", "teacher_entropy", "gt_weight")
#: validation in the same batches as the estimator's (--max-tokens 300): with fairseq's default multiple
#: of 8, its batch_by_size drops a subset's last batch when its size is not a multiple of 8 (issue #5036)
SAME_BATCHES = ["--required-batch-size-multiple", "1"]


@dataclass
class SpeechStep:
    root: str
    data: str
    previous: str  #: the previous generation's checkpoint (the teacher)
    logs: dict = field(default_factory=dict)  #: student name -> fairseq-train output
    decodes: dict = field(default_factory=dict)  #: step -> fairseq-pdd-generate stdout
    estimate: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)  #: chain_report --json
    table: str = ""

    def checkpoint(self, name):
        return os.path.join(self.root, name, "checkpoint_last.pt")

    def jsonl(self, step):
        return os.path.join(self.root, "eval", f"step{step}-test.jsonl")

    def student(self, name, gt_weight):
        proc = asr_train(self.data, os.path.dirname(self.checkpoint(name)), self.root,
                         ["--task", "asr_distillation", "--ensemble-paths", self.previous,
                          "--criterion", "gt_mixed_self_distillation", "--gt-weight", str(gt_weight),
                          "--max-epoch", STUDENT_EPOCHS, "--seed", "2", *SAME_BATCHES])
        return proc.stdout + proc.stderr

    def decode(self, step, path):
        return asr_generate("fairseq-pdd-generate", self.data, path, "test", self.root,
                            ["--uncertainty-reference", "--uncertainty-output", self.jsonl(step)]).stdout


@pytest.fixture(scope="module")
def step(toy_asr, tmp_path_factory):
    out = SpeechStep(str(tmp_path_factory.mktemp("asr_self_distillation")), toy_asr.data, toy_asr.teachers[0])
    with ThreadPoolExecutor(max_workers=2) as pool:  # two subprocesses at a time, in submission order
        a0 = pool.submit(out.student, "step1-a0", 0)
        step1 = pool.submit(out.student, "step1", GT_WEIGHT)
        decode0 = pool.submit(out.decode, 0, out.previous)
        out.logs["step1-a0"] = a0.result()
        estimate = pool.submit(run, sys.executable, [
            "-m", "fairseq_pdd.self_distillation.estimate_gt_weight", out.data, "--path-a0", out.checkpoint("step1-a0"),
            "--path-a1", out.previous, "--subset", "dev", "--max-tokens", "300"], out.root)
        out.logs["step1"] = step1.result()
        decode1 = pool.submit(out.decode, 1, out.checkpoint("step1"))
        out.decodes = {0: decode0.result(), 1: decode1.result()}
        out.estimate = json.loads(estimate.result().stdout)
    report = os.path.join(out.root, "chain.json")
    out.table = run(sys.executable, ["-m", "fairseq_pdd.self_distillation.chain_report", out.jsonl(0), out.jsonl(1),
                                     "--gt-weights", f"1,{GT_WEIGHT}", "--task", "asr", "--json", report],
                    out.root).stdout
    with open(report) as f:
        out.rows = json.load(f)
    return out


def test_speech_step_logs_the_self_distillation_metrics(step):
    """Every metric on the train and dev lines, finite; the loss is a * NLL + (1 - a) * CE(teacher, student)."""
    for name, a in (("step1", GT_WEIGHT), ("step1-a0", 0.0)):
        log = step.logs[name]
        assert f"loaded 1 teachers (torch.float32): {step.previous}" in log
        train_lines = [line for line in log.splitlines() if "| train | epoch" in line]
        assert len(train_lines) == int(STUDENT_EPOCHS)
        assert all(f"| {key} " in train_lines[-1] for key in METRICS), train_lines[-1]
        values = {key: last_valid(log, key, "dev") for key in ("loss", *METRICS)}
        assert all(math.isfinite(v) for v in values.values()), values
        assert values["gt_weight"] == a
        assert values["distill_kl"] > 0 and values["student_entropy"] > 0 and values["teacher_entropy"] > 0
        assert values["distill_ce"] == pytest.approx(values["distill_kl"] + values["teacher_entropy"], abs=2e-3)
        mixed = a * values["nll_loss"] * LN2 + (1 - a) * values["distill_ce"]  # nats per token
        assert values["loss"] * LN2 == pytest.approx(mixed, abs=3e-3), values


def test_estimator_chooses_a_on_speech_data(step):
    """The JSON of the a-estimator on the dev subset; its NLL of the a = 0 student is fairseq's own
    validation NLL of that student (same batches)."""
    est = step.estimate
    assert est["method"] == "nll" and est["subset"] == "dev" and est["num_tokens"] > 0
    assert 0.0 <= est["gt_weight"] <= 1.0
    assert est["objective"] <= min(est["objective_a0"], est["objective_a1"]) + 1e-9
    assert est["objective_a0"] / LN2 == pytest.approx(last_valid(step.logs["step1-a0"], "nll_loss", "dev"), abs=2e-3)


def test_wer_decoded_and_chain_report(step):
    """The per-step table has fairseq's WER of each step's decoding; gold NLL, entropy and ECE finite."""
    assert [r["step"] for r in step.rows] == [0, 1] and [r["gt_weight"] for r in step.rows] == [1.0, GT_WEIGHT]
    for row in step.rows:
        assert row["quality"] == pytest.approx(asr_wer(step.decodes[row["step"]]), abs=0.01)
        assert row["tokens"] > 0 and all(math.isfinite(row[k]) for k in ("nll", "entropy", "accuracy", "ece"))
    assert step.rows[0]["quality"] < 75 and step.rows[1]["quality"] < 100  # untrained: about 270 %
    assert step.table.splitlines()[0].split()[:3] == ["step", "a", "WER"]


def test_speech_recipe_dry_run(tmp_path):
    """TASK=asr: the toy speech corpus with noisy transcripts, speech_to_text for step 0 and
    asr_distillation for the students, a chosen on the dev subset, decoding with WER, the table with WER."""
    lines = dry_run_recipe("self_distillation", tmp_path, TASK="asr", STEPS="2").splitlines()
    assert "-m fairseq_pdd.data.toy_asr work/raw " in lines[1] and "--label-noise 0.3" in lines[1]
    assert "-m fairseq_pdd.data.librispeech --root work/raw --subsets train\\,dev\\,test" in lines[2]
    trains = [line for line in lines if line.startswith("fairseq-train work/data ")]
    assert len(trains) == 5  # step 0, and per step the a = 0 student and the student
    assert all("--arch pdd_vggtransformer_tiny" in t and "--train-subset train --valid-subset dev" in t for t in trains)
    assert "--task speech_to_text --criterion cross_entropy" in trains[0]
    assert all("--task asr_distillation" in t and "--criterion gt_mixed_self_distillation" in t for t in trains[1:])
    assert "--ensemble-paths work/step1/checkpoint_last.pt" in trains[-1]
    estimates = [line for line in lines if "fairseq_pdd.self_distillation.estimate_gt_weight" in line]
    assert len(estimates) == 2 and all("--subset dev" in e for e in estimates)
    decodes = [line for line in lines if line.startswith("fairseq-pdd-generate")]
    assert len(decodes) == 3 and all("--gen-subset test" in d and "--task speech_to_text --scoring wer" in d
                                     for d in decodes)
    assert "fairseq_pdd.self_distillation.chain_report" in lines[-1] and "--task asr" in lines[-1]


def test_speech_recipe_dry_run_on_prepared_librispeech(tmp_path):
    """With DATA (prepared by recipes/librispeech/prepare.sh) no toy corpus is written; subsets as given."""
    text = dry_run_recipe("self_distillation", tmp_path, TASK="asr", STEPS="1", GT_WEIGHT="0.6", DATA="ls/data",
                          TRAIN_SUBSET="train-clean-100", VALID_SUBSET="dev-clean", EVAL_SUBSET="test-clean")
    lines = text.splitlines()
    assert not any("fairseq_pdd.data.toy_asr" in line or "fairseq_pdd.data.librispeech" in line for line in lines)
    trains = [line for line in lines if line.startswith("fairseq-train ls/data ")]
    assert len(trains) == 2 and "--gt-weight 0.6" in trains[1]
    assert all("--train-subset train-clean-100 --valid-subset dev-clean" in t for t in trains)
    assert "--gen-subset test-clean" in text and "--gt-weights 1\\,0.6 --task asr" in lines[-1]


def test_toy_speech_label_noise_changes_only_training_transcripts(tmp_path, capsys):
    """--label-noise replaces words of the train transcripts (the audio and the other subsets unchanged)."""
    sizes = {"train": 60, "dev": 4}
    clean = toy.write_corpus(str(tmp_path / "clean"), sizes, seed=3)
    noisy = toy.write_corpus(str(tmp_path / "noisy"), sizes, seed=3, label_noise=0.5)
    changed = total = 0
    for subset in sizes:
        for folder, _, files in os.walk(os.path.join(clean, subset)):
            other = folder.replace(clean, noisy, 1)
            for name in files:
                with open(os.path.join(folder, name), "rb") as f, open(os.path.join(other, name), "rb") as g:
                    a, b = f.read(), g.read()
                if name.endswith(".flac") or subset == "dev":
                    assert a == b, (subset, name)
                else:
                    lines = zip(a.decode().splitlines(), b.decode().splitlines())
                    pairs = [(x.split()[1:], y.split()[1:]) for x, y in lines]
                    assert all(len(x) == len(y) and set(y) <= {w.upper() for w in toy.WORDS} for x, y in pairs)
                    changed += sum(u != v for x, y in pairs for u, v in zip(x, y))
                    total += sum(len(x) for x, _ in pairs)
    # a replaced word stays the same with probability 1/10: about 45 % of the words change
    assert 0.3 < changed / total < 0.6, (changed, total)
    with pytest.raises(SystemExit):
        toy.main([str(tmp_path / "bad"), "--label-noise", "1.5"])
    assert "--label-noise: label_noise must lie in [0, 1], got 1.5" in capsys.readouterr().err


def test_estimator_ignores_the_students_teacher_cache(step, tmp_path):
    """A student trained from a teacher cache keeps --teacher-cache in its task options; the estimator
    scores the students only, so it reads no cache (here: one that does not exist) and gives the same a."""
    state = load_raw_checkpoint(step.checkpoint("step1-a0"))
    state["cfg"]["task"].teacher_cache = str(tmp_path / "missing_cache")
    cached = str(tmp_path / "a0_from_cache.pt")
    torch.save(state, cached)
    args = estimate_gt_weight.build_parser().parse_args(
        [step.data, "--path-a0", cached, "--path-a1", step.previous, "--subset", "dev", "--max-tokens", "300"])
    result = estimate_gt_weight.estimate(args)
    assert result["gt_weight"] == pytest.approx(step.estimate["gt_weight"], abs=1e-6)
