"""The JSONL pieces of fairseq-pdd-generate: texts equal Dictionary.string, float32 numbers round-trip,
non-finite measures are refused, and a discarded file leaves nothing behind."""
import json
import os

import numpy as np
import pytest
import torch
from fairseq.data import Dictionary

from fairseq_pdd.decoding.jsonl import JsonlWriter, NonFiniteMeasureError, SymbolText, measure_arrays


@pytest.fixture
def dictionary():
    d = Dictionary()
    for word in ["▁a", "b@@", "c", "▁dé", "x"]:
        d.add_symbol(word)
    return d


@pytest.mark.parametrize("post_process", [None, "@@ ", "sentencepiece"])
@pytest.mark.parametrize("escape_unk", [False, True])
def test_symbol_text_equals_dictionary_string(dictionary, post_process, escape_unk):
    x = dictionary.index("x")
    rows = [
        [dictionary.index("▁a"), dictionary.index("b@@"), dictionary.index("c"), dictionary.eos()],
        [dictionary.bos(), dictionary.unk(), x, dictionary.index("▁dé"), dictionary.eos()],
        [dictionary.eos()],
        [x, x],
    ]
    text = SymbolText(dictionary, post_process, ignored=[x], escape_unk=escape_unk)
    for ids in rows:
        expected = dictionary.string(torch.tensor(ids), post_process, escape_unk=escape_unk,
                                     extra_symbols_to_ignore=[x])
        assert text(ids) == expected


def test_measure_arrays_are_float32_and_round_trip_through_the_jsonl(tmp_path):
    torch.manual_seed(0)
    values = torch.rand(3, 4) * 10 - 5
    arrays = measure_arrays({"m": values}, ids=[7, 8], rows=[0, 1, 1], mask=torch.ones(3, 4, dtype=torch.bool))
    assert arrays["m"].dtype == np.float32
    path = str(tmp_path / "out" / "u.jsonl")
    writer = JsonlWriter(path)
    writer.write([{"id": i, "token": {"m": arrays["m"][i, :3]}, "s": arrays["m"][i, 3]} for i in range(3)])
    assert not os.path.exists(path)  # only the temporary until commit
    writer.commit()
    with open(path) as f:
        records = [json.loads(line) for line in f]
    back = np.array([r["token"]["m"] + [r["s"]] for r in records], dtype=np.float32)
    assert np.array_equal(back, values.numpy())  # every float32 value exactly
    assert not os.path.exists(path + ".tmp")


def test_discarded_writer_leaves_nothing(tmp_path):
    path = str(tmp_path / "u.jsonl")
    writer = JsonlWriter(path)
    writer.write([{"id": 0}])
    writer.discard()
    assert os.listdir(tmp_path) == []


def test_non_finite_measure_names_the_measure_and_sentences():
    values = torch.zeros(3, 4)
    values[2, 1] = float("nan")
    values[0, 3] = float("inf")  # outside hypothesis 0's mask: never written, so allowed
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    with pytest.raises(NonFiniteMeasureError, match=r"measure 'mutual_information' is NaN or infinite for "
                                                    r"sentence ids \[12\]"):
        measure_arrays({"total_uncertainty": torch.ones(3, 4), "mutual_information": values},
                       ids=[11, 12], rows=[0, 0, 1], mask=mask)
    values[2, 1] = 0.0
    assert measure_arrays({"mutual_information": values}, ids=[11, 12], rows=[0, 0, 1], mask=mask)
    with pytest.raises(NonFiniteMeasureError, match=r"'score' .* \[11\]"):
        measure_arrays({"score": torch.tensor([0.0, -float("inf"), 1.0])}, ids=[11, 12], rows=[0, 0, 1])
