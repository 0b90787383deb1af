from fairseq_pdd.models import bdistil  # noqa: F401  (registers the bdistil_* architectures)
