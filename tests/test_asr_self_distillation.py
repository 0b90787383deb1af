"""Self-distillation with ground-truth mixing on speech, through the real CLIs on the toy speech corpus.

The previous generation is a trained VGG-Transformer of the shared fixture ``toy_asr``. One step:
``fairseq-train --task asr_distillation --ensemble-paths PREVIOUS --criterion gt_mixed_self_distillation``
(a = 0.5, and the a = 0 student that ``python -m fairseq_pdd.estimate_gt_weight`` mixes with the
previous generation, standing in for the step-0 model, to choose ``a`` on the dev subset), decoding
with ``fairseq-pdd-generate --scoring wer --uncertainty-reference`` and the per-step table of
``python -m fairseq_pdd.chain_report --task asr``; and a dry run of the recipe's speech mode.

Measured here: the previous generation (8 epochs) decodes the test subset at WER 62 %, the a = 0.5
student (3 epochs, fresh) at about 77 %, an untrained model at about 270 % (tests/test_asr.py).
"""
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from cli_runner import asr_generate, asr_train, asr_wer, dry_run_recipe, last_valid, run

STUDENT_EPOCHS = "3"
GT_WEIGHT = 0.5
LN2 = math.log(2)
#: the logged self-distillation metrics (nats per token; nll_loss in bits)
METRICS = ("nll_loss", "distill_ce", "distill_kl", "student_entropy", "teacher_entropy", "gt_weight")
#: validation in the same batches as the estimator's (--max-tokens 300): fairseq's default multiple of 8
#: makes its batch_by_size drop the last utterances of the dev subset when batches hold fewer than 8
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
            "-m", "fairseq_pdd.estimate_gt_weight", out.data, "--path-a0", out.checkpoint("step1-a0"),
            "--path-a1", out.previous, "--subset", "dev", "--max-tokens", "300"], out.root)
        out.logs["step1"] = step1.result()
        decode1 = pool.submit(out.decode, 1, out.checkpoint("step1"))
        out.decodes = {0: decode0.result(), 1: decode1.result()}
        out.estimate = json.loads(estimate.result().stdout)
    report = os.path.join(out.root, "chain.json")
    out.table = run(sys.executable, ["-m", "fairseq_pdd.chain_report", out.jsonl(0), out.jsonl(1),
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
    assert step.rows[0]["quality"] < 75 and step.rows[1]["quality"] < 95  # untrained: about 270 %
    assert step.table.splitlines()[0].split()[:3] == ["step", "a", "WER"]
