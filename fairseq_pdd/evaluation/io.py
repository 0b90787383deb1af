"""Read and validate the per-hypothesis JSONL files written by the decoding entry point.

One JSON object per line, one line per hypothesis::

    {"id": 3, "rank": 0, "source": "...", "reference": "...", "hypothesis": "...",
     "score": -0.41, "log_prob": -4.1, "length": 10,
     "token": {"total_uncertainty": [...], ...}, "sequence": {"total_uncertainty": 0.8, ...},
     "token_confidence": [...], "token_correct": [...], "model": "ensemble"}

``rank`` is the position in the n-best list (0 = best) or ``-1`` for the forced-decoded reference
(``--score-reference``); ``token_confidence`` / ``token_correct`` are expected on rank -1 records.
Optional ``tokens`` / ``reference_tokens`` (lists of strings: the hypothesis' and the reference's
model tokens) enable token error labels for hypotheses by edit-distance alignment.

Every problem is a :class:`ValueError` naming the file and the line: invalid JSON, a missing or
mistyped field, an empty file, a measure present in some records and missing in others, a NaN or
infinite value, per-token lists of different lengths, duplicate ``(id, rank)`` pairs, or an n-best
list with a gap in its ranks. Samples come out sorted by id, hypotheses sorted by rank.
"""
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

FORCED_RANK = -1  #: rank of the forced-decoded (teacher-forced) reference

_NUMBER = (int, float)
#: field -> accepted types; all required
REQUIRED_FIELDS = {
    "id": int,
    "rank": int,
    "reference": str,
    "hypothesis": str,
    "score": _NUMBER,
    "log_prob": _NUMBER,
    "sequence": dict,
}
#: field -> accepted types; optional
OPTIONAL_FIELDS = {
    "source": str,
    "length": int,
    "token": dict,
    "token_confidence": list,
    "token_correct": list,
    "model": str,
    "tokens": list,
    "reference_tokens": list,
}


@dataclass
class Record:
    """One validated JSONL line (one hypothesis, or the forced-decoded reference when ``rank == -1``)."""

    id: int
    rank: int
    reference: str
    hypothesis: str
    score: float
    log_prob: float
    sequence: Dict[str, float]
    source: str = ""
    length: Optional[int] = None
    token: Dict[str, np.ndarray] = field(default_factory=dict)
    token_confidence: Optional[np.ndarray] = None
    token_correct: Optional[np.ndarray] = None
    model: Optional[str] = None
    tokens: Optional[List[str]] = None
    reference_tokens: Optional[List[str]] = None
    line: int = 0

    @property
    def forced(self) -> bool:
        return self.rank == FORCED_RANK


@dataclass
class Sample:
    """All records of one sample id: the n-best list (sorted by rank) and the forced reference, if any."""

    id: int
    source: str
    reference: str
    hypotheses: List[Record]
    forced: Optional[Record] = None

    def nbest(self, n: Optional[int]) -> List[Record]:
        """The first ``n`` hypotheses (all when ``n`` is None); fewer when the list is shorter."""
        return list(self.hypotheses) if n is None else list(self.hypotheses[:n])


@dataclass
class DecodeSet:
    """A validated JSONL file: samples sorted by id plus the measure names it carries."""

    path: str
    samples: List[Sample]
    sequence_measures: Tuple[str, ...]  #: keys of "sequence" in the hypothesis records
    token_measures: Tuple[str, ...]  #: keys of "token" in the hypothesis records
    forced_sequence_measures: Tuple[str, ...]  #: keys of "sequence" in the rank -1 records
    forced_token_measures: Tuple[str, ...]  #: keys of "token" in the rank -1 records
    model: Optional[str] = None  #: the records' "model" field when all agree

    @property
    def ids(self) -> np.ndarray:
        return np.array([s.id for s in self.samples], dtype=np.int64)

    @property
    def has_hypotheses(self) -> bool:
        return bool(self.samples) and bool(self.samples[0].hypotheses)

    @property
    def has_forced(self) -> bool:
        return bool(self.samples) and all(s.forced is not None for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def _where(path: str, line: int) -> str:
    return f"{path}, line {line}"


def _check_finite(path: str, line: int, what: str, value) -> None:
    if isinstance(value, _NUMBER):
        if math.isfinite(value):
            return
        arr = np.asarray([value], dtype=np.float64)
    else:
        arr = np.asarray(value, dtype=np.float64)
        if np.isfinite(arr).all():
            return
    bad = "NaN" if np.isnan(arr).any() else "an infinite value"
    raise ValueError(f"{_where(path, line)}: {what} contains {bad}")


def _number_list(path: str, line: int, what: str, value) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(v, _NUMBER) for v in value):  # bools count as 0/1
        raise ValueError(f"{_where(path, line)}: {what} must be a list of numbers")
    arr = np.asarray(value, dtype=np.float64)
    _check_finite(path, line, what, arr)
    return arr


def parse_record(obj, path: str, line: int) -> Record:
    """Validate one decoded JSON object into a :class:`Record` (``ValueError`` naming file and line)."""
    where = _where(path, line)
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    for name, types in list(REQUIRED_FIELDS.items()) + list(OPTIONAL_FIELDS.items()):
        if name in obj and obj[name] is not None:
            value = obj[name]
            if isinstance(value, bool) or not isinstance(value, types):
                raise ValueError(f"{where}: field {name!r} has type {type(value).__name__}")
    if obj["rank"] < FORCED_RANK:
        raise ValueError(f"{where}: rank must be >= -1, got {obj['rank']}")
    for name in ("score", "log_prob"):
        _check_finite(path, line, f"field {name!r}", obj[name])

    sequence = {}
    for key, value in obj["sequence"].items():
        if isinstance(value, bool) or not isinstance(value, _NUMBER):
            raise ValueError(f"{where}: sequence measure {key!r} is not a number")
        _check_finite(path, line, f"sequence measure {key!r}", value)
        sequence[key] = float(value)

    token = {}
    for key, value in (obj.get("token") or {}).items():
        token[key] = _number_list(path, line, f"token measure {key!r}", value)
    conf = obj.get("token_confidence")
    conf = None if conf is None else _number_list(path, line, "token_confidence", conf)
    correct = obj.get("token_correct")
    if correct is not None:
        correct = _number_list(path, line, "token_correct", correct)
        if not np.all((correct == 0) | (correct == 1)):
            raise ValueError(f"{where}: token_correct must hold only 0/1")
    if conf is not None and np.any((conf < 0) | (conf > 1)):
        raise ValueError(f"{where}: token_confidence must lie in [0, 1]")

    lengths = {k: len(v) for k, v in token.items()}
    if conf is not None:
        lengths["token_confidence"] = len(conf)
    if correct is not None:
        lengths["token_correct"] = len(correct)
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}={n}" for k, n in sorted(lengths.items()))
        raise ValueError(f"{where}: per-token lists have different lengths ({detail})")

    for name in ("tokens", "reference_tokens"):
        if obj.get(name) is not None and not all(isinstance(t, str) for t in obj[name]):
            raise ValueError(f"{where}: {name} must be a list of strings")

    return Record(
        id=obj["id"], rank=obj["rank"], reference=obj["reference"], hypothesis=obj["hypothesis"],
        score=float(obj["score"]), log_prob=float(obj["log_prob"]), sequence=sequence,
        source=obj.get("source") or "", length=obj.get("length"), token=token,
        token_confidence=conf, token_correct=correct, model=obj.get("model"),
        tokens=obj.get("tokens"), reference_tokens=obj.get("reference_tokens"), line=line,
    )


def read_jsonl(path: str) -> List[Record]:
    """Parse and validate every non-blank line of ``path``; raises ``ValueError`` on the first problem."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{_where(path, line_no)}: invalid JSON ({e.msg} at column {e.colno})") from None
            records.append(parse_record(obj, path, line_no))
    if not records:
        raise ValueError(f"{path}: empty file (no JSONL records)")
    return records


def _check_same_keys(path: str, records: Sequence[Record], attr: str, what: str) -> Tuple[str, ...]:
    """All records must carry the same ``attr`` keys (measures); return them sorted.

    The key set most records share is taken as the norm, so the error names the odd record out.
    """
    if not records:
        return ()
    counts = Counter(frozenset(getattr(r, attr)) for r in records)
    top = max(counts.values())
    norm_set = next(frozenset(getattr(r, attr)) for r in records if counts[frozenset(getattr(r, attr))] == top)
    norm = next(r for r in records if frozenset(getattr(r, attr)) == norm_set)
    for r in records:
        other = set(getattr(r, attr))
        if other == norm_set:
            continue
        missing, extra = sorted(norm_set - other), sorted(other - norm_set)
        if missing:
            raise ValueError(
                f"{_where(path, r.line)}: {what} measure(s) {', '.join(map(repr, missing))} missing "
                f"(present on line {norm.line} and {top - 1} other record(s) of rank {_rank_kind(norm)})"
            )
        raise ValueError(
            f"{_where(path, r.line)}: {what} measure(s) {', '.join(map(repr, extra))} not present on line "
            f"{norm.line} and {top - 1} other record(s) of rank {_rank_kind(norm)}"
        )
    return tuple(sorted(norm_set))


def _rank_kind(r: Record) -> str:
    return "-1" if r.forced else ">= 0"


def group_records(records: Sequence[Record], path: str = "<records>") -> DecodeSet:
    """Group validated records by id (sorted) and rank; check measure sets and rank contiguity."""
    hyps = [r for r in records if not r.forced]
    forced = [r for r in records if r.forced]
    seq_measures = _check_same_keys(path, hyps, "sequence", "sequence")
    tok_measures = _check_same_keys(path, hyps, "token", "token")
    f_seq_measures = _check_same_keys(path, forced, "sequence", "sequence")
    f_tok_measures = _check_same_keys(path, forced, "token", "token")

    by_id: Dict[int, Dict[int, Record]] = {}
    for r in records:
        ranks = by_id.setdefault(r.id, {})
        if r.rank in ranks:
            raise ValueError(
                f"{_where(path, r.line)}: duplicate record for id {r.id} rank {r.rank} "
                f"(first on line {ranks[r.rank].line})"
            )
        ranks[r.rank] = r

    samples = []
    for sid in sorted(by_id):
        ranks = by_id[sid]
        n_hyp = len([k for k in ranks if k != FORCED_RANK])
        if hyps and n_hyp == 0:
            raise ValueError(f"{path}: id {sid} has a forced-decoded reference (rank -1) but no hypotheses")
        if n_hyp and sorted(k for k in ranks if k != FORCED_RANK) != list(range(n_hyp)):
            got = sorted(k for k in ranks if k != FORCED_RANK)
            raise ValueError(f"{path}: id {sid} has ranks {got}; an n-best list must have ranks 0..{n_hyp - 1}")
        nbest = [ranks[k] for k in range(n_hyp)]
        first = nbest[0] if nbest else ranks[FORCED_RANK]
        for r in list(ranks.values())[1:]:
            if r.reference != first.reference:
                raise ValueError(
                    f"{_where(path, r.line)}: id {sid} has a different reference than on line {first.line}"
                )
        samples.append(Sample(sid, first.source, first.reference, nbest, ranks.get(FORCED_RANK)))

    if forced and hyps and len(forced) != len(samples):
        have = {r.id for r in forced}
        lacking = [s.id for s in samples if s.id not in have]
        raise ValueError(
            f"{path}: {len(lacking)} id(s) lack the forced-decoded reference (rank -1) that the others "
            f"have, e.g. {lacking[:5]}"
        )

    models = {r.model for r in records if r.model}
    return DecodeSet(
        path=path, samples=samples, sequence_measures=seq_measures, token_measures=tok_measures,
        forced_sequence_measures=f_seq_measures, forced_token_measures=f_tok_measures,
        model=models.pop() if len(models) == 1 else None,
    )


def load(path: str) -> DecodeSet:
    """Read, validate and group one JSONL file (:func:`read_jsonl` then :func:`group_records`)."""
    return group_records(read_jsonl(path), path)


def select_nbest(dset: DecodeSet, n: Optional[int]) -> List[List[Record]]:
    """Per sample (in id order), the first ``n`` hypotheses; ``n=None`` (or 0) keeps the whole n-best list."""
    if n is not None and n < 0:
        raise ValueError(f"nbest must be >= 1 or None (all), got {n}")
    return [s.nbest(n or None) for s in dset.samples]


def check_same_ids(a: DecodeSet, b: DecodeSet, name_a: Optional[str] = None, name_b: Optional[str] = None) -> None:
    """Raise ``ValueError("mismatched id sets between X and Y: ...")`` unless both sets hold the same ids."""
    ids_a, ids_b = set(a.ids.tolist()), set(b.ids.tolist())
    if ids_a == ids_b:
        return
    x, y = name_a or a.path, name_b or b.path
    only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
    parts = []
    if only_a:
        parts.append(f"{len(only_a)} ids only in {x} (e.g. {only_a[:5]})")
    if only_b:
        parts.append(f"{len(only_b)} ids only in {y} (e.g. {only_b[:5]})")
    raise ValueError(f"mismatched id sets between {x} and {y}: " + "; ".join(parts))

