"""Prepare a LibriSpeech-layout corpus for fairseq's ``speech_to_text`` task.

Input: a root in LibriSpeech's layout (any subsets)::

    ROOT/SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac
    ROOT/SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt     one "SPEAKER-CHAPTER-UTT TRANSCRIPT" a line

Output (``OUT``), what ``fairseq-train OUT --task speech_to_text`` (or ``asr_distillation``) reads:

* ``fbank{N}/SUBSET/ID.npy``: log-mel filter banks, (frames, N) float32, from
  ``torchaudio.compliance.kaldi.fbank`` (25 ms windows every 10 ms, N = 80 mel bins by default) on the
  16-bit-scaled waveform, as fairseq's own recipes compute them;
* ``SUBSET.tsv``: fairseq's manifest, columns ``id, audio, n_frames, tgt_text, speaker`` (transcripts
  lower-cased, as in fairseq's LibriSpeech recipe);
* ``spm_unigram{V}.model`` / ``.txt``: a sentencepiece model (unigram, V = 5000 units by default)
  trained on the transcripts of the ``train*`` subsets, and its fairseq dictionary;
* ``config.yaml``: vocabulary, sentencepiece tokenizer, feature dimension, ``audio_root``, and the
  feature normalisation: utterance-level CMVN (fairseq's ``utterance_cmvn`` transform, the authors'
  choice and the default), global CMVN (``global_cmvn`` with statistics of the training features) or none.

Resumable: an utterance whose features exist is not featurised again (files are written under a
temporary name and renamed, so an interrupted run leaves no partial file); the vocabulary is reused
when no ``train*`` subset is prepared (e.g. an extra test or OOD set later). Bad input stops with a
:class:`PreparationError` naming the file and utterance: missing subset, transcript line or audio
file, an empty transcript, unreadable audio, another sample rate than ``--sample-rate``.
"""
import argparse
import csv
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence

import numpy as np
import sentencepiece as spm
import yaml
from tqdm import tqdm

if TYPE_CHECKING:  # torch and torchaudio are imported where features are computed: --help starts fast
    import torch

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("id", "audio", "n_frames", "tgt_text", "speaker")
CMVN_CHOICES = ("utterance", "global", "none")
#: fairseq's special symbols, as its speech recipes give them to sentencepiece
SPECIAL_IDS = {"unk": 3, "bos": 0, "eos": 2, "pad": 1}
SPECIAL_PIECES = {"<unk>", "<s>", "</s>", "<pad>"}


class PreparationError(ValueError):
    """The corpus cannot be prepared as it is (names the file and utterance)."""


@dataclass(frozen=True)
class Utterance:
    id: str
    speaker: str
    audio: str  #: path of the FLAC file
    text: str


# ------------------------------------------------------------------------------------------- corpus


def read_subset(root: str, subset: str, audio_ext: str = ".flac") -> List[Utterance]:
    """All utterances of ``ROOT/SUBSET``, from its ``*.trans.txt`` files, in sorted order."""
    subset_dir = os.path.join(root, subset)
    if not os.path.isdir(subset_dir):
        raise PreparationError(f"subset {subset!r} not found: {subset_dir} is not a directory")
    utterances: Dict[str, Utterance] = {}
    for folder, _, files in sorted(os.walk(subset_dir)):
        for name in sorted(f for f in files if f.endswith(".trans.txt")):
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    uid, _, text = line.strip().partition(" ")
                    text = " ".join(text.split())
                    where = f"{path}, line {line_no}"
                    if not text:
                        raise PreparationError(f"{where}: empty transcript for utterance {uid}")
                    if uid in utterances:
                        raise PreparationError(f"{where}: utterance {uid} listed twice in subset {subset}")
                    audio = os.path.join(folder, uid + audio_ext)
                    if not os.path.isfile(audio):
                        raise PreparationError(f"{where}: audio of utterance {uid} not found: {audio}")
                    utterances[uid] = Utterance(uid, uid.split("-")[0], audio, text)
    if not utterances:
        raise PreparationError(f"subset {subset!r} has no utterances (no *.trans.txt under {subset_dir})")
    return [utterances[k] for k in sorted(utterances)]


def _soundfile():
    """The ``soundfile`` module (libsndfile: FLAC, WAV, OGG), which fairseq's own audio code uses too."""
    try:
        import soundfile
    except ImportError as e:
        raise PreparationError("reading FLAC needs the soundfile package (pip install soundfile)") from e
    return soundfile


def load_audio(utt: Utterance, sample_rate: int) -> "torch.Tensor":
    """The mono waveform (1, samples) in [-1, 1]; the file must have ``sample_rate`` Hz."""
    soundfile = _soundfile()
    try:
        data, rate = soundfile.read(utt.audio, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError (a RuntimeError) or others for bad files
        raise PreparationError(f"cannot read audio of utterance {utt.id} ({utt.audio}): {e}") from e
    if rate != sample_rate:
        raise PreparationError(
            f"audio of utterance {utt.id} ({utt.audio}) has a sample rate of {rate} Hz, expected "
            f"{sample_rate} Hz (--sample-rate); resample the corpus first"
        )
    if data.shape[0] == 0:
        raise PreparationError(f"audio of utterance {utt.id} ({utt.audio}) is empty")
    import torch

    return torch.from_numpy(data.mean(axis=1)).unsqueeze(0)


def fbank_features(waveform: "torch.Tensor", sample_rate: int, num_mel_bins: int) -> np.ndarray:
    """Kaldi-compatible log-mel filter banks (frames, num_mel_bins) of a (1, samples) waveform in [-1, 1].

    Kaldi expects 16-bit sample values, so the waveform is scaled by 2**15 first (as fairseq does).
    """
    if waveform.size(-1) < int(0.025 * sample_rate):
        raise ValueError(f"{waveform.size(-1)} samples are shorter than one 25 ms analysis window")
    import torchaudio.compliance.kaldi as kaldi

    features = kaldi.fbank(waveform * 32768, num_mel_bins=num_mel_bins, sample_frequency=sample_rate)
    return features.numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------- features


def _save_npy(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _stored_frames(path: str, num_mel_bins: int) -> Optional[int]:
    """Frames of an existing, readable feature file of the right width; None if it must be (re)computed."""
    if not os.path.isfile(path):
        return None
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return None
    return array.shape[0] if array.ndim == 2 and array.shape[1] == num_mel_bins else None


def featurise(utterances: Sequence[Utterance], out_dir: str, subset: str, sample_rate: int,
              num_mel_bins: int) -> Dict[str, int]:
    """Write ``fbank{N}/SUBSET/ID.npy`` for each utterance not done yet; returns frames per id."""
    folder = os.path.join(out_dir, f"fbank{num_mel_bins}", subset)
    os.makedirs(folder, exist_ok=True)
    frames, done = {}, 0
    for utt in tqdm(utterances, desc=f"fbank {subset}", unit="utt", file=sys.stderr):
        path = os.path.join(folder, utt.id + ".npy")
        n = _stored_frames(path, num_mel_bins)
        if n is None:
            try:
                features = fbank_features(load_audio(utt, sample_rate), sample_rate, num_mel_bins)
            except ValueError as e:
                raise PreparationError(f"utterance {utt.id} ({utt.audio}): {e}") from e
            _save_npy(path, features)
            n = features.shape[0]
        else:
            done += 1
        frames[utt.id] = n
    logger.info("%s: %d utterances, %d featurised now, %d already done", subset, len(utterances),
                len(utterances) - done, done)
    return frames


def write_manifest(path: str, utterances: Sequence[Utterance], frames: Dict[str, int], audio_dir: str) -> None:
    """fairseq's speech_to_text TSV (``audio`` relative to the config's ``audio_root``)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for utt in utterances:
            writer.writerow([utt.id, f"{audio_dir}/{utt.id}.npy", frames[utt.id], utt.text.lower(), utt.speaker])
    os.replace(tmp, path)


def global_cmvn_stats(out_dir: str, subsets: Iterable[str], manifests: Dict[str, List[str]], num_mel_bins: int,
                      path: str) -> None:
    """Mean and standard deviation of every feature dimension over the given subsets' frames (``.npz``)."""
    total = np.zeros(num_mel_bins, dtype=np.float64)
    squares = np.zeros(num_mel_bins, dtype=np.float64)
    count = 0
    for subset in subsets:
        for uid in manifests[subset]:
            x = np.load(os.path.join(out_dir, f"fbank{num_mel_bins}", subset, uid + ".npy")).astype(np.float64)
            total += x.sum(0)
            squares += (x * x).sum(0)
            count += x.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 1e-10))
    np.savez(path, mean=mean.astype(np.float32), std=std.astype(np.float32))


# ------------------------------------------------------------------------------------- vocabulary


def train_sentencepiece(texts: Sequence[str], prefix: str, vocab_size: int, model_type: str = "unigram") -> None:
    """``PREFIX.model`` trained on ``texts`` with fairseq's special ids, and the fairseq dictionary ``PREFIX.txt``."""
    text_file = prefix + ".train.txt"
    with open(text_file, "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in texts)
    try:
        spm.SentencePieceTrainer.Train(
            input=text_file, model_prefix=prefix, model_type=model_type, vocab_size=vocab_size,
            character_coverage=1.0, num_threads=os.cpu_count() or 1,
            unk_id=SPECIAL_IDS["unk"], bos_id=SPECIAL_IDS["bos"], eos_id=SPECIAL_IDS["eos"],
            pad_id=SPECIAL_IDS["pad"], minloglevel=1,
        )
    except RuntimeError as e:
        raise PreparationError(f"sentencepiece could not build {vocab_size} units (--vocab-size): {e}") from e
    finally:
        os.remove(text_file)
    model = spm.SentencePieceProcessor(model_file=prefix + ".model")
    with open(prefix + ".txt", "w", encoding="utf-8") as f:
        for i in range(model.get_piece_size()):
            piece = model.id_to_piece(i)
            if piece not in SPECIAL_PIECES:
                f.write(f"{piece} 1\n")


def write_config(out_dir: str, spm_prefix: str, num_mel_bins: int, cmvn: str, cmvn_stats: Optional[str]) -> str:
    """``config.yaml`` of fairseq's speech_to_text data."""
    config = {
        "vocab_filename": os.path.basename(spm_prefix) + ".txt",
        "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": os.path.basename(spm_prefix) + ".model"},
        "input_channels": 1,
        "input_feat_per_channel": num_mel_bins,
        "audio_root": os.path.abspath(out_dir),
    }
    if cmvn == "utterance":
        config["feature_transforms"] = {"*": ["utterance_cmvn"]}
    elif cmvn == "global":
        config["feature_transforms"] = {"*": ["global_cmvn"]}
        config["global_cmvn"] = {"stats_npz_path": os.path.abspath(cmvn_stats)}
    path = os.path.join(out_dir, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


# ------------------------------------------------------------------------------------------ driver


def prepare(root: str, subsets: Sequence[str], out_dir: str, vocab_size: int = 5000, num_mel_bins: int = 80,
            sample_rate: int = 16000, cmvn: str = "utterance", vocab_type: str = "unigram",
            train_prefix: str = "train") -> str:
    """Prepare ``subsets`` of ``root`` into ``out_dir``; returns the path of ``config.yaml``.

    The vocabulary (and the global CMVN statistics) come from the subsets whose names start with
    ``train_prefix``; when there are none, those of an earlier run in ``out_dir`` are reused.
    """
    if cmvn not in CMVN_CHOICES:
        raise PreparationError(f"--cmvn must be one of {CMVN_CHOICES}, got {cmvn!r}")
    if not subsets:
        raise PreparationError("no subsets given (--subsets)")
    os.makedirs(out_dir, exist_ok=True)
    corpus = {s: read_subset(root, s) for s in subsets}  # every transcript and file checked before any work
    manifests = {}
    for subset, utterances in corpus.items():
        frames = featurise(utterances, out_dir, subset, sample_rate, num_mel_bins)
        write_manifest(os.path.join(out_dir, f"{subset}.tsv"), utterances, frames, f"fbank{num_mel_bins}/{subset}")
        manifests[subset] = [u.id for u in utterances]
    train = [s for s in subsets if s.startswith(train_prefix)]
    prefix = os.path.join(out_dir, f"spm_{vocab_type}{vocab_size}")
    stats = os.path.join(out_dir, "global_cmvn.npz")
    if train:
        train_sentencepiece([u.text.lower() for s in train for u in corpus[s]], prefix, vocab_size, vocab_type)
        if cmvn == "global":
            global_cmvn_stats(out_dir, train, manifests, num_mel_bins, stats)
    elif not os.path.isfile(prefix + ".model"):
        raise PreparationError(
            f"no {train_prefix}* subset given and no vocabulary in {out_dir} yet ({prefix}.model): "
            "prepare the training subsets first"
        )
    if cmvn == "global" and not os.path.isfile(stats):
        raise PreparationError(f"global CMVN needs statistics of a {train_prefix}* subset: {stats} not found")
    return write_config(out_dir, prefix, num_mel_bins, cmvn, stats)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fairseq-pdd-prepare-librispeech",
        description="LibriSpeech-layout FLAC + transcripts -> fairseq speech_to_text data "
                    "(fbank features, TSV manifests, sentencepiece vocabulary, config.yaml).",
    )
    p.add_argument("--root", required=True, help="corpus root holding the subset folders")
    p.add_argument("--subsets", required=True,
                   help="comma-separated subset folders, e.g. train-clean-100,dev-clean,test-clean")
    p.add_argument("--out-dir", required=True, help="output folder (re-running resumes)")
    p.add_argument("--vocab-size", type=int, default=5000, help="sentencepiece units (default: 5000)")
    p.add_argument("--vocab-type", choices=("unigram", "bpe", "char"), default="unigram")
    p.add_argument("--num-mel-bins", type=int, default=80, help="fbank dimension (default: 80)")
    p.add_argument("--sample-rate", type=int, default=16000, help="required sample rate of the audio (default: 16000)")
    p.add_argument("--cmvn", choices=CMVN_CHOICES, default="utterance",
                   help="feature normalisation in config.yaml (default: utterance)")
    p.add_argument("--train-prefix", default="train", help="subsets whose names start with it train the vocabulary")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    try:
        config = prepare(
            args.root, [s for s in args.subsets.split(",") if s], args.out_dir, args.vocab_size,
            args.num_mel_bins, args.sample_rate, args.cmvn, args.vocab_type, args.train_prefix,
        )
    except PreparationError as e:
        print(f"fairseq-pdd-prepare-librispeech: error: {e}", file=sys.stderr)
        return 1
    print(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
