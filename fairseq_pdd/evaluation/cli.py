"""``fairseq-pdd-evaluate``: quality, OOD detection, error detection and calibration from decoded JSONL.

One system::

    fairseq-pdd-evaluate --in-domain test.jsonl --ood perm=perm.jsonl --ood de=de.jsonl \\
        --task mt --nbest 5 --weighting bs --out-dir eval/

Several systems side by side (``NAME=SPEC``; ``SPEC`` is a directory, or a comma-separated list of
files where ``SET:FILE`` names an OOD set and a bare ``FILE`` is the in-domain set)::

    fairseq-pdd-evaluate --system ensemble=decode/ensemble --system student=decode/student \\
        --in-domain test.jsonl --ood perm=perm.jsonl --out-dir eval/
    fairseq-pdd-evaluate --system ensemble=ens/test.jsonl,perm:ens/perm.jsonl \\
        --system student=stu/test.jsonl,perm:stu/perm.jsonl --out-dir eval/

With a directory ``SPEC``, ``--in-domain`` (default ``test.jsonl``) and the ``--ood`` files are
resolved inside it. Writes ``report.json``, ``report.txt`` (also printed) and ``plots/*.png`` to
``--out-dir``. Bad input stops with ``error: ...`` naming the file and line, exit status 1.
"""
import argparse
import logging
import os
import sys
from typing import List, Optional, Sequence

from . import metrics, quality
from .aggregate import DEFAULT_NEGATED, WEIGHT_KEYS, WEIGHTINGS
from .report import EvalConfig, SystemFiles, run


def _key_value(text: str, flag: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{flag} expects NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    if not name or not value:
        raise argparse.ArgumentTypeError(f"{flag} expects NAME=VALUE, got {text!r}")
    return name, value


def _nbest(text: str) -> Optional[int]:
    if text.lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nbest expects a positive integer or 'all', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--nbest expects a positive integer or 'all', got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fairseq-pdd-evaluate",
        description="Evaluate decoded n-best lists with uncertainties (JSONL from the fairseq_pdd decoder).",
    )
    p.add_argument("--in-domain", metavar="FILE",
                   help="in-domain JSONL (relative to each --system directory; default there: test.jsonl)")
    p.add_argument("--ood", metavar="NAME=FILE", action="append", default=[],
                   type=lambda t: _key_value(t, "--ood"), help="an OOD set (repeatable)")
    p.add_argument("--system", metavar="NAME=SPEC", action="append", default=[],
                   type=lambda t: _key_value(t, "--system"),
                   help="a system: a directory, or FILE[,SET:FILE...] (repeatable)")
    p.add_argument("--name", help="system name without --system (default: the records' 'model' field)")
    p.add_argument("--task", choices=("mt", "asr"), default="mt", help="mt: BLEU; asr: WER (default: mt)")
    p.add_argument("--nbest", type=_nbest, default=1, help="hypotheses aggregated per sample: N or 'all' (default: 1)")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="bs",
                   help="bs: softmax(weight-key / T) importance weights; mc: uniform (default: bs)")
    p.add_argument("--temperature", type=float, default=1.0, help="T of the bs weights (default: 1)")
    p.add_argument("--weight-key", choices=WEIGHT_KEYS, default="log_prob",
                   help="hypothesis field the bs weights use (default: log_prob)")
    p.add_argument("--negate", default=",".join(DEFAULT_NEGATED),
                   help="comma-separated measures where LOWER means more uncertain, '' for none "
                        f"(default: {','.join(DEFAULT_NEGATED)})")
    p.add_argument("--prr-error", choices=("bleu", "wer"), help="PRR error signal (default: bleu for mt, wer for asr)")
    p.add_argument("--ece-bins", type=int, default=metrics.DEFAULT_ECE_BINS,
                   help=f"equal-width bins of the token ECE (default: {metrics.DEFAULT_ECE_BINS})")
    p.add_argument("--bleu-tokenize", default="13a", help="sacreBLEU tokenizer (default: 13a)")
    p.add_argument("--sentence-bleu-smooth", choices=quality.SMOOTH_METHODS,
                   default=quality.SENTENCE_BLEU_SMOOTH_METHOD,
                   help=f"sentence-BLEU smoothing (default: {quality.SENTENCE_BLEU_SMOOTH_METHOD}, as the reference)")
    p.add_argument("--sentence-bleu-smooth-value", type=float, default=quality.SENTENCE_BLEU_SMOOTH_VALUE,
                   help=f"floor / add-k value (default: {quality.SENTENCE_BLEU_SMOOTH_VALUE})")
    p.add_argument("--lowercase-wer", action="store_true", help="lowercase before computing WER")
    p.add_argument("--out-dir", required=True, help="where report.json, report.txt and plots/ go")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def _system_files(args) -> List[SystemFiles]:
    if not args.system:
        if not args.in_domain:
            raise ValueError("give --in-domain FILE (or one or more --system NAME=SPEC)")
        return [SystemFiles(args.name, args.in_domain, dict(args.ood))]  # name None: the records' model
    out = []
    for name, spec in args.system:
        if os.path.isdir(spec):
            ind = os.path.join(spec, args.in_domain or "test.jsonl")
            out.append(SystemFiles(name, ind, {k: os.path.join(spec, v) for k, v in args.ood}))
            continue
        ind, ood = None, {}
        for item in filter(None, spec.split(",")):
            if os.path.exists(item) or ":" not in item:
                if ind is not None:
                    raise ValueError(f"--system {name}: two in-domain files ({ind}, {item}); name OOD sets SET:FILE")
                ind = item
            else:
                set_name, path = item.split(":", 1)
                ood[set_name] = path
        if ind is None:
            raise ValueError(f"--system {name}: no in-domain file in {spec!r}")
        out.append(SystemFiles(name, ind, ood))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``fairseq-pdd-evaluate``; returns the exit status (0 ok, 1 bad input)."""
    args = build_parser().parse_args(argv)
    # importing the fairseq_pdd plugin imports fairseq, which sets the root logger to DEBUG; keep
    # matplotlib's font-manager chatter out of the console
    for name in ("matplotlib", "PIL"):
        if logging.getLogger(name).getEffectiveLevel() < logging.WARNING:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        cfg = EvalConfig(
            task=args.task, nbest=args.nbest, weighting=args.weighting, temperature=args.temperature,
            weight_key=args.weight_key, negated=tuple(filter(None, (s.strip() for s in args.negate.split(",")))),
            prr_error=args.prr_error, ece_bins=args.ece_bins, bleu_tokenize=args.bleu_tokenize,
            sentence_bleu_smooth_method=args.sentence_bleu_smooth,
            sentence_bleu_smooth_value=args.sentence_bleu_smooth_value, lowercase_wer=args.lowercase_wer,
        )
        run(_system_files(args), cfg, args.out_dir, make_plots=not args.no_plots, stream=sys.stdout)
    except (ValueError, OSError) as e:
        print(f"fairseq-pdd-evaluate: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
