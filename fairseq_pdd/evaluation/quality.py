"""Translation / recognition quality: sacreBLEU (corpus and sentence), WER, and word alignments.

**BLEU** uses sacrebleu >= 2 on detokenized text; :func:`corpus_bleu` returns the score *and* the
sacreBLEU signature string so results are reproducible.

**Sentence BLEU** (the error signal of the MT prediction-rejection ratio) defaults to
``smooth_method="floor", smooth_value=1.1`` with effective order. This reproduces the reference
implementation, which called ``sacrebleu.sentence_bleu(hyp, ref, smooth_value=1.1)`` under
sacrebleu 1.x, where the default ``smooth_method`` of ``sentence_bleu`` was ``"floor"``: an n-gram
order with no match gets precision ``1.1 / total`` instead of 0. (sacrebleu 2 changed the default
to ``"exp"``, under which ``smooth_value`` is ignored, so passing the value alone would silently do
something else.) One difference with 1.x remains: sacrebleu 2 returns 0 when *no* n-gram of any
order matches (sacrebleu issue #141), where 1.x returned a small floored score. Both smoothing
parameters are configurable (``"exp"``, ``"add-k"``, ``"none"``).

**WER** uses a word-level Levenshtein alignment written here (no sclite, no extra dependency):
unit costs, and on ties the back-trace prefers match/substitution, then deletion, then insertion.
Sentence WER is ``(S + D + I) / max(len(ref), 1)``; corpus WER is ``sum(S + D + I) / sum(len(ref))``.
Both are returned as percentages by the ``*_wer`` helpers and as fractions by :class:`WordErrors`.

**Token error labels** come from the same alignment, one per hypothesis token: correct (C) = 0,
substitution (S) or insertion (I) = 1; deletions have no hypothesis token and are skipped.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from sacrebleu.metrics import BLEU

SENTENCE_BLEU_SMOOTH_METHOD = "floor"
SENTENCE_BLEU_SMOOTH_VALUE = 1.1
SMOOTH_METHODS = ("floor", "add-k", "exp", "none")


# ----------------------------------------------------------------------------------------------- BLEU


def corpus_bleu(
    hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a", lowercase: bool = False
) -> Tuple[float, str]:
    """Corpus sacreBLEU of detokenized ``hypotheses`` against one reference each: ``(score, signature)``."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    metric = BLEU(tokenize=tokenize, lowercase=lowercase)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def sentence_bleu(
    hypotheses: Sequence[str],
    references: Sequence[str],
    smooth_method: str = SENTENCE_BLEU_SMOOTH_METHOD,
    smooth_value: Optional[float] = SENTENCE_BLEU_SMOOTH_VALUE,
    tokenize: str = "13a",
    lowercase: bool = False,
) -> np.ndarray:
    """Sentence BLEU (0-100, effective order) of each hypothesis against its reference."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if smooth_method not in SMOOTH_METHODS:
        raise ValueError(f"smooth_method must be one of {SMOOTH_METHODS}, got {smooth_method!r}")
    metric = BLEU(
        tokenize=tokenize, lowercase=lowercase, smooth_method=smooth_method, smooth_value=smooth_value,
        effective_order=True,
    )
    return np.array([metric.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)], dtype=np.float64)


def sentence_bleu_signature(
    smooth_method: str = SENTENCE_BLEU_SMOOTH_METHOD,
    smooth_value: Optional[float] = SENTENCE_BLEU_SMOOTH_VALUE,
    tokenize: str = "13a",
    lowercase: bool = False,
) -> str:
    """The sacreBLEU signature of the sentence-BLEU configuration used by :func:`sentence_bleu`."""
    metric = BLEU(
        tokenize=tokenize, lowercase=lowercase, smooth_method=smooth_method, smooth_value=smooth_value,
        effective_order=True,
    )
    metric.sentence_score("a", ["a"])  # sacrebleu only knows the number of references after scoring
    return str(metric.get_signature())


# ---------------------------------------------------------------------------------- edit distance / WER


@dataclass(frozen=True)
class AlignedPair:
    """One step of an alignment: ``op`` in C/S/I/D with the reference and hypothesis indices (None if absent)."""

    op: str
    ref_index: Optional[int]
    hyp_index: Optional[int]


@dataclass(frozen=True)
class WordErrors:
    """Edit-operation counts of one (or a sum of) alignment(s)."""

    hits: int
    substitutions: int
    deletions: int
    insertions: int
    ref_len: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """Fraction ``errors / max(ref_len, 1)``."""
        return self.errors / max(self.ref_len, 1)

    def __add__(self, other: "WordErrors") -> "WordErrors":
        return WordErrors(
            self.hits + other.hits, self.substitutions + other.substitutions, self.deletions + other.deletions,
            self.insertions + other.insertions, self.ref_len + other.ref_len,
        )


def _distance_matrix(ref: Sequence[str], hyp: Sequence[str]) -> np.ndarray:
    """Levenshtein DP table ``D[i, j]`` = edit distance of ``ref[:i]`` and ``hyp[:j]`` (unit costs)."""
    vocab = {}
    r = np.array([vocab.setdefault(t, len(vocab)) for t in ref], dtype=np.int64)
    h = np.array([vocab.setdefault(t, len(vocab)) for t in hyp], dtype=np.int64)
    n, m = len(r), len(h)
    D = np.empty((n + 1, m + 1), dtype=np.int64)
    cols = np.arange(m + 1)
    D[0] = cols
    for i in range(1, n + 1):
        a = np.empty(m + 1, dtype=np.int64)
        a[0] = i
        # deletion from the row above, or match / substitution from the diagonal
        a[1:] = np.minimum(D[i - 1, 1:] + 1, D[i - 1, :-1] + (h != r[i - 1]))
        # insertions chain left to right: D[i, j] = min_k<=j a[k] + (j - k)
        D[i] = cols + np.minimum.accumulate(a - cols)
    return D


def align(ref: Sequence[str], hyp: Sequence[str]) -> List[AlignedPair]:
    """Minimum-edit alignment of two token sequences, in order (ties: C/S, then D, then I at each back-step)."""
    D = _distance_matrix(ref, hyp)
    i, j = len(ref), len(hyp)
    steps = []
    while i > 0 or j > 0:
        if i > 0 and j > 0 and D[i, j] == D[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]):
            steps.append(AlignedPair("C" if ref[i - 1] == hyp[j - 1] else "S", i - 1, j - 1))
            i, j = i - 1, j - 1
        elif i > 0 and D[i, j] == D[i - 1, j] + 1:
            steps.append(AlignedPair("D", i - 1, None))
            i -= 1
        else:
            steps.append(AlignedPair("I", None, j - 1))
            j -= 1
    return steps[::-1]


def word_errors(reference: str, hypothesis: str, lowercase: bool = False) -> WordErrors:
    """Counts of C/S/D/I between whitespace-split ``reference`` and ``hypothesis``."""
    if lowercase:
        reference, hypothesis = reference.lower(), hypothesis.lower()
    ref, hyp = reference.split(), hypothesis.split()
    ops = [p.op for p in align(ref, hyp)]
    return WordErrors(ops.count("C"), ops.count("S"), ops.count("D"), ops.count("I"), len(ref))


def sentence_wer(hypotheses: Sequence[str], references: Sequence[str], lowercase: bool = False) -> np.ndarray:
    """Per-sentence WER in percent, ``100 * (S + D + I) / max(len(ref), 1)`` (may exceed 100)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return np.array(
        [100.0 * word_errors(r, h, lowercase).wer for h, r in zip(hypotheses, references)], dtype=np.float64
    )


def corpus_wer(hypotheses: Sequence[str], references: Sequence[str], lowercase: bool = False) -> float:
    """Corpus WER in percent, ``100 * sum(S + D + I) / sum(len(ref))`` (NaN if every reference is empty)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    total = WordErrors(0, 0, 0, 0, 0)
    for h, r in zip(hypotheses, references):
        total = total + word_errors(r, h, lowercase)
    return 100.0 * total.errors / total.ref_len if total.ref_len else float("nan")


def token_error_labels(ref_tokens: Sequence[str], hyp_tokens: Sequence[str]) -> np.ndarray:
    """One label per hypothesis token from the alignment: 0 = correct, 1 = substituted or inserted."""
    labels = np.zeros(len(hyp_tokens), dtype=np.int64)
    for step in align(list(ref_tokens), list(hyp_tokens)):
        if step.op in ("S", "I"):
            labels[step.hyp_index] = 1
    return labels
