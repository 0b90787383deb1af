"""A synthetic translation corpus with genuine ambiguity, for the demo and the tests.

Source words ``s0 .. s{V-1}`` translate word by word, in reversed order, to target words. A fraction
of the source words is *ambiguous*: each occurrence translates to one of two target words at
random, so a well-trained model is uncertain exactly there (data uncertainty), while members of an
ensemble agree on it. With ``label_noise`` the training references get *noisy labels*: each target
word is replaced, with that probability, by a target word drawn uniformly from the lexicon (from a
separate random stream, so the clean sentences are the same with and without noise); validation
and test stay clean. The files are plain text, one sentence per line, the layout
``fairseq-preprocess`` reads (``{split}.{src}`` / ``{split}.{tgt}``).
"""
import os
import random
from typing import Dict, List, Sequence, Tuple

#: fairseq-train options of a tiny Transformer that learns the toy task in seconds on a CPU.
TINY_TRANSFORMER = [
    "--arch", "transformer",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
    "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    "--share-decoder-input-output-embed", "--dropout", "0.1",
]
#: fairseq-train optimisation and logging options used with it on a CPU.
TINY_TRAINING = [
    "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "50",
    "--max-tokens", "500", "--cpu", "--no-progress-bar", "--log-format", "simple", "--log-interval", "50",
    "--no-epoch-checkpoints", "--num-workers", "0",
]


def make_lexicon(vocab_size: int, ambiguous_fraction: float, rng: random.Random) -> Dict[str, List[str]]:
    """Maps every source word to its one or two target words."""
    lexicon = {}
    for i in range(vocab_size):
        choices = [f"t{i}"]
        if rng.random() < ambiguous_fraction:
            choices.append(f"u{i}")
        lexicon[f"s{i}"] = choices
    return lexicon


def translate(source: Sequence[str], lexicon: Dict[str, List[str]], rng: random.Random) -> List[str]:
    """A reference translation: each word's translation, drawn at random if ambiguous, reversed."""
    return [rng.choice(lexicon[w]) for w in reversed(source)]


def sample_sentence(
    rng: random.Random, min_len: int, max_len: int, first_word: int, num_words: int
) -> List[str]:
    """A random source sentence over the words ``s{first_word} .. s{first_word + num_words - 1}``."""
    return [f"s{first_word + rng.randrange(num_words)}" for _ in range(rng.randint(min_len, max_len))]


def add_label_noise(
    words: Sequence[str], target_vocabulary: Sequence[str], noise: float, rng: random.Random
) -> List[str]:
    """Replace each word, with probability ``noise``, by a word drawn uniformly from ``target_vocabulary``."""
    return [rng.choice(target_vocabulary) if rng.random() < noise else w for w in words]


def _write_split(out_dir, split, count, lexicon, rng, min_len, max_len, first_word, src, tgt, noise=None) -> None:
    """``noise``: ``(probability, random stream)`` to corrupt the references, or None."""
    os.makedirs(out_dir, exist_ok=True)
    vocabulary = sorted({w for choices in lexicon.values() for w in choices})
    with open(os.path.join(out_dir, f"{split}.{src}"), "w") as fs, open(
        os.path.join(out_dir, f"{split}.{tgt}"), "w"
    ) as ft:
        for _ in range(count):
            sentence = sample_sentence(rng, min_len, max_len, first_word, len(lexicon))
            reference = translate(sentence, lexicon, rng)
            if noise is not None:
                reference = add_label_noise(reference, vocabulary, *noise)
            fs.write(" ".join(sentence) + "\n")
            ft.write(" ".join(reference) + "\n")


def write_corpus(
    out_dir: str,
    splits: Dict[str, int],
    vocab_size: int = 40,
    ambiguous_fraction: float = 0.25,
    min_len: int = 3,
    max_len: int = 8,
    src: str = "src",
    tgt: str = "tgt",
    seed: int = 1,
    label_noise: float = 0.0,
) -> Tuple[str, Dict[str, List[str]]]:
    """Write ``{split}.{src}`` / ``{split}.{tgt}`` for each ``split: num_sentences``.

    ``label_noise`` corrupts the references of the ``train`` split only (see the module docstring).
    Returns the directory and the lexicon used.
    """
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must lie in [0, 1], got {label_noise}")
    rng = random.Random(seed)
    lexicon = make_lexicon(vocab_size, ambiguous_fraction, rng)
    noise = (label_noise, random.Random(f"label-noise-{seed}")) if label_noise else None
    for split, count in splits.items():
        _write_split(out_dir, split, count, lexicon, rng, min_len, max_len, 0, src, tgt,
                     noise if split == "train" else None)
    return out_dir, lexicon


def write_unseen_vocabulary_split(
    out_dir: str,
    split: str,
    count: int,
    vocab_size: int = 40,
    min_len: int = 3,
    max_len: int = 8,
    src: str = "src",
    tgt: str = "tgt",
    seed: int = 2,
) -> str:
    """An out-of-distribution split whose source words ``s{V} .. s{2V-1}`` never occur in training.

    Binarised with the training dictionaries they become ``<unk>``: the toy analogue of a source in
    another language. References follow the same word-by-word, reversed rule.
    """
    rng = random.Random(seed)
    lexicon = {f"s{i}": [f"t{i}"] for i in range(vocab_size, 2 * vocab_size)}
    _write_split(out_dir, split, count, lexicon, rng, min_len, max_len, vocab_size, src, tgt)
    return out_dir


def main(argv=None) -> None:
    """``fairseq-pdd-toy-data OUT_DIR``: write the synthetic corpus (train/valid/test)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=2000, help="training sentences")
    parser.add_argument("--valid", type=int, default=100)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--vocab-size", type=int, default=40, help="source words (the target vocabulary is "
                        "about (1 + ambiguous fraction) times this)")
    parser.add_argument("--min-len", type=int, default=3, help="shortest sentence, in words")
    parser.add_argument("--max-len", type=int, default=8, help="longest sentence, in words")
    parser.add_argument("--ambiguous-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--label-noise", type=float, default=0.0,
                        help="replace this fraction of the training references' words by random target words")
    parser.add_argument("--ood", type=int, default=0, help="also write an 'ood' split of this many sentences "
                        "with source words never seen in training")
    args = parser.parse_args(argv)
    if not 1 <= args.min_len <= args.max_len:
        parser.error(f"need 1 <= --min-len <= --max-len, got {args.min_len} and {args.max_len}")
    write_corpus(
        args.out_dir,
        {"train": args.train, "valid": args.valid, "test": args.test},
        vocab_size=args.vocab_size,
        ambiguous_fraction=args.ambiguous_fraction,
        min_len=args.min_len,
        max_len=args.max_len,
        seed=args.seed,
        label_noise=args.label_noise,
    )
    if args.ood:
        write_unseen_vocabulary_split(args.out_dir, "ood", args.ood, args.vocab_size, args.min_len, args.max_len,
                                      seed=args.seed + 1)


if __name__ == "__main__":
    main()
