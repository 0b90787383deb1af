"""Bad teachers, checkpoints and set-ups stop fairseq-train / fairseq-generate with an error naming the cause."""
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from cli_runner import preprocess, run, train

from fairseq_pdd.teachers.checkpoints import load_raw_checkpoint
from fairseq_pdd.cli import user_dir
from fairseq_pdd.data.toy_mt import write_corpus

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


def distil_fails_without_the_teachers_data(toy_mt, foreign_teacher):
    """The foreign teacher copied elsewhere, its data directory hidden meanwhile; (its path, stderr)."""
    moved = os.path.join(toy_mt.root, "foreign_teacher_alone.pt")
    shutil.copy(foreign_teacher[0], moved)
    hidden = foreign_teacher[1] + ".hidden"
    os.rename(foreign_teacher[1], hidden)
    try:
        return moved, distil_fails(toy_mt, moved, "bad_size")
    finally:
        os.rename(hidden, foreign_teacher[1])


def modified_teacher(toy_mt, name, change):
    """``change(state)`` applied to the first teacher's checkpoint, saved as ``toy_mt.root/name``."""
    state = load_raw_checkpoint(toy_mt.teachers[0])  # weights-only, fairseq's classes allow-listed
    change(state)
    path = os.path.join(toy_mt.root, name)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def failures(toy_mt, foreign_teacher):
    """case -> (the bad file it names, stderr) of each failing run of the tests below, two runs at a time
    (each is a fairseq start-up and at most one update)."""
    def poison(state):
        state["model"]["decoder.embed_tokens.weight"][5, 0] = float("nan")

    def add_callable(state):
        state["extra_state"]["hook"] = os.system  # pickled as a global reference to posix.system

    missing = os.path.join(toy_mt.root, "no_such_teacher.pt")
    poisoned = modified_teacher(toy_mt, "nan_teacher.pt", poison)
    unsafe = modified_teacher(toy_mt, "unsafe.pt", add_callable)
    truncated = os.path.join(toy_mt.root, "truncated.pt")
    with open(toy_mt.teachers[0], "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])

    def other_dictionary_then_alone():  # one after the other: the second hides the teacher's data
        other = foreign_teacher[0], distil_fails(toy_mt, foreign_teacher[0], "bad_dict")
        return other, distil_fails_without_the_teachers_data(toy_mt, foreign_teacher)

    def without_task():
        return None, train(toy_mt.data, os.path.join(toy_mt.root, "bad_task"), toy_mt.root,
                           ["--criterion", "rkl_dirichlet_proxy_distillation", *ONE_STEP], expect_failure=True).stderr

    def generate_unsafe():
        return unsafe, run("fairseq-generate", [toy_mt.data, "--user-dir", user_dir(), "--path", unsafe, "--cpu",
                                                "--max-sentences", "4"], toy_mt.root, expect_failure=True).stderr

    def decode_poisoned(source):
        output = os.path.join(toy_mt.root, f"nan_decode_{source}", "test.jsonl")
        return lambda: ((poisoned, output), run(
            "fairseq-pdd-generate",
            [toy_mt.data, "--user-dir", user_dir(), "--path", f"{toy_mt.teachers[1]}:{poisoned}", "--gen-subset",
             "test", "--beam", "5", "--batch-size", "64", "--cpu", "--quiet", "--uncertainty-output", output,
             "--uncertainty-from", source],
            toy_mt.root, expect_failure=True).stderr)

    def distil_case(path, teachers, name):
        return lambda: (path, distil_fails(toy_mt, teachers, name))

    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {"dictionary": pool.submit(other_dictionary_then_alone), "task": pool.submit(without_task),
                "unsafe": pool.submit(generate_unsafe)}
        for source in ("beam", "rescore"):
            jobs[f"nan_decode_{source}"] = pool.submit(decode_poisoned(source))
        for case, path, teachers in (("missing", missing, f"{toy_mt.teachers[0]}:{missing}"), ("empty", None, ""),
                                     ("nan", poisoned, f"{toy_mt.teachers[1]}:{poisoned}"),
                                     ("truncated", truncated, truncated)):
            jobs[case] = pool.submit(distil_case(path, teachers, f"bad_{case}"))
        out = {case: job.result() for case, job in jobs.items()}
    out["other_dictionary"], out["size"] = out.pop("dictionary")
    return out


def test_missing_teacher_checkpoint(failures):
    missing, err = failures["missing"]
    assert f"checkpoint not found: {missing}" in err


def test_empty_ensemble_paths_is_an_error_not_cross_entropy(failures):
    assert "distils an ensemble but --ensemble-paths is empty" in failures["empty"][1]


def test_criterion_without_distillation_task(failures):
    err = failures["task"][1]
    assert "needs ensemble statistics" in err and "--task distillation" in err


def test_teacher_with_other_dictionary(failures):
    teacher, err = failures["other_dictionary"]
    assert f"teacher {teacher} was trained with a different source dictionary" in err


def test_teacher_vocabulary_size_without_its_data(failures):
    """With the teacher's data directory gone, the vocabulary size is still checked."""
    moved, err = failures["size"]
    assert f"teacher {moved} has a source vocabulary of" in err
    assert "but the task's source dictionary has" in err


def test_non_finite_teacher_outputs(toy_mt, failures):
    poisoned, err = failures["nan"]
    assert f"non-finite teacher outputs from {poisoned} on sample ids [" in err
    assert toy_mt.teachers[1] not in err.split("non-finite teacher outputs from")[1].splitlines()[0]


@pytest.mark.parametrize("source", ["beam", "rescore"])
def test_nan_model_stops_uncertainty_decoding_with_its_name(failures, source):
    """fairseq's beam search would turn the NaN into -inf and fail on an assertion at the length limit;
    fairseq-pdd-generate names the model at the first step and leaves no output file, whether the measures
    come from the beam or from re-scoring."""
    (poisoned, output), err = failures[f"nan_decode_{source}"]
    assert f"fairseq-pdd-generate: error: model {poisoned} gives NaN log-probabilities at decoding step 0" in err, \
        err[-2000:]
    assert not os.path.exists(output) and not os.path.exists(output + ".tmp")


def test_truncated_checkpoint(failures):
    truncated, err = failures["truncated"]
    assert f"cannot read checkpoint {truncated} (truncated or corrupt?)" in err


def test_checkpoint_with_unsafe_global_is_refused_by_fairseq_generate(failures):
    """A pickled callable is never unpickled: weights_only stays on, the file and global are named."""
    unsafe, err = failures["unsafe"]
    assert f"refusing to load {unsafe}: it pickles globals outside the allow-list (posix.system)" in err
