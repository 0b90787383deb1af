"""Shared fixtures: tiny synthetic translation and speech corpora, prepared, each with two trained teachers."""
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from cli_runner import (  # noqa: E402
    ASR_EPOCHS, ASR_N_OOD, ASR_SIZES, asr_train, generate_bleu, preprocess, run, train,
)

from fairseq_pdd import asr_toy_data  # noqa: E402
from fairseq_pdd.toy_data import write_corpus  # noqa: E402


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
    teachers = []
    for seed in (1, 2):
        save = os.path.join(root, f"teacher{seed}")
        train(data, save, root, ["--criterion", "cross_entropy", "--max-epoch", "20", "--seed", str(seed)])
        teachers.append(os.path.join(save, "checkpoint_last.pt"))
    untrained = os.path.join(root, "untrained")
    train(data, untrained, root, ["--criterion", "cross_entropy", "--max-update", "1", "--lr", "1e-12"])
    untrained_bleu = generate_bleu(data, os.path.join(untrained, "checkpoint_last.pt"), root)
    return ToyTranslation(root, data, teachers, untrained_bleu)


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
    raw = asr_toy_data.write_corpus(os.path.join(root, "raw"), ASR_SIZES, ood=ASR_N_OOD, seed=1)
    data = os.path.join(root, "data")
    prep = run(sys.executable, ["-m", "fairseq_pdd.librispeech", "--root", raw, "--subsets", "train,dev,test,ood",
                                "--out-dir", data, "--vocab-size", str(asr_toy_data.TOY_VOCAB_SIZE)], root)
    teachers = [os.path.join(root, f"teacher{s}", "checkpoint_last.pt") for s in (1, 2)]
    args = ["--task", "speech_to_text", "--criterion", "cross_entropy", "--max-epoch", ASR_EPOCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two subprocesses at a time
        jobs = [pool.submit(asr_train, data, os.path.dirname(t), root, [*args, "--seed", str(s)])
                for s, t in zip((1, 2), teachers)]
        for job in jobs:
            job.result()
    return ToySpeech(root, raw, data, prep.stderr, teachers)
