from fairseq_pdd.criterions import bdistil, distillation  # noqa: F401  (registers the criteria)
