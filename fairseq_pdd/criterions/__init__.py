from fairseq_pdd.criterions import distillation, self_distillation  # noqa: F401  (registers the criteria)
