"""Shared fixtures: a tiny synthetic translation corpus, binarised, with two trained teachers."""
import os
import sys
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from cli_runner import generate_bleu, preprocess, train  # noqa: E402

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
