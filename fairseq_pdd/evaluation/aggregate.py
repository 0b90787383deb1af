"""Sign convention of the uncertainty measures and their aggregation over an n-best list.

**Convention.** Every metric in this package reads a measure as *higher = more uncertain*. Each key of
a record's ``"sequence"`` (and ``"token"``) dict is used as is, except the names in ``negated``
(default :data:`DEFAULT_NEGATED`: ``"score"``, ``"log_prob"`` and ``"ep_log_prob"``, where *lower* means more uncertain),
which are multiplied by -1 before any metric sees them. The report keeps the original key names and
records the negated set in its ``config``.

**n-best aggregation** (Malinin & Gales, 2021), for hypotheses ``b = 1..N`` of one sample:

* ``"mc"``: uniform weights ``1/N`` (the reference implementation's default, a plain mean);
* ``"bs"``: importance weights ``pi_b = softmax_b(w_b / T)`` where ``w_b`` is the hypothesis'
  ``weight_key`` field (default the total sequence log-probability ``"log_prob"``) and ``T`` the
  temperature. With ``N = 1`` both reduce to the top hypothesis.

The sequence measure of a sample is ``sum_b pi_b * u_b`` (after the sign convention).
"""
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from .io import DecodeSet, Record

DEFAULT_NEGATED = ("score", "log_prob", "ep_log_prob")  #: measures where LOWER means more uncertain
WEIGHTINGS = ("bs", "mc")
WEIGHT_KEYS = ("log_prob", "score")


def sign(name: str, negated: Iterable[str] = DEFAULT_NEGATED) -> float:
    """-1.0 for measures in ``negated`` (lower = more uncertain), +1.0 otherwise."""
    return -1.0 if name in set(negated) else 1.0


def nbest_weights(values: Sequence[float], weighting: str = "bs", temperature: float = 1.0) -> np.ndarray:
    """Weights of an n-best list: uniform (``"mc"``) or ``softmax(values / temperature)`` (``"bs"``)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("nbest_weights needs a non-empty 1-d list of values")
    if weighting == "mc":
        return np.full(values.size, 1.0 / values.size)
    if weighting != "bs":
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = values / temperature
    z = z - z.max()
    w = np.exp(z)
    return w / w.sum()


def aggregate_nbest(
    nbests: Sequence[Sequence[Record]],
    measures: Sequence[str],
    weighting: str = "bs",
    temperature: float = 1.0,
    weight_key: str = "log_prob",
    negated: Iterable[str] = DEFAULT_NEGATED,
) -> Dict[str, np.ndarray]:
    """Per measure, one signed, n-best-aggregated value per sample (same order as ``nbests``)."""
    if weight_key not in WEIGHT_KEYS:
        raise ValueError(f"weight_key must be one of {WEIGHT_KEYS}, got {weight_key!r}")
    negated = set(negated)
    out = {m: np.empty(len(nbests), dtype=np.float64) for m in measures}
    for i, hyps in enumerate(nbests):
        if not hyps:
            raise ValueError(f"sample #{i} has an empty n-best list")
        w = nbest_weights([getattr(h, weight_key) for h in hyps], weighting, temperature)
        for m in measures:
            u = np.array([h.sequence[m] for h in hyps], dtype=np.float64)
            out[m][i] = sign(m, negated) * float(np.dot(w, u))
    return out


def sequence_measures(
    dset: DecodeSet,
    nbest: Optional[int] = 1,
    weighting: str = "bs",
    temperature: float = 1.0,
    weight_key: str = "log_prob",
    negated: Iterable[str] = DEFAULT_NEGATED,
    measures: Optional[Sequence[str]] = None,
) -> Dict[str, np.ndarray]:
    """Signed sequence measures of the hypotheses of ``dset``, aggregated over the first ``nbest``, in id order."""
    if not dset.has_hypotheses:
        raise ValueError(f"{dset.path}: no hypotheses (only forced-decoded references)")
    measures = list(dset.sequence_measures if measures is None else measures)
    nbests = [s.nbest(nbest or None) for s in dset.samples]
    return aggregate_nbest(nbests, measures, weighting, temperature, weight_key, negated)


def forced_sequence_measures(
    dset: DecodeSet, negated: Iterable[str] = DEFAULT_NEGATED, measures: Optional[Sequence[str]] = None
) -> Dict[str, np.ndarray]:
    """Signed sequence measures of the forced-decoded references (rank -1), in id order ("reference mode")."""
    if not dset.has_forced:
        raise ValueError(f"{dset.path}: not every sample has a forced-decoded reference (rank -1)")
    measures = list(dset.forced_sequence_measures if measures is None else measures)
    return {
        m: sign(m, negated) * np.array([s.forced.sequence[m] for s in dset.samples], dtype=np.float64)
        for m in measures
    }


def pooled_token_measures(
    records: Sequence[Record], measures: Sequence[str], negated: Iterable[str] = DEFAULT_NEGATED,
    drop_last: Optional[List[bool]] = None,
) -> Dict[str, np.ndarray]:
    """Signed token measures of ``records`` concatenated in order (``drop_last[i]`` drops record i's final step)."""
    out = {}
    for m in measures:
        parts = []
        for i, r in enumerate(records):
            v = r.token[m]
            parts.append(v[:-1] if drop_last is not None and drop_last[i] else v)
        out[m] = sign(m, negated) * (np.concatenate(parts) if parts else np.zeros(0))
    return out
