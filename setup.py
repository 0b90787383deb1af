from setuptools import find_packages, setup

# fairseq: `ve-fairseq` is a wheel of fairseq main that imports on Python 3.11/3.12 (the PyPI
# `fairseq==0.12.2` sdist does not). To keep a fairseq you built yourself, install it first and then
# this package with `pip install --no-deps -e .` (see the README).
setup(
    name="fairseq_pdd",
    version="0.1.0",
    description="Ensemble distribution distillation (PD-EnD2 and baselines) for fairseq sequence models",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_pdd", "fairseq_pdd.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "torchaudio",
        "ve-fairseq==0.12.3",
        "sacrebleu>=2.0",
        "sentencepiece",
        "numpy",
        "orjson",  # the uncertainty JSONL: float32 numbers without Python floats, ~7x faster than json
        "scikit-learn",
        "matplotlib",
        "soundfile",  # FLAC input of the speech preparation (fairseq's own audio reader)
        "editdistance",  # fairseq-generate --scoring wer
        "tensorboardX",  # fairseq-train --tensorboard-logdir (fairseq falls back to it without tensorboard)
    ],
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": [
            "fairseq-pdd-user-dir = fairseq_pdd.cli:print_user_dir",
            "fairseq-pdd-toy-data = fairseq_pdd.data.toy_mt:main",
            "fairseq-pdd-evaluate = fairseq_pdd.evaluation.cli:main",
            "fairseq-pdd-generate = fairseq_pdd.decoding.generate:cli_main",
            "fairseq-pdd-cache = fairseq_pdd.teachers.build_cache:cli_main",
            "fairseq-pdd-estimate-gt-weight = fairseq_pdd.self_distillation.estimate_gt_weight:main",
            "fairseq-pdd-chain-report = fairseq_pdd.self_distillation.chain_report:main",
            "fairseq-pdd-prepare-librispeech = fairseq_pdd.data.librispeech:main",
            "fairseq-pdd-asr-toy-data = fairseq_pdd.data.toy_asr:main",
            "fairseq-pdd-bdistil = fairseq_pdd.bdistil.cli:main",
        ]
    },
)
