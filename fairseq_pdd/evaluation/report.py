"""Evaluate one or more systems into a nested report, ``report.json``, a side-by-side table and plots.

``report.json`` schema (numbers are JSON numbers, undefined values ``null``)::

    {
      "config": {"task", "nbest", "weighting", "temperature", "weight_key", "negated_measures",
                 "prr_error", "ece_bins", "bleu_tokenize", "sentence_bleu": {"smooth_method",
                 "smooth_value", "signature"}, "lowercase_wer"},
      "systems": {
        SYSTEM: {
          "files": {"in_domain": PATH, "ood": {SET: PATH}},
          "n_samples": int,
          "quality": {"bleu", "bleu_signature", "sentence_bleu_mean"          (task mt)
                      | "wer", "sentence_wer_mean"                             (task asr; percent)
                      , "nll"},                       # mean over sentences of -log_prob/length of rank -1
          "ood_quality": {SET: {"bleu", "bleu_signature" | "wer", "nll"}},
          "ood": {SET: {MEASURE: {"roc_auc", "pr_auc"}}},          # n-best hypotheses, in [0, 1]
          "ood_reference": {SET: {MEASURE: {"roc_auc", "pr_auc"}}}, # forced references, when present
          "error_detection": {MEASURE: prr},                        # PRR in [-1, 1]
          "token_error_detection": {MODE: {"error_rate", "n_tokens",
                                           "measures": {MEASURE: {"pr_auc", "roc_auc"}}}},
          "calibration": {"ece", "n_bins", "n_tokens", "accuracy", "mean_confidence"}
        }
      }
    }

Sequence measures are aggregated over the first ``nbest`` hypotheses (``weighting``); the quality
numbers and the PRR errors always come from the top hypothesis (rank 0), as in the reference
implementation. Samples are ordered by id everywhere.

``MODE`` is ``"reference"`` (rank -1 records: error = argmax != reference token, from
``token_correct``) and/or ``"hypothesis"`` (top hypotheses carrying ``tokens`` and
``reference_tokens``: error labels from the edit-distance alignment, C = 0, S/I = 1; when a token
measure has one more step than ``tokens`` the last step, EOS, is dropped). Sections whose inputs are
absent are omitted (``calibration`` then holds ``null`` values). The text table prints the same
numbers scaled to percent.
"""
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

import numpy as np

from . import metrics, plots, quality
from .aggregate import DEFAULT_NEGATED, forced_sequence_measures, pooled_token_measures, sequence_measures
from .io import DecodeSet, check_same_ids, load


@dataclass
class EvalConfig:
    """Everything that changes the numbers; stored in ``report.json`` under ``config``."""

    task: str = "mt"  #: "mt" (BLEU) or "asr" (WER)
    nbest: Optional[int] = 1  #: hypotheses per sample aggregated into the sequence measures; None = all
    weighting: str = "bs"  #: "bs" importance weights (softmax of weight_key / temperature) or "mc" uniform
    temperature: float = 1.0
    weight_key: str = "log_prob"
    negated: Tuple[str, ...] = DEFAULT_NEGATED  #: measures where lower = more uncertain
    prr_error: Optional[str] = None  #: "bleu" (1 - sBLEU/100) or "wer" (sentence WER); default by task
    ece_bins: int = metrics.DEFAULT_ECE_BINS
    bleu_tokenize: str = "13a"
    sentence_bleu_smooth_method: str = quality.SENTENCE_BLEU_SMOOTH_METHOD
    sentence_bleu_smooth_value: Optional[float] = quality.SENTENCE_BLEU_SMOOTH_VALUE
    lowercase_wer: bool = False

    def __post_init__(self):
        if self.task not in ("mt", "asr"):
            raise ValueError(f"task must be 'mt' or 'asr', got {self.task!r}")
        if self.prr_error is None:
            self.prr_error = "bleu" if self.task == "mt" else "wer"
        if self.prr_error not in ("bleu", "wer"):
            raise ValueError(f"prr_error must be 'bleu' or 'wer', got {self.prr_error!r}")
        if self.nbest is not None and self.nbest < 1:
            raise ValueError(f"nbest must be >= 1 (or None for all), got {self.nbest}")
        self.negated = tuple(self.negated)

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "nbest": "all" if self.nbest is None else self.nbest,
            "weighting": self.weighting,
            "temperature": self.temperature,
            "weight_key": self.weight_key,
            "negated_measures": list(self.negated),
            "prr_error": self.prr_error,
            "ece_bins": self.ece_bins,
            "bleu_tokenize": self.bleu_tokenize,
            "sentence_bleu": {
                "smooth_method": self.sentence_bleu_smooth_method,
                "smooth_value": self.sentence_bleu_smooth_value,
                "signature": quality.sentence_bleu_signature(
                    self.sentence_bleu_smooth_method, self.sentence_bleu_smooth_value, self.bleu_tokenize
                ),
            },
            "lowercase_wer": self.lowercase_wer,
        }


@dataclass
class SystemFiles:
    """Where one system's decodes live: the in-domain JSONL and one JSONL per OOD set."""

    name: Optional[str]  #: None: the records' "model" field when they agree, else "system"
    in_domain: str
    ood: Dict[str, str] = field(default_factory=dict)


@dataclass
class SystemData:
    """Loaded and validated decodes of one system."""

    name: str
    in_domain: DecodeSet
    ood: Dict[str, DecodeSet]


@dataclass
class Artifacts:
    """Curves kept for plotting (not written to JSON)."""

    rejection: Dict[str, metrics.RejectionCurve] = field(default_factory=dict)  #: measure -> curve
    roc: Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray, float]]] = field(default_factory=dict)  #: set -> measure
    reliability: Optional[Dict[str, np.ndarray]] = None
    ece: Optional[float] = None


# ------------------------------------------------------------------------------------------- loading


def load_systems(files: Sequence[SystemFiles]) -> List[SystemData]:
    """Load every file and check that all systems share the in-domain ids (and the ids of shared OOD sets)."""
    if not files:
        raise ValueError("no systems to evaluate")
    systems = []
    for f in files:
        ind = load(f.in_domain)
        systems.append(SystemData(f.name or ind.model or "system", ind, {k: load(p) for k, p in f.ood.items()}))
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate system names: {names}")
    first = systems[0]
    for other in systems[1:]:
        check_same_ids(first.in_domain, other.in_domain, f"{first.name} ({first.in_domain.path})",
                       f"{other.name} ({other.in_domain.path})")
        for set_name in sorted(set(first.ood) & set(other.ood)):
            a, b = first.ood[set_name], other.ood[set_name]
            check_same_ids(a, b, f"{first.name} ({a.path})", f"{other.name} ({b.path})")
    return systems


# ---------------------------------------------------------------------------------------- evaluation


def _top(dset: DecodeSet) -> Tuple[List[str], List[str]]:
    return [s.hypotheses[0].hypothesis for s in dset.samples], [s.reference for s in dset.samples]


def _forced_nll(dset: DecodeSet) -> Optional[float]:
    """Mean over sentences of the length-normalised NLL of the forced-decoded reference (nats/token)."""
    if not dset.has_forced:
        return None
    values = []
    for s in dset.samples:
        r = s.forced
        length = r.length
        if not length:
            lists = [v for v in r.token.values()] + [r.token_confidence]
            length = next((len(v) for v in lists if v is not None), None)
        values.append(-r.log_prob / length if length else -r.score)
    return float(np.mean(values))


def _quality(dset: DecodeSet, cfg: EvalConfig) -> Tuple[dict, np.ndarray]:
    """Quality numbers of the top hypotheses and the per-sample errors used for the PRR."""
    hyps, refs = _top(dset)
    out = {}
    sbleu = swer = None
    if cfg.task == "mt" or cfg.prr_error == "bleu":
        sbleu = quality.sentence_bleu(
            hyps, refs, cfg.sentence_bleu_smooth_method, cfg.sentence_bleu_smooth_value, cfg.bleu_tokenize
        )
    if cfg.task == "asr" or cfg.prr_error == "wer":
        swer = quality.sentence_wer(hyps, refs, cfg.lowercase_wer)
    if cfg.task == "mt":
        out["bleu"], out["bleu_signature"] = quality.corpus_bleu(hyps, refs, cfg.bleu_tokenize)
        out["sentence_bleu_mean"] = float(sbleu.mean())
    else:
        out["wer"] = quality.corpus_wer(hyps, refs, cfg.lowercase_wer)
        out["sentence_wer_mean"] = float(swer.mean())
    out["nll"] = _forced_nll(dset)
    errors = 1.0 - sbleu / 100.0 if cfg.prr_error == "bleu" else swer / 100.0
    return out, np.clip(errors, 0.0, None)


def _corpus_quality(dset: DecodeSet, cfg: EvalConfig) -> dict:
    """Corpus BLEU (mt) or WER (asr) of the top hypotheses, plus the forced-reference NLL."""
    out = {}
    if dset.has_hypotheses:
        hyps, refs = _top(dset)
        if cfg.task == "mt":
            out["bleu"], out["bleu_signature"] = quality.corpus_bleu(hyps, refs, cfg.bleu_tokenize)
        else:
            out["wer"] = quality.corpus_wer(hyps, refs, cfg.lowercase_wer)
    out["nll"] = _forced_nll(dset)
    return out


def _hyp_measures(dset: DecodeSet, cfg: EvalConfig, measures=None) -> Dict[str, np.ndarray]:
    return sequence_measures(dset, cfg.nbest, cfg.weighting, cfg.temperature, cfg.weight_key, cfg.negated, measures)


def _ood(in_measures: Mapping[str, np.ndarray], ood_measures: Mapping[str, np.ndarray], keep_curves: bool):
    result, curves = {}, {}
    for m in in_measures:
        if m not in ood_measures:
            continue
        result[m] = metrics.ood_detection(in_measures[m], ood_measures[m])
        if keep_curves:
            fpr, tpr = metrics.ood_roc_curve(in_measures[m], ood_measures[m])
            curves[m] = (fpr, tpr, result[m]["roc_auc"])
    return result, curves


def _token_errors_reference(dset: DecodeSet, cfg: EvalConfig) -> Optional[dict]:
    forced = [s.forced for s in dset.samples] if dset.has_forced else []
    if not forced or not dset.forced_token_measures or any(r.token_correct is None for r in forced):
        return None
    labels = 1.0 - np.concatenate([r.token_correct for r in forced])
    scores = pooled_token_measures(forced, dset.forced_token_measures, cfg.negated)
    return _token_block(labels, scores)


def _token_errors_hypothesis(dset: DecodeSet, cfg: EvalConfig) -> Optional[dict]:
    top = [s.hypotheses[0] for s in dset.samples] if dset.has_hypotheses else []
    if not top or not dset.token_measures or any(r.tokens is None or r.reference_tokens is None for r in top):
        return None
    labels, drop_last = [], []
    for r in top:
        n_steps = len(next(iter(r.token.values())))
        if n_steps not in (len(r.tokens), len(r.tokens) + 1):
            raise ValueError(
                f"{dset.path}, line {r.line}: token measures have {n_steps} steps but 'tokens' has "
                f"{len(r.tokens)} (expected equal, or one more for EOS)"
            )
        drop_last.append(n_steps == len(r.tokens) + 1)
        labels.append(quality.token_error_labels(r.reference_tokens, r.tokens))
    scores = pooled_token_measures(top, dset.token_measures, cfg.negated, drop_last)
    return _token_block(np.concatenate(labels).astype(np.float64), scores)


def _token_block(labels: np.ndarray, scores: Mapping[str, np.ndarray]) -> dict:
    per = {m: metrics.error_detection(s, labels) for m, s in scores.items()}
    return {
        "error_rate": float(labels.mean()) if labels.size else None,
        "n_tokens": int(labels.size),
        "measures": {m: {"pr_auc": v["pr_auc"], "roc_auc": v["roc_auc"]} for m, v in per.items()},
    }


def _calibration(dset: DecodeSet, cfg: EvalConfig) -> Tuple[dict, Optional[dict]]:
    forced = [s.forced for s in dset.samples] if dset.has_forced else []
    out = {"ece": None, "n_bins": cfg.ece_bins, "n_tokens": 0, "accuracy": None, "mean_confidence": None}
    if not forced or any(r.token_confidence is None or r.token_correct is None for r in forced):
        return out, None
    conf = np.concatenate([r.token_confidence for r in forced])
    corr = np.concatenate([r.token_correct for r in forced])
    if conf.size == 0:
        return out, None
    out.update(
        ece=metrics.expected_calibration_error(conf, corr, cfg.ece_bins), n_tokens=int(conf.size),
        accuracy=float(corr.mean()), mean_confidence=float(conf.mean()),
    )
    return out, metrics.reliability_bins(conf, corr, cfg.ece_bins)


def evaluate_system(system: SystemData, cfg: EvalConfig) -> Tuple[dict, Artifacts]:
    """All metrics of one system (see the module docstring for the schema) plus curves for plotting."""
    ind = system.in_domain
    art = Artifacts()
    res = {
        "files": {"in_domain": ind.path, "ood": {k: v.path for k, v in system.ood.items()}},
        "n_samples": len(ind),
    }
    if ind.has_hypotheses:
        res["quality"], errors = _quality(ind, cfg)
        in_measures = _hyp_measures(ind, cfg)
        res["ood"] = {}
        for set_name, od in system.ood.items():
            if not od.has_hypotheses:
                continue
            common = [m for m in in_measures if m in od.sequence_measures]
            res["ood"][set_name], art.roc[set_name] = _ood(in_measures, _hyp_measures(od, cfg, common), True)
        res["error_detection"] = {}
        for m, u in in_measures.items():
            art.rejection[m] = metrics.rejection_curve(errors, u)
            res["error_detection"][m] = art.rejection[m].prr
    else:
        res["quality"] = {"nll": _forced_nll(ind)}
    if system.ood:
        res["ood_quality"] = {k: _corpus_quality(od, cfg) for k, od in system.ood.items()}
    if ind.has_forced and any(od.has_forced for od in system.ood.values()):
        f_in = forced_sequence_measures(ind, cfg.negated)
        res["ood_reference"] = {}
        for set_name, od in system.ood.items():
            if od.has_forced:
                f_od = forced_sequence_measures(od, cfg.negated, [m for m in f_in if m in od.forced_sequence_measures])
                res["ood_reference"][set_name], _ = _ood(f_in, f_od, False)
    token = {}
    for mode, fn in (("reference", _token_errors_reference), ("hypothesis", _token_errors_hypothesis)):
        block = fn(ind, cfg)
        if block is not None:
            token[mode] = block
    if token:
        res["token_error_detection"] = token
    res["calibration"], art.reliability = _calibration(ind, cfg)
    art.ece = res["calibration"]["ece"]
    return res, art


def evaluate(systems: Sequence[SystemData], cfg: EvalConfig) -> Tuple[dict, Dict[str, Artifacts]]:
    """The full report (``{"config", "systems"}``) and per-system plotting artifacts."""
    report = {"config": cfg.to_json(), "systems": {}}
    artifacts = {}
    for s in systems:
        report["systems"][s.name], artifacts[s.name] = evaluate_system(s, cfg)
    return report, artifacts


# -------------------------------------------------------------------------------------------- output


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(report: dict, path: str) -> str:
    """Write ``report`` as strict JSON (NaN / inf become ``null``)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_jsonable(report), f, indent=2, allow_nan=False)
        f.write("\n")
    return path


def _fmt(v, scale: float = 1.0, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{scale * v:.{digits}f}"


def _render(sections: List[Tuple[str, List[Tuple[str, List[str]]]]], systems: Sequence[str]) -> List[str]:
    """Sections of ``(row name, cells per system)`` rows, with one column layout for all of them."""
    width = max([24] + [len(name) for _, rows in sections for name, _ in rows])
    colw = max([10] + [len(s) for s in systems])
    lines = []
    for title, rows in sections:
        lines.append(title)
        lines.append("  " + " " * width + "".join(f"  {s:>{colw}}" for s in systems))
        lines += ["  " + f"{name:<{width}}" + "".join(f"  {c:>{colw}}" for c in cells) for name, cells in rows]
        lines.append("")
    return lines


def format_table(report: dict) -> str:
    """A readable text table with the systems side by side (percentages, '-' where undefined)."""
    systems = list(report["systems"])
    res = report["systems"]
    cfg = report["config"]
    out = [
        f"task {cfg['task']}, nbest {cfg['nbest']}, weighting {cfg['weighting']} (T={cfg['temperature']}), "
        f"PRR error {cfg['prr_error']}; negated measures (lower = more uncertain): "
        f"{', '.join(cfg['negated_measures']) or 'none'}",
        "",
    ]

    def q(key):
        return [res[s].get("quality", {}).get(key) for s in systems]

    rows = []
    if cfg["task"] == "mt":
        rows += [("BLEU", [_fmt(v) for v in q("bleu")]),
                 ("sentence BLEU (mean)", [_fmt(v) for v in q("sentence_bleu_mean")])]
    else:
        rows += [("WER (%)", [_fmt(v) for v in q("wer")]),
                 ("sentence WER (mean, %)", [_fmt(v) for v in q("sentence_wer_mean")])]
    rows.append(("NLL (nats/token)", [_fmt(v, digits=3) for v in q("nll")]))
    for set_name in sorted({k for s in systems for k in res[s].get("ood_quality", {})}):
        oq = [res[s].get("ood_quality", {}).get(set_name, {}) for s in systems]
        metric = ("bleu", "BLEU") if cfg["task"] == "mt" else ("wer", "WER (%)")
        rows.append((f"{metric[1]} [{set_name}]", [_fmt(x.get(metric[0])) for x in oq]))
        rows.append((f"NLL [{set_name}]", [_fmt(x.get("nll"), digits=3) for x in oq]))
    rows.append(("token ECE (%)", [_fmt(res[s].get("calibration", {}).get("ece"), 100.0) for s in systems]))
    sections = [("Quality and calibration", rows)]

    def measure_rows(getter):
        names = sorted({m for s in systems for m in (getter(res[s]) or {})})
        return [(m, [_fmt((getter(res[s]) or {}).get(m), 100.0, 1) for s in systems]) for m in names]

    prr_rows = measure_rows(lambda r: r.get("error_detection"))
    if prr_rows:
        sections.append(("Sequence error detection: PRR (%)", prr_rows))
    for key, label in (("ood", "OOD detection"), ("ood_reference", "OOD detection (forced references)")):
        sets = sorted({k for s in systems for k in res[s].get(key, {})})
        for set_name in sets:
            for metric, mlabel in (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC")):
                rows = measure_rows(
                    lambda r: {m: v[metric] for m, v in r.get(key, {}).get(set_name, {}).items()}
                )
                sections.append((f"{label} {mlabel} (%): {set_name}", rows))
    modes = sorted({m for s in systems for m in res[s].get("token_error_detection", {})})
    for mode in modes:
        rows = measure_rows(lambda r: {
            m: v["pr_auc"] for m, v in r.get("token_error_detection", {}).get(mode, {}).get("measures", {}).items()
        })
        rate = [res[s].get("token_error_detection", {}).get(mode, {}).get("error_rate") for s in systems]
        rows.append(("(error rate = random)", [_fmt(v, 100.0, 1) for v in rate]))
        sections.append((f"Token error detection PR-AUC (%), {mode}", rows))
    out += _render(sections, systems)
    sigs = {res[s].get("quality", {}).get("bleu_signature") for s in systems} - {None}
    for sig in sorted(sigs):
        out.append(f"BLEU signature: {sig}")
    if cfg["prr_error"] == "bleu":
        out.append(f"sentence BLEU signature: {cfg['sentence_bleu']['signature']}")
    return "\n".join(out).rstrip() + "\n"


def write_plots(artifacts: Mapping[str, Artifacts], out_dir: str, cfg: EvalConfig) -> List[str]:
    """PNG files: ``rejection_<measure>.png``, ``roc_<set>.png`` and ``reliability.png`` under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    ylabel = "mean (1 - sentence BLEU / 100) (%)" if cfg.prr_error == "bleu" else "mean sentence WER (%)"
    measures = sorted({m for a in artifacts.values() for m in a.rejection})
    stems = plots.unique_names(measures)
    for m in measures:
        curves = {s: a.rejection[m] for s, a in artifacts.items() if m in a.rejection}
        paths.append(plots.plot_rejection_curves(
            curves, f"rejection curve: {m}", os.path.join(out_dir, f"rejection_{stems[m]}.png"), ylabel
        ))
    sets = sorted({k for a in artifacts.values() for k in a.roc})
    set_stems = plots.unique_names(sets)
    for k in sets:
        rocs = {s: a.roc[k] for s, a in artifacts.items() if a.roc.get(k)}
        if rocs:
            paths.append(plots.plot_roc_curves(rocs, f"OOD {k}", os.path.join(out_dir, f"roc_{set_stems[k]}.png")))
    rel = {s: a.reliability for s, a in artifacts.items() if a.reliability is not None}
    if rel:
        eces = {s: artifacts[s].ece for s in rel}
        paths.append(plots.plot_reliability(rel, os.path.join(out_dir, "reliability.png"), eces))
    return paths


def run(files: Sequence[SystemFiles], cfg: EvalConfig, out_dir: str, make_plots: bool = True,
        stream: Optional[TextIO] = sys.stdout) -> dict:
    """Load, evaluate, write ``report.json``, ``report.txt`` and the plots into ``out_dir``; print the table."""
    systems = load_systems(files)
    report, artifacts = evaluate(systems, cfg)
    os.makedirs(out_dir, exist_ok=True)
    write_json(report, os.path.join(out_dir, "report.json"))
    table = format_table(report)
    with open(os.path.join(out_dir, "report.txt"), "w", encoding="utf-8") as f:
        f.write(table)
    if make_plots:
        write_plots(artifacts, os.path.join(out_dir, "plots"), cfg)
    if stream is not None:
        stream.write(table)
        stream.flush()
    return _jsonable(report)


__all__ = [
    "EvalConfig", "SystemFiles", "SystemData", "Artifacts", "load_systems", "evaluate_system", "evaluate",
    "write_json", "format_table", "write_plots", "run",
]
