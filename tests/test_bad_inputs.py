"""Bad teachers, checkpoints and set-ups stop fairseq-train / fairseq-generate with an error naming the cause."""
import os
import shutil

import pytest
import torch
from cli_runner import preprocess, run, train

import fairseq_pdd
from fairseq_pdd.cli import user_dir
from fairseq_pdd.toy_data import write_corpus

fairseq_pdd.register()  # the plugin's tasks and criteria, and the weights-only allow-list

ONE_STEP = ["--max-update", "1", "--max-epoch", "1"]


def distil_fails(toy_mt, teachers, name, extra=()):
    """Run a one-update distillation expected to fail; return its stderr."""
    proc = train(
        toy_mt.data,
        os.path.join(toy_mt.root, name),
        toy_mt.root,
        ["--task", "distillation", "--ensemble-paths", teachers,
         "--criterion", "rkl_dirichlet_proxy_distillation", *ONE_STEP, *extra],
        expect_failure=True,
    )
    return proc.stderr


@pytest.fixture(scope="module")
def foreign_teacher(toy_mt):
    """A teacher trained on another corpus, whose dictionary differs from the toy data's."""
    root = os.path.join(toy_mt.root, "foreign")
    raw, _ = write_corpus(os.path.join(root, "raw"), {"train": 200, "valid": 20, "test": 20}, vocab_size=25, seed=9)
    data = preprocess(raw, os.path.join(root, "bin"), root)
    train(data, os.path.join(root, "ck"), root, ["--criterion", "cross_entropy", *ONE_STEP])
    return os.path.join(root, "ck", "checkpoint_last.pt"), data


def test_missing_teacher_checkpoint(toy_mt):
    missing = os.path.join(toy_mt.root, "no_such_teacher.pt")
    err = distil_fails(toy_mt, f"{toy_mt.teachers[0]}:{missing}", "bad_missing")
    assert f"checkpoint not found: {missing}" in err


def test_empty_ensemble_paths_is_an_error_not_cross_entropy(toy_mt):
    err = distil_fails(toy_mt, "", "bad_empty")
    assert "distils an ensemble but --ensemble-paths is empty" in err


def test_criterion_without_distillation_task(toy_mt):
    proc = train(
        toy_mt.data, os.path.join(toy_mt.root, "bad_task"), toy_mt.root,
        ["--criterion", "rkl_dirichlet_proxy_distillation", *ONE_STEP], expect_failure=True,
    )
    assert "needs ensemble statistics" in proc.stderr and "--task distillation" in proc.stderr


def test_teacher_with_other_dictionary(toy_mt, foreign_teacher):
    err = distil_fails(toy_mt, foreign_teacher[0], "bad_dict")
    assert f"teacher {foreign_teacher[0]} was trained with a different source dictionary" in err


def test_teacher_vocabulary_size_without_its_data(toy_mt, foreign_teacher):
    """With the teacher's data directory gone, the vocabulary size is still checked."""
    moved = os.path.join(toy_mt.root, "foreign_teacher_alone.pt")
    shutil.copy(foreign_teacher[0], moved)
    hidden = foreign_teacher[1] + ".hidden"
    os.rename(foreign_teacher[1], hidden)
    try:
        err = distil_fails(toy_mt, moved, "bad_size")
    finally:
        os.rename(hidden, foreign_teacher[1])
    assert f"teacher {moved} has a source vocabulary of" in err
    assert "but the task's source dictionary has" in err


@pytest.fixture(scope="module")
def nan_teacher(toy_mt):
    """The first teacher with one NaN in its (shared) output embedding: every distribution is NaN."""
    state = torch.load(toy_mt.teachers[0], weights_only=True)
    state["model"]["decoder.embed_tokens.weight"][5, 0] = float("nan")
    poisoned = os.path.join(toy_mt.root, "nan_teacher.pt")
    torch.save(state, poisoned)
    return poisoned


def test_non_finite_teacher_outputs(toy_mt, nan_teacher):
    err = distil_fails(toy_mt, f"{toy_mt.teachers[1]}:{nan_teacher}", "bad_nan")
    assert f"non-finite teacher outputs from {nan_teacher} on sample ids [" in err
    assert toy_mt.teachers[1] not in err.split("non-finite teacher outputs from")[1].splitlines()[0]


def test_nan_model_stops_uncertainty_decoding_with_its_name(toy_mt, nan_teacher):
    """fairseq's beam search would turn the NaN into -inf and fail on an assertion at the length limit;
    fairseq-pdd-generate names the model at the first step and leaves no output file."""
    output = os.path.join(toy_mt.root, "nan_decode", "test.jsonl")
    proc = run("fairseq-pdd-generate",
               [toy_mt.data, "--user-dir", user_dir(), "--path", f"{toy_mt.teachers[1]}:{nan_teacher}",
                "--gen-subset", "test", "--beam", "5", "--batch-size", "64", "--cpu", "--quiet",
                "--uncertainty-output", output], toy_mt.root, expect_failure=True)
    assert (f"fairseq-pdd-generate: error: model {nan_teacher} gives NaN log-probabilities at decoding step 0"
            in proc.stderr), proc.stderr[-2000:]
    assert not os.path.exists(output) and not os.path.exists(output + ".tmp")


def test_truncated_checkpoint(toy_mt):
    truncated = os.path.join(toy_mt.root, "truncated.pt")
    with open(toy_mt.teachers[0], "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    err = distil_fails(toy_mt, truncated, "bad_truncated")
    assert f"cannot read checkpoint {truncated} (truncated or corrupt?)" in err


def test_checkpoint_with_unsafe_global_is_refused_by_fairseq_generate(toy_mt, tmp_path):
    """A pickled callable is never unpickled: weights_only stays on, the file and global are named."""
    state = torch.load(toy_mt.teachers[0], weights_only=True)
    state["extra_state"]["hook"] = os.system  # pickled as a global reference to posix.system
    unsafe = str(tmp_path / "unsafe.pt")
    torch.save(state, unsafe)
    proc = run(
        "fairseq-generate",
        [toy_mt.data, "--user-dir", user_dir(), "--path", unsafe, "--cpu", "--max-sentences", "4"],
        toy_mt.root,
        expect_failure=True,
    )
    assert f"refusing to load {unsafe}: it pickles globals outside the allow-list (posix.system)" in proc.stderr
