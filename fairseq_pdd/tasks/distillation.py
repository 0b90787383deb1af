"""``--task distillation``: fairseq's translation task with a frozen teacher ensemble."""
from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_pdd.tasks.teacher_mixin import TeacherEnsembleConfig, TeacherEnsembleMixin


@dataclass
class DistillationConfig(TranslationConfig, TeacherEnsembleConfig):
    pass


@register_task("distillation", dataclass=DistillationConfig)
class DistillationTask(TeacherEnsembleMixin, TranslationTask):
    """Translation whose train/valid samples carry the teachers' streamed statistics."""
