"""End to end through the real fairseq CLI: teachers -> distilled students -> fairseq-generate + sacrebleu."""
import glob
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
from cli_runner import STUDENT_EPOCHS, distil, generate_bleu, last_valid, valid_losses


FINETUNED = ["dirichlet_proxy_distillation", "sequence_distribution_distillation"]
HALF = ["--fp16-ensemble", "--bf16-ensemble"]


@pytest.fixture(scope="module")
def runs(toy_mt, students):
    """Every training and decoding of this module, two subprocesses at a time: ``("finetuned", criterion)``
    and ``("half", flag)`` -> (checkpoint, log); ``("bleu", system)`` -> BLEU of fairseq-generate."""
    def finetuned(criterion):
        """Forward KL to the proxy and EnD2's NLL, from the KD student (3 epochs); with its BLEU."""
        checkpoint, log = distil(toy_mt, criterion, f"student_{criterion}", 3,
                                 ["--finetune-from-model", students.kd[0], "--lr", "1e-3"])
        return checkpoint, log, generate_bleu(toy_mt.data, checkpoint, toy_mt.root)

    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {("finetuned", c): pool.submit(finetuned, c) for c in FINETUNED}
        jobs.update({("half", flag): pool.submit(distil, toy_mt, "rkl_dirichlet_proxy_distillation", f"student{flag}",
                                                 1, [flag, "--max-update", "2"]) for flag in HALF})
        for system, path in (("kd", students.kd[0]), ("pd", students.pd[0]), ("ensemble", ":".join(toy_mt.teachers))):
            jobs["bleu", system] = pool.submit(generate_bleu, toy_mt.data, path, toy_mt.root)
        return {key: job.result() for key, job in jobs.items()}


def assert_learned(toy_mt, log, bleu, epochs, dirichlet):
    losses = valid_losses(log)
    assert len(losses) == epochs and losses[-1] < losses[0], losses
    for key in ("nll_loss", "ensemble_mkl", "ensemble_epkl", "ensemble_mi", "ensemble_precision"):
        assert f"| {key} " in log, key
    assert ("| precision " in log) == dirichlet
    assert bleu > toy_mt.untrained_bleu + 5, (bleu, toy_mt.untrained_bleu)


def test_kd_to_ensemble_mean(toy_mt, students, runs):
    assert_learned(toy_mt, students.kd[1], runs["bleu", "kd"], epochs=STUDENT_EPOCHS, dirichlet=False)


def test_pd_end2_from_scratch(toy_mt, students, runs):
    assert_learned(toy_mt, students.pd[1], runs["bleu", "pd"], epochs=STUDENT_EPOCHS, dirichlet=True)


@pytest.mark.parametrize("criterion", FINETUNED)
def test_unnormalised_dirichlet_losses_from_kd_student(toy_mt, runs, criterion):
    """Forward KL to the proxy and EnD2's NLL have per-token scales that grow with the proxy
    precision (no 1/B as in PD-EnD2); from scratch they collapse to a flat Dirichlet on this task,
    so, as usual for them, the student starts from the KD student (fairseq's --finetune-from-model)."""
    _, log, bleu = runs["finetuned", criterion]
    assert_learned(toy_mt, log, bleu, epochs=3, dirichlet=True)


def test_teachers_decode_as_ensemble(toy_mt, runs):
    """fairseq-generate loads the teachers (weights-only, through the plugin) as an ensemble."""
    assert runs["bleu", "ensemble"] > toy_mt.untrained_bleu + 5


def valid_stat(log, key):
    """The last validation value of ``key`` in a fairseq-train log."""
    lines = [line for line in log.splitlines() if "valid on 'valid' subset" in line]
    return float(re.search(rf"\| {key} ([-\d.]+)", lines[-1]).group(1))


@pytest.mark.parametrize("flag", HALF)
def test_half_precision_teachers(students, runs, flag):
    """Teachers in fp16/bf16 give the same validation statistics as in fp32, to their precision."""
    _, log = runs["half", flag]
    for key in ("ensemble_mkl", "ensemble_epkl"):
        assert valid_stat(log, key) == pytest.approx(valid_stat(students.kd[1], key), rel=0.05), key


def tensorboard_scalars(logdir: str) -> dict:
    """``{writer folder: {tag: [(step, value), ...]}}`` of every event file under ``logdir``, read record by
    record (TFRecord framing: uint64 length, its CRC, the ``Event`` protobuf, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in glob.glob(os.path.join(logdir, "*", "events.out.tfevents.*")):
        tags = scalars.setdefault(os.path.basename(os.path.dirname(path)), {})
        with open(path, "rb") as f:
            while header := f.read(12):
                (length,) = struct.unpack("<Q", header[:8])
                event = Event.FromString(f.read(length))
                assert len(f.read(4)) == 4, f"{path}: truncated record"
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_logdir_records_the_criterion_metrics(students):
    """``fairseq-train --tensorboard-logdir`` works out of the box (tensorboardX is a dependency): the PD-EnD2
    student's run wrote event files whose train and valid scalars are the criterion's metrics, one per epoch."""
    log = students.pd[1]
    assert "tensorboard not found" not in log
    scalars = tensorboard_scalars(students.pd_tensorboard)
    for writer in ("train", "valid"):
        assert writer in scalars, (writer, sorted(scalars))
        for tag in ("loss", "nll_loss", "ensemble_mkl", "ensemble_precision", "precision", "log_precision"):
            assert tag in scalars[writer], (writer, tag, sorted(scalars[writer]))
            steps = [step for step, _ in scalars[writer][tag]]
            assert len(steps) == STUDENT_EPOCHS and steps == sorted(steps), (writer, tag, steps)
    assert scalars["valid"]["ensemble_mkl"][-1][1] == pytest.approx(last_valid(log, "ensemble_mkl"), abs=1e-3)
    assert scalars["valid"]["precision"][-1][1] == pytest.approx(last_valid(log, "precision"), rel=1e-3)
