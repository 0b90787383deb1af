"""Text side of the MT recipes: a joint sentencepiece model, subword encoding, parallel-corpus
cleaning, and the sequence-level distillation pairs extracted from ``fairseq-generate`` output.

Everything streams line by line (WMT17 En-De has ~5.9M training pairs) and writes its outputs under a
temporary name renamed at the end, so an interrupted run never leaves a file that looks finished.
No fairseq import: the recipes call fairseq's own CLIs for binarisation and decoding.

Command line (``python -m fairseq_pdd.data.mt_text SUBCOMMAND``; the recipes run the file itself,
``python fairseq_pdd/data/mt_text.py SUBCOMMAND``, which skips the package's import of fairseq)::

    spm-train --input train.en train.de --model-prefix spm --vocab-size 40000
    encode --model spm.model --input train.en valid.en --output enc/train.en enc/valid.en
    clean --source enc/train.en --target enc/train.de --out-source c/train.en --out-target c/train.de \\
        --min-len 1 --max-len 250 --ratio 1.5
    extract --source enc/train.en --out-source distill/train.en --out-target distill/train.de \\
        gen/train.0.txt gen/train.1.txt
"""
import argparse
import contextlib
import itertools
import os
import re
import sys
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

#: a hypothesis line of fairseq-generate: ``H-{id}\t{score}\t{text}``
HYPOTHESIS_LINE = re.compile(r"^H-(\d+)\t([^\t]*)(?:\t(.*))?$")


def iter_lines(path: str) -> Iterator[str]:
    """The lines of a UTF-8 text file without their line endings, streamed."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\r\n")


@contextlib.contextmanager
def atomic_output(path: str):
    """A text file opened for writing as ``path.tmp`` and renamed to ``path`` only on success."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def train_sentencepiece(
    inputs: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    input_sentence_size: int = 10_000_000,
    hard_vocab_limit: bool = True,
    seed: int = 0,
    num_threads: int = 1,
) -> str:
    """Train one sentencepiece model on all of ``inputs`` (both languages: a joint vocabulary).

    At most ``input_sentence_size`` lines (sampled with the seeded generator when the input is
    larger) are used. ``hard_vocab_limit=False`` lets tiny corpora end below ``vocab_size``.
    Writes ``model_prefix.model`` and ``.vocab``; returns the model path.
    """
    import sentencepiece as spm

    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sentencepiece training input not found: {path}")
    spm.set_random_generator_seed(seed)
    tmp = model_prefix + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=list(inputs), model_prefix=tmp, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, hard_vocab_limit=hard_vocab_limit, num_threads=num_threads,
        minloglevel=1,
    )
    os.replace(tmp + ".vocab", model_prefix + ".vocab")
    os.replace(tmp + ".model", model_prefix + ".model")  # last: its presence means "done"
    return model_prefix + ".model"


def _batches(lines: Iterable[str], size: int) -> Iterator[List[str]]:
    it = iter(lines)
    while True:
        batch = list(itertools.islice(it, size))
        if not batch:
            return
        yield batch


def encode_file(model: str, source: str, output: str, num_threads: int = 1, batch_size: int = 10_000) -> int:
    """Write ``source`` as whitespace-separated sentencepiece pieces, line by line; returns the line count."""
    import sentencepiece as spm

    if not os.path.isfile(model):
        raise FileNotFoundError(f"sentencepiece model not found: {model}")
    sp = spm.SentencePieceProcessor(model_file=model)
    count = 0
    with atomic_output(output) as out:
        for batch in _batches(iter_lines(source), batch_size):
            for pieces in sp.encode(batch, out_type=str, num_threads=num_threads):
                out.write(" ".join(pieces) + "\n")
            count += len(batch)
    return count


def keep_pair(source: str, target: str, min_len: int, max_len: int, ratio: float) -> bool:
    """Moses ``clean-corpus-n`` rule on whitespace tokens: both lengths in [min_len, max_len] and
    neither longer than ``ratio`` times the other."""
    n, m = len(source.split()), len(target.split())
    if not (min_len <= n <= max_len and min_len <= m <= max_len):
        return False
    return n <= ratio * m and m <= ratio * n


def clean_parallel(
    source: str, target: str, out_source: str, out_target: str,
    min_len: int = 1, max_len: int = 250, ratio: float = 1.5,
) -> Tuple[int, int]:
    """Write the pairs of (``source``, ``target``) that :func:`keep_pair` keeps; returns (kept, total).

    The two files must have the same number of lines.
    """
    kept = total = 0
    with atomic_output(out_source) as fs, atomic_output(out_target) as ft:
        pairs = itertools.zip_longest(iter_lines(source), iter_lines(target))
        for total, (s, t) in enumerate(pairs, 1):
            if s is None or t is None:
                short = source if s is None else target
                raise ValueError(f"{source} and {target} differ in length: {short} ends at line {total - 1}")
            if keep_pair(s, t, min_len, max_len, ratio):
                fs.write(s + "\n")
                ft.write(t + "\n")
                kept += 1
    return kept, total


def read_hypotheses(paths: Sequence[str]) -> Dict[int, str]:
    """``{sample id: hypothesis text}`` from the ``H-`` lines of fairseq-generate outputs (n-best 1).

    Several files are the shards of one split. A second hypothesis for an id (n-best > 1, or
    overlapping shards) is an error naming the file and line.
    """
    hypotheses: Dict[int, str] = {}
    where: Dict[int, str] = {}
    for path in paths:
        for lineno, line in enumerate(iter_lines(path), 1):
            match = HYPOTHESIS_LINE.match(line)
            if match is None:
                continue
            sample_id = int(match.group(1))
            if sample_id in hypotheses:
                raise ValueError(f"{path}:{lineno}: second hypothesis for sample {sample_id} (first at "
                                 f"{where[sample_id]}); decode with --nbest 1 and disjoint shards")
            hypotheses[sample_id] = match.group(3) or ""
            where[sample_id] = f"{path}:{lineno}"
    return hypotheses


def _id_summary(ids: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return f"{len(ids)} ({shown}{', ...' if len(ids) > limit else ''})"


def extract_pairs(generate_outputs: Sequence[str], source: str, out_source: str, out_target: str) -> int:
    """The distillation pairs of one split: line i of ``source`` (the text that was binarised and
    decoded, so sample id i) with the ensemble's hypothesis for id i, in id order.

    fairseq-generate prints samples in batch order, not id order; every id of ``source`` must have
    exactly one hypothesis. Returns the number of pairs.
    """
    hypotheses = read_hypotheses(generate_outputs)
    sources = list(iter_lines(source))
    missing = [i for i in range(len(sources)) if i not in hypotheses]
    extra = sorted(i for i in hypotheses if i >= len(sources))
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"no hypothesis for {_id_summary(missing)} of the {len(sources)} lines of {source}")
        if extra:
            problems.append(f"hypotheses for ids beyond {source}'s {len(sources)} lines: {_id_summary(extra)}")
        raise ValueError(f"{', '.join(generate_outputs)}: " + "; ".join(problems)
                         + " (was the decoding interrupted, or another split / all shards not given?)")
    with atomic_output(out_source) as fs, atomic_output(out_target) as ft:
        for i, line in enumerate(sources):
            fs.write(line + "\n")
            ft.write(hypotheses[i] + "\n")
    return len(sources)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fairseq_pdd.data.mt_text", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("spm-train", help="train a joint sentencepiece model")
    t.add_argument("--input", nargs="+", required=True, help="text files (all languages)")
    t.add_argument("--model-prefix", required=True)
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--model-type", default="bpe", choices=("bpe", "unigram", "char", "word"))
    t.add_argument("--character-coverage", type=float, default=1.0)
    t.add_argument("--input-sentence-size", type=int, default=10_000_000, help="lines sampled for training")
    t.add_argument("--no-hard-vocab-limit", action="store_true",
                   help="allow a smaller vocabulary than --vocab-size (tiny corpora)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)

    e = sub.add_parser("encode", help="encode text files into sentencepiece pieces")
    e.add_argument("--model", required=True)
    e.add_argument("--input", nargs="+", required=True)
    e.add_argument("--output", nargs="+", required=True, help="one per --input")
    e.add_argument("--threads", type=int, default=1)

    c = sub.add_parser("clean", help="drop empty, too long and badly length-matched pairs")
    for flag in ("--source", "--target", "--out-source", "--out-target"):
        c.add_argument(flag, required=True)
    c.add_argument("--min-len", type=int, default=1)
    c.add_argument("--max-len", type=int, default=250)
    c.add_argument("--ratio", type=float, default=1.5)

    x = sub.add_parser("extract", help="distillation pairs from fairseq-generate output, in id order")
    x.add_argument("generate_output", nargs="+", help="fairseq-generate stdout (all shards of one split)")
    for flag in ("--source", "--out-source", "--out-target"):
        x.add_argument(flag, required=True)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (1 with ``error: ...`` on bad input)."""
    args = _build_parser().parse_args(argv)
    try:
        if args.cmd == "spm-train":
            path = train_sentencepiece(args.input, args.model_prefix, args.vocab_size, args.model_type,
                                       args.character_coverage, args.input_sentence_size,
                                       not args.no_hard_vocab_limit, args.seed, args.threads)
            print(path)
        elif args.cmd == "encode":
            if len(args.input) != len(args.output):
                raise ValueError(f"encode: {len(args.input)} --input files but {len(args.output)} --output files")
            for src, out in zip(args.input, args.output):
                print(f"{out}: {encode_file(args.model, src, out, args.threads)} lines")
        elif args.cmd == "clean":
            kept, total = clean_parallel(args.source, args.target, args.out_source, args.out_target,
                                         args.min_len, args.max_len, args.ratio)
            print(f"{args.out_source}, {args.out_target}: kept {kept} of {total} pairs")
        else:
            n = extract_pairs(args.generate_output, args.source, args.out_source, args.out_target)
            print(f"{args.out_source}, {args.out_target}: {n} pairs")
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
