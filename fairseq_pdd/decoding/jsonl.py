"""The JSONL of ``fairseq-pdd-generate``: texts of token ids, measure arrays, and the file itself.

Its cost is per hypothesis record (a text and ~450 numbers), not per model FLOP, so on small models it
was most of the measures' overhead. Three things keep it small:

* :class:`SymbolText` gives exactly ``Dictionary.string(ids, post_process, escape_unk, extra_symbols)``
  by joining the dictionary's symbol list, without that method's per-token calls;
* :func:`measure_arrays` turns a batch's measure tensors into float32 numpy arrays once, and a record
  takes views of them (no Python float per number);
* :class:`JsonlWriter` serialises with ``orjson``, which writes float32 numbers in their shortest
  round-trip form (``0.12345679``, not the float64 expansion ``0.12345679104328156`` of the same
  float32 value) about 7x faster than ``json``; a record read back gives the float32 value exactly
  after ``numpy.float32(x)``.

JSON has no NaN or infinity (orjson would write ``null``), so :func:`measure_arrays` refuses them
with an error naming the measure and the sentence ids rather than write a silent wrong number.
"""
import os
from typing import Dict, Iterable, Mapping, Sequence

import numpy as np
import orjson
import torch
from fairseq.data import data_utils

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


class NonFiniteMeasureError(ValueError):
    """A measure to be written is NaN or infinite (JSON cannot hold it)."""


class SymbolText:
    """``dictionary.string(ids, post_process, escape_unk, extra_symbols_to_ignore=ignored)`` for a list of
    ids: EOS, BOS and ``ignored`` dropped, the unknown word escaped as ``<<unk>>`` if ``escape_unk``, the
    symbols joined by spaces, then fairseq's ``post_process``."""

    def __init__(self, dictionary, post_process, ignored: Iterable[int] = (), escape_unk: bool = False):
        self.symbols = list(dictionary.symbols)
        self.symbols[dictionary.unk()] = dictionary.unk_string(escape_unk)
        self.ignored = set(ignored) | {dictionary.eos(), dictionary.bos()}
        self.post_process = post_process

    def __call__(self, ids: Sequence[int]) -> str:
        symbols, ignored = self.symbols, self.ignored
        return data_utils.post_process(" ".join(symbols[t] for t in ids if t not in ignored), self.post_process)


def measure_arrays(measures: Mapping[str, torch.Tensor], ids: Sequence[int], rows: Sequence[int],
                   mask: torch.Tensor = None) -> Dict[str, np.ndarray]:
    """Each measure as a float32 numpy array (first dimension: hypotheses).

    ``rows[h]`` is hypothesis h's sentence (an index into ``ids``); ``mask`` (H, L), for token measures,
    marks the positions that are written. Raises :class:`NonFiniteMeasureError` naming the measure and
    sentence ids if a written value is NaN or infinite.
    """
    written = None if mask is None else mask.cpu().numpy()
    out = {}
    for key, value in measures.items():
        array = value.detach().to("cpu", torch.float32).numpy()
        bad = ~np.isfinite(array)
        if written is not None:
            bad &= written
        if bad.any():
            hypotheses = np.nonzero(bad.reshape(bad.shape[0], -1).any(1))[0]
            sentences = sorted({ids[rows[h]] for h in hypotheses.tolist()})
            raise NonFiniteMeasureError(f"measure {key!r} is NaN or infinite for sentence ids {sentences[:10]}")
        out[key] = array
    return out


class ReplacedOnCommit:
    """A file written as ``path.tmp`` and renamed to ``path`` by :meth:`commit`; :meth:`discard` removes it,
    so a failed run leaves no half-written file at ``path`` (a killed one leaves only ``path.tmp``)."""

    def __init__(self, path: str, mode: str = "wb", **open_options):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.file = open(path + ".tmp", mode, **open_options)

    def commit(self) -> None:
        self.file.close()
        os.replace(self.path + ".tmp", self.path)

    def discard(self) -> None:
        self.file.close()
        os.remove(self.path + ".tmp")


class JsonlWriter(ReplacedOnCommit):
    """Records to ``path`` via ``path.tmp`` (see :class:`ReplacedOnCommit`)."""

    def __init__(self, path: str):
        super().__init__(path, "wb")

    def write(self, records: Iterable[dict]) -> None:
        self.file.write(b"".join(orjson.dumps(record, option=_OPTIONS) for record in records))
