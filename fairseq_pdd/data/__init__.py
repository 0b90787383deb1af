"""Data preparation and synthetic corpora (no fairseq import).

* :mod:`.librispeech`  LibriSpeech layout -> fbank80 + TSV manifests + sentencepiece (``speech_to_text``);
* :mod:`.mt_text`      MT text tools: joint sentencepiece, encoding, cleaning, distillation pairs;
* :mod:`.toy_mt`       the synthetic translation corpus of the demo and tests (``fairseq-pdd-toy-data``);
* :mod:`.toy_asr`      the synthetic speech corpus in LibriSpeech's layout (``fairseq-pdd-asr-toy-data``).
"""
