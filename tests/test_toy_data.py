"""The toy translation corpus's CLI: sentence lengths and vocabulary of a harder task."""
import os

import pytest

from fairseq_pdd.data import toy_mt


def _lines(path):
    with open(path) as f:
        return [line.split() for line in f]


def test_cli_writes_longer_sentences_over_a_larger_vocabulary(tmp_path):
    out = str(tmp_path / "raw")
    toy_mt.main([out, "--train", "50", "--valid", "5", "--test", "5", "--vocab-size", "300",
                 "--min-len", "10", "--max-len", "12", "--ood", "20"])
    for split in ("train", "valid", "test", "ood"):
        src, tgt = _lines(os.path.join(out, f"{split}.src")), _lines(os.path.join(out, f"{split}.tgt"))
        assert all(10 <= len(s) <= 12 and len(t) == len(s) for s, t in zip(src, tgt))
    train_words = {int(w[1:]) for s in _lines(os.path.join(out, "train.src")) for w in s}
    ood_words = {int(w[1:]) for s in _lines(os.path.join(out, "ood.src")) for w in s}
    assert max(train_words) < 300 and max(train_words) > 150  # drawn from the whole larger vocabulary
    assert min(ood_words) >= 300 and max(ood_words) < 600


def test_cli_refuses_min_len_above_max_len(tmp_path, capsys):
    with pytest.raises(SystemExit):
        toy_mt.main([str(tmp_path / "raw"), "--min-len", "9", "--max-len", "4"])
    assert "--min-len" in capsys.readouterr().err
