from fairseq_pdd.models import bdistil, vggtransformer  # noqa: F401  (registers the bdistil_* and pdd_vggtransformer archs)
