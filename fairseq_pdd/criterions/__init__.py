from fairseq_pdd.criterions import bdistil, distillation, self_distillation  # noqa: F401  (registers the criteria)
