"""Shared fixtures: tiny synthetic translation and speech corpora, prepared, each with two trained teachers;
two students distilled from the translation teachers; long jobs run in the background (see ``background``)."""
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from cli_runner import (  # noqa: E402
    ASR_EPOCHS, ASR_N_OOD, ASR_SIZES, STUDENT_EPOCHS, asr_train, distil, generate_bleu, preprocess, run, train,
)

from fairseq_pdd.data import toy_asr as toy_speech  # noqa: E402
from fairseq_pdd.data.toy_mt import write_corpus  # noqa: E402


@dataclass
class ToyTranslation:
    root: str
    data: str  #: fairseq-preprocess output
    teachers: list  #: checkpoint paths
    untrained_bleu: float


@pytest.fixture(scope="session")
def toy_mt(tmp_path_factory) -> ToyTranslation:
    root = str(tmp_path_factory.mktemp("toy_mt"))
    raw, _ = write_corpus(os.path.join(root, "raw"), {"train": 2000, "valid": 100, "test": 100}, seed=1)
    data = preprocess(raw, os.path.join(root, "bin"), root)
    teachers = [os.path.join(root, f"teacher{seed}", "checkpoint_last.pt") for seed in (1, 2)]
    untrained = os.path.join(root, "untrained")

    def untrained_bleu() -> float:
        train(data, untrained, root, ["--criterion", "cross_entropy", "--max-update", "1", "--lr", "1e-12"])
        return generate_bleu(data, os.path.join(untrained, "checkpoint_last.pt"), root)

    with ThreadPoolExecutor(max_workers=2) as pool:  # two subprocesses at a time
        jobs = [pool.submit(train, data, os.path.dirname(t), root,
                            ["--criterion", "cross_entropy", "--max-epoch", "20", "--seed", str(s)])
                for s, t in zip((1, 2), teachers)]
        bleu = pool.submit(untrained_bleu)
        for job in jobs:
            job.result()
        return ToyTranslation(root, data, teachers, bleu.result())


@dataclass
class Students:
    """(checkpoint, fairseq-train log) of each student, trained for 12 epochs from scratch on ``toy_mt``."""
    kd: tuple  #: forward_kl_mean_distillation (KD to the ensemble mean)
    pd: tuple  #: rkl_dirichlet_proxy_distillation (PD-EnD2)
    pd_tensorboard: str  #: the PD-EnD2 run's --tensorboard-logdir


@pytest.fixture(scope="session")
def students(toy_mt) -> Students:
    """The KD and PD-EnD2 students of the toy teachers, trained side by side (seed 3); the PD-EnD2 run
    also writes TensorBoard event files."""
    tensorboard = os.path.join(toy_mt.root, "student_pd_tensorboard")
    with ThreadPoolExecutor(max_workers=2) as pool:
        kd = pool.submit(distil, toy_mt, "forward_kl_mean_distillation", "student_kd", STUDENT_EPOCHS)
        # offset 1 (not the criterion's default 0): its Dirichlet mean then differs from softmax(z), which the
        # decoding tests need to tell which one fairseq-pdd-generate ranks by
        pd = pool.submit(distil, toy_mt, "rkl_dirichlet_proxy_distillation", "student_pd", STUDENT_EPOCHS,
                         ["--tensorboard-logdir", tensorboard, "--model-offset", "1"])
        return Students(kd.result(), pd.result(), tensorboard)


@dataclass
class ToySpeech:
    root: str
    raw: str  #: LibriSpeech-layout corpus (train, dev, test, ood)
    data: str  #: fairseq-pdd-prepare-librispeech output
    prepare_stderr: str
    teachers: list  #: two VGG-Transformer checkpoints (speech_to_text, cross_entropy)


@pytest.fixture(scope="session")
def toy_asr(tmp_path_factory) -> ToySpeech:
    """A synthetic speech corpus, prepared as the LibriSpeech recipe does, with two trained teachers."""
    root = str(tmp_path_factory.mktemp("toy_asr"))
    raw = toy_speech.write_corpus(os.path.join(root, "raw"), ASR_SIZES, ood=ASR_N_OOD, seed=1)
    data = os.path.join(root, "data")
    prep = run(sys.executable, ["-m", "fairseq_pdd.data.librispeech", "--root", raw, "--subsets", "train,dev,test,ood",
                                "--out-dir", data, "--vocab-size", str(toy_speech.TOY_VOCAB_SIZE)], root)
    teachers = [os.path.join(root, f"teacher{s}", "checkpoint_last.pt") for s in (1, 2)]
    args = ["--task", "speech_to_text", "--criterion", "cross_entropy", "--max-epoch", ASR_EPOCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two subprocesses at a time
        jobs = [pool.submit(asr_train, data, os.path.dirname(t), root, [*args, "--seed", str(s)])
                for s, t in zip((1, 2), teachers)]
        for job in jobs:
            job.result()
    return ToySpeech(root, raw, data, prep.stderr, teachers)


class Background:
    """Long serial jobs (a recipe's run, a training chain: one single-threaded subprocess at a time) run
    one after another on a thread of their own from the session's start, in the order the tests need
    them, so that they overlap the tests before them on a second core.

    A test module declares ``BACKGROUND = {fixture_name: job}``; ``job(root)`` (``root``: a fresh
    temporary folder) is started when a selected test uses that fixture, which returns
    ``background.result(job)``: the job's value, or its exception raised again."""

    def __init__(self, session, tmp_path_factory):
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.futures = {}
        for item in session.items:  # in the order the tests run
            module = getattr(item, "module", None)
            for name, job in getattr(module, "BACKGROUND", {}).items():
                if name in item.fixturenames and job not in self.futures:
                    root = tmp_path_factory.mktemp(f"{module.__name__.rpartition('.')[2]}_{name}")
                    self.futures[job] = self.pool.submit(job, root)

    def result(self, job):
        return self.futures[job].result()


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    jobs = Background(request.session, tmp_path_factory)
    yield jobs
    jobs.pool.shutdown(cancel_futures=True)
