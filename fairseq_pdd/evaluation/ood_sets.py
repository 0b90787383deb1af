"""Build the standard MT out-of-distribution test sets from an in-domain test set (plain text files).

* **perm**: the words of every source sentence shuffled (whitespace tokens, one seeded
  ``numpy.random.default_rng(seed)`` drawn sentence by sentence in file order, so the output depends
  only on the input and the seed). Sentences of 0 or 1 words stay as they are.
* **swap** ("source in another language"): the source side replaced, line by line, by the sentences
  of another file (e.g. the same test set in a third language, or any text in another language).
  The files must have the same number of lines; ``truncate=True`` cuts both sides to the shorter one.

The references (target side) are copied unchanged, so each output pair can be binarised with
``fairseq-preprocess --testpref`` and decoded like the in-domain set. Lines are read and written as
UTF-8 without their trailing newline; empty lines are kept so line numbers stay aligned.

Command line::

    python -m fairseq_pdd.evaluation.ood_sets permute --source test.en --target test.de \\
        --out-source perm/test.en --out-target perm/test.de --seed 0
    python -m fairseq_pdd.evaluation.ood_sets swap --other-source test.fr --target test.de \\
        --out-source fr/test.en --out-target fr/test.de
"""
import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np


def read_lines(path: str) -> List[str]:
    """The lines of a UTF-8 text file without their line endings."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def write_lines(path: str, lines: Sequence[str]) -> str:
    """Write ``lines`` one per line (UTF-8, ``\\n``), creating the parent directory."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    return path


def permute_words(sentence: str, rng: np.random.Generator) -> str:
    """``sentence`` with its whitespace-separated words in a random order drawn from ``rng``."""
    words = sentence.split()
    if len(words) < 2:
        return " ".join(words)
    return " ".join(words[i] for i in rng.permutation(len(words)))


def permute_sentences(sentences: Sequence[str], seed: int = 0) -> List[str]:
    """Every sentence word-permuted with one generator seeded by ``seed``, in order."""
    rng = np.random.default_rng(seed)
    return [permute_words(s, rng) for s in sentences]


def make_permuted_set(source: str, target: str, out_source: str, out_target: str, seed: int = 0) -> Tuple[str, str]:
    """Write the permuted-source OOD set: shuffled source words, references copied; returns the two paths."""
    src, tgt = read_lines(source), read_lines(target)
    if len(src) != len(tgt):
        raise ValueError(f"{source} has {len(src)} lines but {target} has {len(tgt)}")
    return write_lines(out_source, permute_sentences(src, seed)), write_lines(out_target, tgt)


def make_swapped_source_set(other_source: str, target: str, out_source: str, out_target: str,
                            truncate: bool = False) -> Tuple[str, str]:
    """Write the "source in another language" OOD set: ``other_source`` lines as sources, references copied."""
    other, tgt = read_lines(other_source), read_lines(target)
    if len(other) != len(tgt):
        if not truncate:
            raise ValueError(
                f"{other_source} has {len(other)} lines but {target} has {len(tgt)} "
                "(use truncate=True / --truncate to cut both to the shorter)"
            )
        n = min(len(other), len(tgt))
        other, tgt = other[:n], tgt[:n]
    return write_lines(out_source, other), write_lines(out_target, tgt)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fairseq_pdd.evaluation.ood_sets {permute,swap} ...``; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m fairseq_pdd.evaluation.ood_sets", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    perm = sub.add_parser("permute", help="shuffle the words of each source sentence")
    perm.add_argument("--source", required=True)
    perm.add_argument("--seed", type=int, default=0)
    swap = sub.add_parser("swap", help="replace the sources by sentences in another language")
    swap.add_argument("--other-source", required=True)
    swap.add_argument("--truncate", action="store_true")
    for sp in (perm, swap):
        sp.add_argument("--target", required=True)
        sp.add_argument("--out-source", required=True)
        sp.add_argument("--out-target", required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "permute":
            paths = make_permuted_set(args.source, args.target, args.out_source, args.out_target, args.seed)
        else:
            paths = make_swapped_source_set(args.other_source, args.target, args.out_source, args.out_target,
                                            args.truncate)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
