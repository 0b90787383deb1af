"""On-disk format of the offline teacher cache: memory-mapped arrays, a JSON header, validation.

One cached subset is a directory ``CACHE/{subset}/`` (written by ``python -m
fairseq_pdd.teachers.build_cache``) holding ``.npy`` arrays, opened memory-mapped, with the rows of all
target tokens of the subset in dataset order (sentence 0's tokens, then sentence 1's, ...):

=================  ==============  =========================================================
``offsets.npy``    int64 (S+1,)    sentence i owns rows ``offsets[i]:offsets[i+1]`` (fairseq
                                   sample id = dataset index i, positions in target order)
``target.npy``     int32 (N,)      the target token of each row (alignment check)
``ids.npy``        int32 (N, k)    top-k classes of the ensemble mean
``probs.npy``      f16/f32 (N, k)  the ensemble mean at ``ids``
``scalars.npy``    f32 (N, C)      columns :data:`SCALAR_COLUMNS` (+ ``rest_log_prob``)
``log_probs.npy``  f16/f32 (N, k)  mean member log-probability at ``ids`` (EnD2's NLL; optional)
=================  ==============  =========================================================

What the values mean and how they are used: :mod:`fairseq_pdd.distill.topk_stats`. ``header.json`` records
the format version, the teachers (path and sha256 of each checkpoint file), sha256 of the source
and target dictionaries' symbol lists, the subset with its number of sentences and tokens, k, the
number of classes, the storage dtype, and for every array its dtype, shape, size in bytes and sha256.

A directory is complete or absent: it is written under a temporary name and renamed when the
header (written last) is in place. :func:`open_cache` refuses a header of another format version,
a missing, truncated or resized array, and (unless told to skip it) a checksum mismatch;
:func:`check_compatible` refuses a cache of other teachers, dictionaries or data.
This module does not import fairseq.
"""
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from fairseq_pdd.distill.topk_stats import TopKStatistics

#: the on-disk format name written to and checked in ``header.json`` (kept from before the package
#: layout, so caches built then stay readable)
FORMAT = "fairseq_pdd.teacher_cache"
FORMAT_VERSION = 1
HEADER = "header.json"
#: Columns of ``scalars.npy``; ``rest_log_prob`` is appended when the cache keeps log-probabilities.
SCALAR_COLUMNS = ("rest_mass", "entropy_of_expected", "expected_entropy", "cross_entropy")
REST_LOG_PROB = "rest_log_prob"
_HASH_BLOCK = 1 << 24


class TeacherCacheError(ValueError):
    """A teacher cache is missing, incomplete, corrupt, or was built for other teachers/data."""


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def symbols_sha256(symbols: Sequence[str]) -> str:
    """sha256 of a dictionary's symbols in index order (the counts do not change the class ids)."""
    return hashlib.sha256("\n".join(symbols).encode("utf-8")).hexdigest()


def row_indices(offsets: np.ndarray, sentence_ids: np.ndarray) -> np.ndarray:
    """The rows of ``sentence_ids`` (B,) concatenated in that order, for per-sentence ``offsets`` (S+1,)."""
    sentence_ids = np.asarray(sentence_ids, dtype=np.int64)
    starts = offsets[sentence_ids]
    lengths = offsets[sentence_ids + 1] - starts
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def scalar_columns(log_probs: bool) -> List[str]:
    return list(SCALAR_COLUMNS) + ([REST_LOG_PROB] if log_probs else [])


def topk_to_arrays(topk: TopKStatistics, target: torch.Tensor) -> Dict[str, np.ndarray]:
    """The rows of one batch (N tokens) as numpy arrays of the cache's layout (``offsets`` aside)."""
    scalars = [topk.rest_mass, topk.entropy_of_expected, topk.expected_entropy, topk.cross_entropy]
    if topk.log_probs is not None:
        scalars.append(topk.rest_log_prob)
    arrays = {
        "target": target.to(torch.int32),
        "ids": topk.ids.to(torch.int32),
        "probs": topk.probs,
        "scalars": torch.stack([s.float() for s in scalars], dim=-1),
    }
    if topk.log_probs is not None:
        arrays["log_probs"] = topk.log_probs
    return {name: value.cpu().numpy() for name, value in arrays.items()}


def write_cache(directory: str, header: dict, lengths: np.ndarray, chunks: Iterable[Dict[str, np.ndarray]]) -> None:
    """Write a cache ``directory`` atomically from consecutive row ``chunks``.

    Args:
        header: the fields of ``header.json`` (format, version, ``arrays`` and the numbers of
            sentences and tokens are added).
        lengths: (S,) tokens per sentence; ``offsets.npy`` is their cumulative sum.
        chunks: dicts of arrays in the layout of :func:`topk_to_arrays`, whose rows, concatenated,
            are the ``sum(lengths)`` rows in sentence order (e.g. one chunk per resumable part).

    Arrays are filled through ``np.lib.format.open_memmap`` (never all in memory) in
    ``.{name}.tmp-{pid}`` beside ``directory``, fsync'ed, checksummed, then the header is written
    and the folder renamed, so a crash never leaves a directory that :func:`open_cache` accepts.
    Raises ``FileExistsError`` if ``directory`` exists by then.
    """
    parent, name = os.path.split(os.path.abspath(directory))
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(os.path.join(tmp, "offsets.npy"), offsets)
        outputs, row = {}, 0
        for chunk in chunks:
            n = len(chunk["target"])
            for key, value in chunk.items():
                if key not in outputs:
                    outputs[key] = np.lib.format.open_memmap(
                        os.path.join(tmp, f"{key}.npy"), mode="w+", dtype=value.dtype,
                        shape=(int(offsets[-1]),) + value.shape[1:],
                    )
                outputs[key][row:row + n] = value
            row += n
        if row != offsets[-1]:
            raise ValueError(f"the chunks hold {row} rows, the sentence lengths {offsets[-1]}")
        for value in outputs.values():
            value.flush()
        del outputs
        header = dict(header, format=FORMAT, format_version=FORMAT_VERSION, arrays={},
                      num_sentences=len(lengths), num_tokens=int(offsets[-1]))
        for file in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, file)
            _fsync(path)
            array = np.load(path, mmap_mode="r")
            header["arrays"][file[: -len(".npy")]] = {
                "file": file,
                "dtype": str(array.dtype),
                "shape": list(array.shape),
                "bytes": os.path.getsize(path),
                "sha256": file_sha256(path),
            }
            del array
        with open(os.path.join(tmp, HEADER), "w") as f:
            json.dump(header, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(directory):
            raise FileExistsError(directory)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------
# Reading and validation
# ------------------------------------------------------------------------------------------------
@dataclass
class TeacherCache:
    """An opened, validated cache of one subset.

    Pickles (e.g. into spawned data-loader workers) without its arrays, which the copy maps again.
    """

    directory: str
    header: dict
    offsets: np.ndarray  #: (S+1,) in memory
    arrays: Dict[str, np.ndarray]  #: memory-mapped, read-only

    def __getstate__(self):
        return dict(vars(self), arrays=None)

    def __setstate__(self, state):
        vars(self).update(state)
        self.arrays = {
            name: np.load(os.path.join(self.directory, meta["file"]), mmap_mode="r")
            for name, meta in self.header["arrays"].items()
            if name != "offsets"
        }

    @property
    def num_sentences(self) -> int:
        return len(self.offsets) - 1

    def sentence_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, sentence_ids) -> np.ndarray:
        return row_indices(self.offsets, sentence_ids)

    def target(self, rows: np.ndarray) -> np.ndarray:
        return self.arrays["target"][rows]

    def topk(self, rows: np.ndarray) -> TopKStatistics:
        """The compressed statistics of ``rows`` (CPU tensors; ids as int64 for ``scatter``)."""
        columns = self.header["scalar_columns"]
        scalars = torch.from_numpy(self.arrays["scalars"][rows])
        col = {name: scalars[:, i] for i, name in enumerate(columns)}
        log_probs = self.arrays.get("log_probs")
        return TopKStatistics(
            ids=torch.from_numpy(self.arrays["ids"][rows].astype(np.int64)),
            probs=torch.from_numpy(self.arrays["probs"][rows]),
            rest_mass=col["rest_mass"],
            entropy_of_expected=col["entropy_of_expected"],
            expected_entropy=col["expected_entropy"],
            cross_entropy=col["cross_entropy"],
            log_probs=None if log_probs is None else torch.from_numpy(log_probs[rows]),
            rest_log_prob=col.get(REST_LOG_PROB),
            num_models=int(self.header["num_models"]),
        )


def _read_header(directory: str) -> dict:
    path = os.path.join(directory, HEADER)
    if not os.path.isdir(directory):
        raise TeacherCacheError(f"teacher cache {directory} does not exist (or was never completed)")
    if not os.path.isfile(path):
        raise TeacherCacheError(f"teacher cache {directory} has no {HEADER}: not a complete cache")
    try:
        with open(path) as f:
            header = json.load(f)
    except (OSError, ValueError) as e:
        raise TeacherCacheError(f"cannot read {path}: {e}") from e
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise TeacherCacheError(
            f"{path}: format {header.get('format')!r} version {header.get('format_version')!r}; this "
            f"fairseq_pdd reads {FORMAT!r} version {FORMAT_VERSION}: rebuild the cache"
        )
    return header


def _open_array(directory: str, name: str, meta: dict, verify_checksum: bool) -> np.ndarray:
    path = os.path.join(directory, meta["file"])
    if not os.path.isfile(path):
        raise TeacherCacheError(f"teacher cache {directory}: array file {meta['file']} is missing")
    size = os.path.getsize(path)
    if size != meta["bytes"]:
        raise TeacherCacheError(
            f"teacher cache file {path} has {size} bytes, its header says {meta['bytes']}: "
            "truncated or overwritten; rebuild the cache"
        )
    if verify_checksum and file_sha256(path) != meta["sha256"]:
        raise TeacherCacheError(
            f"teacher cache file {path}: sha256 checksum mismatch with {HEADER} (corrupt); rebuild the cache"
        )
    array = np.load(path, mmap_mode="r")
    if str(array.dtype) != meta["dtype"] or list(array.shape) != meta["shape"]:
        raise TeacherCacheError(
            f"teacher cache file {path} holds {array.dtype} {list(array.shape)}, its header says "
            f"{meta['dtype']} {meta['shape']}"
        )
    return array


def open_cache(directory: str, verify_checksums: bool = True) -> TeacherCache:
    """Open a cached subset: header, sizes, shapes and (unless ``verify_checksums`` is False) sha256."""
    header = _read_header(directory)
    arrays = {
        name: _open_array(directory, name, meta, verify_checksums) for name, meta in header["arrays"].items()
    }
    offsets = np.array(arrays.pop("offsets"))
    n, k = header["num_tokens"], header["k"]
    expected = {"target": [n], "ids": [n, k], "probs": [n, k], "scalars": [n, len(header["scalar_columns"])]}
    if header["log_probs"]:
        expected["log_probs"] = [n, k]
    for name, shape in expected.items():
        if name not in arrays or list(arrays[name].shape) != shape:
            raise TeacherCacheError(f"teacher cache {directory}: array {name!r} missing or not of shape {shape}")
    if len(offsets) != header["num_sentences"] + 1 or offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
        raise TeacherCacheError(f"teacher cache {directory}: inconsistent sentence offsets")
    return TeacherCache(directory, header, offsets, arrays)


def teacher_fingerprint(paths: Sequence[str]) -> List[dict]:
    """``[{"path", "sha256"}]`` of teacher checkpoint files, in ensemble order."""
    for path in paths:
        if not os.path.isfile(path):
            raise TeacherCacheError(f"teacher checkpoint not found: {path}")
    return [{"path": path, "sha256": file_sha256(path)} for path in paths]


def check_compatible(
    cache: TeacherCache,
    subset: str,
    source_symbols: Optional[Sequence[str]],
    target_symbols: Sequence[str],
    num_sentences: int,
    target_lengths: Optional[np.ndarray] = None,
    teachers: Sequence[dict] = (),
) -> None:
    """Refuse a cache of another subset, dictionaries, dataset or (if ``teachers`` are given) teachers.

    ``target_lengths`` (S,) are the data's target lengths in tokens, when the dataset knows them;
    ``teachers`` are :func:`teacher_fingerprint` of the checkpoints meant, compared by sha256 in order.
    """
    header, where = cache.header, cache.directory
    if header["subset"] != subset:
        raise TeacherCacheError(f"teacher cache {where} was built for subset {header['subset']!r}, not {subset!r}")
    ours = {"target": symbols_sha256(target_symbols)}
    if source_symbols is not None:
        ours["source"] = symbols_sha256(source_symbols)
    for role, digest in ours.items():
        if header["dictionaries"].get(role) != digest:
            raise TeacherCacheError(
                f"teacher cache {where} was built with another {role} dictionary than the data's "
                f"(sha256 of the symbols {header['dictionaries'].get(role)} vs {digest})"
            )
    if header["num_classes"] != len(target_symbols):
        raise TeacherCacheError(
            f"teacher cache {where} has {header['num_classes']} classes, the target dictionary {len(target_symbols)}"
        )
    if cache.num_sentences != num_sentences:
        raise TeacherCacheError(
            f"teacher cache {where} holds {cache.num_sentences} sentences but subset {subset!r} of the "
            f"data has {num_sentences}: it was built from another dataset"
        )
    if target_lengths is not None:
        bad = np.flatnonzero(cache.sentence_lengths() != np.asarray(target_lengths))
        if len(bad):
            raise TeacherCacheError(
                f"teacher cache {where}: {len(bad)} sentences of subset {subset!r} have other target "
                f"lengths than in the data (first: sentence id {bad[0]}): it was built from another dataset"
            )
    if teachers:
        given = teachers
        cached = header["teachers"]
        if [t["sha256"] for t in given] != [t["sha256"] for t in cached]:
            raise TeacherCacheError(
                f"teacher cache {where} was built from other teachers: --ensemble-paths "
                f"{[t['path'] for t in given]} (sha256 {[t['sha256'][:12] for t in given]}) vs the cache's "
                f"{[t['path'] for t in cached]} (sha256 {[t['sha256'][:12] for t in cached]})"
            )
