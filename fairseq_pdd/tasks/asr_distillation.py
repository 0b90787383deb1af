"""``--task asr_distillation``: fairseq's ``speech_to_text`` task with a frozen teacher ensemble.

The data are fairseq's speech_to_text format (see :mod:`fairseq_pdd.data.librispeech`); teachers are
any checkpoints trained on the same data (e.g. ``--task speech_to_text --arch pdd_vggtransformer_2
--criterion cross_entropy``), loaded weights-only and checked against the data's target dictionary
and feature dimension. Train and valid samples carry the teachers' streamed statistics, which the
ensemble-distillation criteria read exactly as in the MT ``distillation`` task.
"""
from dataclasses import dataclass

from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.tasks import register_task
from fairseq.tasks.speech_to_text import SpeechToTextTask

from fairseq_pdd.tasks.teacher_mixin import TeacherEnsembleConfig, TeacherEnsembleMixin


@dataclass
class AsrTeacherOptions(FairseqDataclass, TeacherEnsembleConfig):
    """The teacher options as command-line arguments of the (argparse-based) speech_to_text task."""


@register_task("asr_distillation")
class AsrDistillationTask(TeacherEnsembleMixin, SpeechToTextTask):
    """Speech recognition whose train/valid samples carry the teachers' streamed statistics."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        gen_parser_from_dataclass(parser, AsrTeacherOptions())
