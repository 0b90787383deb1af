"""A self-distillation chain through the real fairseq CLI on translation data with noisy training labels.

Step 0 (cross-entropy) memorises the label noise; the step-1 students, trained with
``--criterion gt_mixed_self_distillation`` against step 0 (``--task distillation --ensemble-paths``),
must predict the *clean* validation references better. ``a`` is chosen by
``python -m fairseq_pdd.self_distillation.estimate_gt_weight`` from the a = 0 student and step 0.

Measured with this setup (seeds 1-4 of corpus and training), clean validation NLL in bits/token:
step 0 3.40-3.76, a = 0 student 2.79-3.05, a = 0.5 student 2.97-3.24: gaps of >= 0.37 bits, asserted here
with a margin of 0.25 bits.
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from cli_runner import dry_run_recipe, last_valid, preprocess, train

from fairseq_pdd.self_distillation import estimate_gt_weight
from fairseq_pdd.criterions.self_distillation import GtMixedSelfDistillation, GtMixedSelfDistillationConfig
from fairseq_pdd.data.toy_mt import write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 40
#: No dropout and small batches, so that step 0 memorises the noise in 40 epochs; validation and
#: checkpoints only at the end (the chain uses the last checkpoint as the next teacher).
NOISY_TOY = ["--dropout", "0", "--max-tokens", "200", "--max-epoch", str(EPOCHS),
             "--save-interval", str(EPOCHS), "--validate-interval", str(EPOCHS)]
MARGIN_BITS = 0.25


def python_module(module, args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"python -m {module} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


class Chain:
    def __init__(self, root):
        self.root = root
        raw, _ = write_corpus(os.path.join(root, "raw"), {"train": 300, "valid": 200, "test": 10},
                              vocab_size=20, ambiguous_fraction=0.0, seed=1, label_noise=0.3)
        self.data = preprocess(raw, os.path.join(root, "bin"), root)
        self.logs = {}
        self.train("step0", ["--criterion", "cross_entropy", "--seed", "1"])

    def checkpoint(self, name):
        return os.path.join(self.root, name, "checkpoint_last.pt")

    def train(self, name, extra):
        proc = train(self.data, os.path.join(self.root, name), self.root, [*NOISY_TOY, *extra])
        self.logs[name] = proc.stdout + proc.stderr

    def student(self, name, gt_weight, extra=()):
        self.train(name, ["--task", "distillation", "--ensemble-paths", self.checkpoint("step0"),
                          "--criterion", "gt_mixed_self_distillation", "--gt-weight", str(gt_weight),
                          "--seed", "2", *extra])

    def estimate_args(self, method):
        return [self.data, "--path-a0", self.checkpoint("step1-a0"), "--path-a1", self.checkpoint("step0"),
                "--method", method]


def run_chain(root) -> Chain:
    """Step 0, the a = 0 student, the estimated a and the step-1 student with it."""
    chain = Chain(str(root))
    chain.student("step1-a0", 0)
    chain.estimate = json.loads(python_module("fairseq_pdd.self_distillation.estimate_gt_weight", chain.estimate_args("nll"), chain.root))
    chain.gt_weight = round(chain.estimate["gt_weight"], 4)
    chain.student("step1", chain.gt_weight)
    return chain


BACKGROUND = {"chain": run_chain}  #: the chain runs from the session's start (conftest.Background)


@pytest.fixture(scope="module")
def chain(background):
    return background.result(run_chain)


def test_step1_beats_step0_on_clean_validation_nll(chain):
    step0 = last_valid(chain.logs["step0"], "loss")  # cross_entropy: loss = NLL (bits)
    a0 = last_valid(chain.logs["step1-a0"], "nll_loss")
    step1 = last_valid(chain.logs["step1"], "nll_loss")
    assert a0 < step0 - MARGIN_BITS, (step0, a0)
    assert step1 < step0 - MARGIN_BITS, (step0, step1, chain.gt_weight)


def test_estimated_gt_weight(chain):
    est = chain.estimate
    assert 0.0 < est["gt_weight"] < 1.0, est
    assert est["objective"] < min(est["objective_a0"], est["objective_a1"]), est
    bits = 1 / 0.6931471805599453
    # the command's NLLs of the two students are fairseq's own validation NLLs (bits, rounded to 3 decimals)
    assert est["objective_a1"] * bits == pytest.approx(last_valid(chain.logs["step0"], "loss"), abs=2e-3)
    assert est["objective_a0"] * bits == pytest.approx(last_valid(chain.logs["step1-a0"], "nll_loss"), abs=2e-3)
    brier = estimate_gt_weight.estimate(estimate_gt_weight.build_parser().parse_args(chain.estimate_args("brier")))
    assert 0.0 < brier["gt_weight"] < 1.0 and brier["objective"] < min(brier["objective_a0"], brier["objective_a1"])


def test_logged_metrics(chain):
    log = chain.logs["step1"]
    assert last_valid(log, "gt_weight") == pytest.approx(chain.gt_weight, abs=1e-3)
    ce, kl = last_valid(log, "distill_ce"), last_valid(log, "distill_kl")
    teacher_entropy = last_valid(log, "teacher_entropy")
    assert ce == pytest.approx(kl + teacher_entropy, abs=2e-3) and kl > 0
    assert last_valid(log, "student_entropy") > 0


def test_criterion_refuses_bad_options():
    """Checked when fairseq builds the criterion, before any teacher is loaded."""
    task = SimpleNamespace(target_dictionary=SimpleNamespace(pad=lambda: 1))
    for options, message in (({"gt_weight": 1.5}, "--gt-weight"), ({"sd_temperature": -1.0}, "--sd-temperature")):
        cfg = GtMixedSelfDistillationConfig(**options)
        with pytest.raises(ValueError, match=message):
            GtMixedSelfDistillation(task, cfg)


def test_recipe_dry_run(tmp_path):
    lines = dry_run_recipe("self_distillation", tmp_path, STEPS="2").splitlines()
    trains = [line for line in lines if line.startswith("fairseq-train")]
    assert len(trains) == 5  # step 0, and per step the a = 0 student and the student
    assert "fairseq_pdd.data.toy_mt" in lines[1] and "--label-noise 0.3" in lines[1]
    assert "--task translation --criterion cross_entropy" in trains[0]
    assert all("--task distillation" in t and "--train-subset train --valid-subset valid" in t for t in trains[1:])
    assert sum("fairseq_pdd.self_distillation.estimate_gt_weight" in line for line in lines) == 2
    assert "--ensemble-paths work/step1/checkpoint_last.pt" in trains[-1]
    assert "fairseq_pdd.self_distillation.chain_report" in lines[-1] and "--gt-weights 1\\,\\$A\\,\\$A --task mt" in lines[-1]
