"""End to end through the real fairseq CLI: teachers -> distilled students -> fairseq-generate + sacrebleu."""
import os
import re

import pytest
from cli_runner import generate_bleu, train, valid_losses


def distil(toy_mt, criterion, name, epochs, extra=()):
    """Train a student with ``criterion`` on the teachers; return (checkpoint, log)."""
    save = os.path.join(toy_mt.root, name)
    proc = train(
        toy_mt.data,
        save,
        toy_mt.root,
        ["--task", "distillation", "--ensemble-paths", ":".join(toy_mt.teachers),
         "--criterion", criterion, "--max-epoch", str(epochs), "--seed", "3", *extra],
    )
    return os.path.join(save, "checkpoint_last.pt"), proc.stdout + proc.stderr


def assert_learned(toy_mt, checkpoint, log, epochs, dirichlet):
    losses = valid_losses(log)
    assert len(losses) == epochs and losses[-1] < losses[0], losses
    for key in ("nll_loss", "ensemble_mkl", "ensemble_epkl", "ensemble_mi", "ensemble_precision"):
        assert f"| {key} " in log, key
    assert ("| precision " in log) == dirichlet
    bleu = generate_bleu(toy_mt.data, checkpoint, toy_mt.root)
    assert bleu > toy_mt.untrained_bleu + 5, (bleu, toy_mt.untrained_bleu)


@pytest.fixture(scope="module")
def kd_student(toy_mt):
    return distil(toy_mt, "forward_kl_mean_distillation", "student_kd", 12)


def test_kd_to_ensemble_mean(toy_mt, kd_student):
    assert_learned(toy_mt, *kd_student, epochs=12, dirichlet=False)


def test_pd_end2_from_scratch(toy_mt):
    checkpoint, log = distil(toy_mt, "rkl_dirichlet_proxy_distillation", "student_pd", 12)
    assert_learned(toy_mt, checkpoint, log, epochs=12, dirichlet=True)


@pytest.mark.parametrize("criterion", ["dirichlet_proxy_distillation", "sequence_distribution_distillation"])
def test_unnormalised_dirichlet_losses_from_kd_student(toy_mt, kd_student, criterion):
    """Forward KL to the proxy and EnD2's NLL have per-token scales that grow with the proxy
    precision (no 1/B as in PD-EnD2); from scratch they collapse to a flat Dirichlet on this task,
    so, as usual for them, the student starts from the KD student (fairseq's --finetune-from-model)."""
    checkpoint, log = distil(
        toy_mt, criterion, f"student_{criterion}", 3,
        ["--finetune-from-model", kd_student[0], "--lr", "1e-3"],
    )
    assert_learned(toy_mt, checkpoint, log, epochs=3, dirichlet=True)


def test_teachers_decode_as_ensemble(toy_mt):
    """fairseq-generate loads the teachers (weights-only, through the plugin) as an ensemble."""
    bleu = generate_bleu(toy_mt.data, ":".join(toy_mt.teachers), toy_mt.root)
    assert bleu > toy_mt.untrained_bleu + 5


def valid_stat(log, key):
    """The last validation value of ``key`` in a fairseq-train log."""
    lines = [line for line in log.splitlines() if "valid on 'valid' subset" in line]
    return float(re.search(rf"\| {key} ([-\d.]+)", lines[-1]).group(1))


@pytest.mark.parametrize("flag", ["--fp16-ensemble", "--bf16-ensemble"])
def test_half_precision_teachers(toy_mt, kd_student, flag):
    """Teachers in fp16/bf16 give the same validation statistics as in fp32, to their precision."""
    _, log = distil(toy_mt, "rkl_dirichlet_proxy_distillation", f"student{flag}", 1, [flag, "--max-update", "2"])
    for key in ("ensemble_mkl", "ensemble_epkl"):
        assert valid_stat(log, key) == pytest.approx(valid_stat(kd_student[1], key), rel=0.05), key
