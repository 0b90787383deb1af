"""``python -m fairseq_pdd.self_distillation.chain_report``: the per-step table of a self-distillation chain (no fairseq).

Each step's model is decoded once with ``fairseq-pdd-generate --uncertainty-reference`` (n-best
hypotheses plus the teacher-forced reference, one JSONL record each). From those files this prints,
per step: the ground-truth weight ``a`` it was trained with, corpus BLEU (``--task mt``) or WER
(``--task asr``) of the top hypotheses (:mod:`fairseq_pdd.evaluation.quality`, sacrebleu), and over
the reference tokens (EOS included, as fairseq's ``nll_loss``) the gold NLL ``-log p(y_t)`` (nats
per token, pooled over tokens), the mean predictive entropy, the accuracy and the ECE
(:func:`fairseq_pdd.evaluation.metrics.expected_calibration_error`).
"""
import argparse
import json
import sys
from typing import List, Optional, Sequence

import numpy as np

from fairseq_pdd.evaluation import io, metrics, quality



def step_metrics(path: str, task: str = "mt", ece_bins: int = metrics.DEFAULT_ECE_BINS) -> dict:
    """The quality and token metrics of one step's JSONL file."""
    dset = io.load(path)
    if not dset.has_hypotheses or not dset.has_forced:
        raise ValueError(f"{path}: needs hypotheses and forced references (fairseq-pdd-generate --uncertainty-reference)")
    missing = {"nll", "total_uncertainty"} - set(dset.forced_token_measures)
    if missing:
        raise ValueError(f"{path}: the forced references lack the token measures {sorted(missing)}")
    forced = [s.forced for s in dset.samples]
    if any(r.token_confidence is None or r.token_correct is None for r in forced):
        raise ValueError(f"{path}: the forced references lack token_confidence / token_correct")
    hyps = [s.hypotheses[0].hypothesis for s in dset.samples]
    refs = [s.reference for s in dset.samples]
    score = quality.corpus_bleu(hyps, refs)[0] if task == "mt" else quality.corpus_wer(hyps, refs)
    confidence = np.concatenate([r.token_confidence for r in forced])
    correct = np.concatenate([r.token_correct for r in forced])
    return {
        "quality": score,
        "nll": float(np.concatenate([r.token["nll"] for r in forced]).mean()),
        "entropy": float(np.concatenate([r.token["total_uncertainty"] for r in forced]).mean()),
        "accuracy": float(correct.mean()),
        "ece": metrics.expected_calibration_error(confidence, correct, ece_bins),
        "tokens": int(confidence.size),
    }


def chain_rows(paths: Sequence[str], gt_weights: Sequence[float], task: str = "mt") -> List[dict]:
    """One row per step: ``{"step", "gt_weight", **step_metrics}``."""
    if len(paths) != len(gt_weights):
        raise ValueError(f"{len(paths)} JSONL files but {len(gt_weights)} ground-truth weights")
    return [{"step": s, "gt_weight": float(a), **step_metrics(p, task)} for s, (p, a) in enumerate(zip(paths, gt_weights))]


def format_table(rows: Sequence[dict], task: str = "mt") -> str:
    header = ["step", "a", "BLEU" if task == "mt" else "WER", "gold NLL", "entropy", "accuracy", "ECE", "tokens"]
    lines = ["  ".join(f"{h:>9}" for h in header)]
    for r in rows:
        values = [f"{r['step']}", f"{r['gt_weight']:.3f}", f"{r['quality']:.2f}", f"{r['nll']:.4f}",
                  f"{r['entropy']:.4f}", f"{r['accuracy']:.4f}", f"{r['ece']:.4f}", f"{r['tokens']}"]
        lines.append("  ".join(f"{v:>9}" for v in values))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jsonl", nargs="+", help="one fairseq-pdd-generate --uncertainty-reference JSONL per step, step 0 first")
    parser.add_argument("--gt-weights", required=True,
                        help="comma-separated ground-truth weight of each step (1 for the supervised step 0)")
    parser.add_argument("--task", choices=("mt", "asr"), default="mt", help="mt: BLEU; asr: WER")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    try:
        weights = [float(x) for x in args.gt_weights.split(",")]
    except ValueError:
        parser.error(f"--gt-weights must be comma-separated numbers, got {args.gt_weights!r}")
    rows = chain_rows(args.jsonl, weights, args.task)
    print(format_table(rows, args.task))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
