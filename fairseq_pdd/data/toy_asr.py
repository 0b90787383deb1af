"""A synthetic speech corpus in LibriSpeech's layout, for the ASR tests and demo.

Every word of a small vocabulary is a distinct *chord*: a 120 ms sound of two notes, the word's own
pair out of five notes spread geometrically over 300-2400 Hz. An utterance is 2-4 words separated by
short pauses, spoken by a "speaker" who shifts all frequencies by up to +-3 %, scales the amplitude
and adds noise; word and pause lengths vary too. Under the words runs a quiet "intonation" tone whose
pitch steps down word by word (250, 200, 160, 125 Hz, below every note): the VGG-Transformer's
encoder has no positional embeddings, and like the prosody of real speech this tells it which word of
the utterance a frame belongs to, so the order of the words is learnable by a one-layer decoder. A
tiny VGG-Transformer learns to transcribe it (roughly) in a few CPU epochs.

``write_subset`` writes ``ROOT/SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac`` (16-bit FLAC) and
``SPEAKER-CHAPTER.trans.txt`` (upper-case transcripts, like LibriSpeech). Subsets get disjoint
speaker ids. ``OOD_WORDS`` are other words, chords of notes in a band the in-domain words never use
(4-5.2 kHz): the toy analogue of another corpus or language. ``label_noise`` gives the ``train``
subset *noisy transcripts* (:func:`fairseq_pdd.data.toy_mt.add_label_noise`: each word replaced, with that
probability, by a word of the vocabulary drawn from a separate random stream), the audio unchanged.
"""
import argparse
import itertools
import os
import random
from typing import List, Optional, Sequence

import numpy as np

from fairseq_pdd.data.toy_mt import add_label_noise

#: fairseq-train options of the tiny VGG-Transformer that learns the toy corpus on a CPU (task speech_to_text
#: or asr_distillation, data prepared by ``fairseq_pdd.data.librispeech`` with subsets train/dev/test). Small
#: batches (300 frames, about 4 utterances): the attention needs many updates more than large batches.
TINY_VGG_TRANSFORMER = ["--arch", "pdd_vggtransformer_tiny"]
TINY_ASR_TRAINING = [
    "--train-subset", "train", "--valid-subset", "dev",
    "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "50",
    "--max-tokens", "300", "--cpu", "--no-progress-bar", "--log-format", "simple", "--log-interval", "50",
    "--no-epoch-checkpoints", "--num-workers", "0",
]
#: sentencepiece units for the toy corpus: every in-domain word but "one" becomes a single unit
TOY_VOCAB_SIZE = 28

WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
OOD_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")
SAMPLE_RATE = 16000
NUM_NOTES = 5  #: 10 pairs of notes: one chord per in-domain word
IN_DOMAIN_BAND = (300.0, 2400.0)
OOD_BAND = (4000.0, 5200.0)
WORD_SECONDS = 0.12
INTONATION_HZ = (250.0, 200.0, 160.0, 125.0)  #: background pitch under the 1st, 2nd, 3rd, 4th (and later) word


def word_frequencies(index: int, band: Sequence[float] = IN_DOMAIN_BAND) -> np.ndarray:
    """The two notes (Hz) of word ``index``'s chord: its own pair out of five notes spread geometrically
    over ``band`` (far enough apart that a speaker's shift never confuses them)."""
    notes = np.geomspace(band[0], band[1], NUM_NOTES)
    return notes[list(itertools.combinations(range(NUM_NOTES), 2))[index], ]


def synthesize(words: Sequence[int], rng: np.random.Generator, sample_rate: int = SAMPLE_RATE,
               band: Sequence[float] = IN_DOMAIN_BAND) -> np.ndarray:
    """One utterance (float32 samples in [-1, 1]) of the given word indices, with a random speaker."""
    shift = 1.0 + rng.uniform(-0.03, 0.03)
    amplitude = rng.uniform(0.2, 0.5)
    pieces, pitch = [], []  # word sounds and pauses; the intonation pitch under each sample

    def add(samples, k):
        pieces.append(samples)
        pitch.append(np.full(samples.size, INTONATION_HZ[min(k, len(INTONATION_HZ) - 1)]))

    for k, w in enumerate(words):
        add(np.zeros(int(rng.uniform(0.03, 0.08) * sample_rate)), k)
        n = int(WORD_SECONDS * rng.uniform(0.85, 1.15) * sample_rate)
        t = np.arange(n) / sample_rate
        chord = sum(np.sin(2 * np.pi * f * shift * t + rng.uniform(0, 2 * np.pi)) for f in word_frequencies(w, band))
        add(amplitude * 0.5 * chord * np.hanning(n), k)
    add(np.zeros(int(rng.uniform(0.03, 0.08) * sample_rate)), len(words) - 1)
    audio = np.concatenate(pieces)
    intonation = np.concatenate(pitch) * shift
    audio = audio + 0.3 * amplitude * np.sin(2 * np.pi * np.cumsum(intonation) / sample_rate)
    audio = audio + rng.normal(0.0, 0.01, audio.size)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def write_subset(root: str, subset: str, num_utterances: int, seed: int, first_speaker: int = 100,
                 num_speakers: int = 4, vocabulary: Sequence[str] = WORDS, band: Sequence[float] = IN_DOMAIN_BAND,
                 sample_rate: int = SAMPLE_RATE, min_words: int = 2, max_words: int = 4,
                 label_noise: float = 0.0) -> List[str]:
    """Write ``num_utterances`` utterances of ``ROOT/SUBSET`` (one chapter per speaker); returns their ids.
    ``label_noise``: the probability that a transcript word is replaced at random (the audio is the same)."""
    import soundfile

    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must lie in [0, 1], got {label_noise}")
    rng = np.random.default_rng(seed)
    noise_rng = random.Random(f"label-noise-{seed}")
    transcripts = {}
    ids = []
    for k in range(num_utterances):
        speaker = first_speaker + k % num_speakers
        chapter = 10 * speaker + 1
        uid = f"{speaker}-{chapter}-{k // num_speakers:04d}"
        folder = os.path.join(root, subset, str(speaker), str(chapter))
        os.makedirs(folder, exist_ok=True)
        words = rng.integers(0, len(vocabulary), rng.integers(min_words, max_words + 1))
        audio = synthesize(words, rng, sample_rate, band)
        soundfile.write(os.path.join(folder, uid + ".flac"), audio, sample_rate, subtype="PCM_16")
        text = add_label_noise([vocabulary[w] for w in words], vocabulary, label_noise, noise_rng)
        transcripts.setdefault(folder, []).append(f"{uid} {' '.join(text).upper()}")
        ids.append(uid)
    for folder, lines in transcripts.items():
        speaker, chapter = folder.split(os.sep)[-2:]
        with open(os.path.join(folder, f"{speaker}-{chapter}.trans.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return ids


def write_corpus(root: str, sizes: Optional[dict] = None, ood: int = 0, seed: int = 1, label_noise: float = 0.0) -> str:
    """In-domain subsets ``{name: utterances}`` (default train 240, dev 40, test 40) and, if ``ood`` > 0,
    an ``ood`` subset of that many utterances of :data:`OOD_WORDS`; ``label_noise`` on ``train`` only."""
    sizes = sizes or {"train": 240, "dev": 40, "test": 40}
    for k, (subset, n) in enumerate(sizes.items()):
        write_subset(root, subset, n, seed + k, first_speaker=100 * (k + 1),
                     label_noise=label_noise if subset == "train" else 0.0)
    if ood:
        write_subset(root, "ood", ood, seed + len(sizes), first_speaker=100 * (len(sizes) + 1),
                     vocabulary=OOD_WORDS, band=OOD_BAND)
    return root


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="fairseq-pdd-asr-toy-data", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="output root (LibriSpeech layout)")
    p.add_argument("--train", type=int, default=240)
    p.add_argument("--dev", type=int, default=40)
    p.add_argument("--test", type=int, default=40)
    p.add_argument("--ood", type=int, default=40, help="utterances of the out-of-domain subset 'ood' (0: none)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--label-noise", type=float, default=0.0,
                   help="probability that a word of a training transcript is replaced by a random word")
    args = p.parse_args(argv)
    try:
        write_corpus(args.root, {"train": args.train, "dev": args.dev, "test": args.test}, args.ood, args.seed,
                     args.label_noise)
    except ValueError as e:
        p.error(f"--label-noise: {e}")
    print(args.root)


if __name__ == "__main__":
    main()
