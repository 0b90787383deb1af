"""PNG plots: rejection curves per measure, ROC curves per OOD set, reliability diagrams.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), so the
plots work headless and do not disturb a caller's matplotlib state. matplotlib is imported on first
use, so importing this module (and the report) stays cheap.
"""
import re
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from .metrics import RejectionCurve

_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan"]


def safe_filename(name: str) -> str:
    """``name`` with every run of characters outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unnamed"


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _save(fig, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_rejection_curves(curves: Mapping[str, RejectionCurve], title: str, path: str,
                          ylabel: str = "mean error (%)") -> str:
    """One figure: per system, the measure's rejection curve (solid), its oracle (dashed) and random (dotted)."""
    fig = _figure((6, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for i, (system, c) in enumerate(curves.items()):
        color = _COLORS[i % len(_COLORS)]
        x = 100.0 * c.fraction
        ax.plot(x, 100.0 * c.measure, color=color, lw=2, label=f"{system} (PRR {100 * c.prr:.1f})")
        ax.plot(x, 100.0 * c.oracle, color=color, lw=1, ls="--", label=f"{system} oracle")
        ax.plot(x, 100.0 * c.random, color=color, lw=1, ls=":", label=f"{system} random")
    ax.set_xlim(0, 100)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("rejected (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_roc_curves(rocs: Mapping[str, Mapping[str, Tuple[np.ndarray, np.ndarray, float]]], title: str,
                    path: str) -> str:
    """One subplot per system with the ROC curve of every measure; ``rocs[system][measure] = (fpr, tpr, auc)``."""
    systems = list(rocs)
    fig = _figure((5.5 * max(len(systems), 1), 5))
    for k, system in enumerate(systems):
        ax = fig.add_subplot(1, max(len(systems), 1), k + 1)
        for i, (measure, (fpr, tpr, auc)) in enumerate(rocs[system].items()):
            ax.plot(fpr, tpr, color=_COLORS[i % len(_COLORS)], lw=1.5, label=f"{measure} ({100 * auc:.1f})")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{title}: {system}")
        ax.legend(fontsize="x-small", loc="lower right")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_reliability(bins: Mapping[str, Dict[str, np.ndarray]], path: str, eces: Mapping[str, float] = None,
                     title: str = "token calibration") -> str:
    """Reliability diagram (accuracy vs mean confidence per bin) for each system."""
    fig = _figure((5.5, 5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    for i, (system, b) in enumerate(bins.items()):
        full = b["count"] > 0
        label = system if not eces else f"{system} (ECE {100 * eces[system]:.2f})"
        ax.plot(b["confidence"][full], b["accuracy"][full], marker="o", color=_COLORS[i % len(_COLORS)], label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def unique_names(names: Sequence[str]) -> Dict[str, str]:
    """Map each name to a distinct safe file stem."""
    out, seen = {}, set()
    for n in names:
        stem, k = safe_filename(n), 1
        cand = stem
        while cand in seen:
            k += 1
            cand = f"{stem}_{k}"
        seen.add(cand)
        out[n] = cand
    return out
