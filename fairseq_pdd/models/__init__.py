from fairseq_pdd.models import vggtransformer  # noqa: F401  (registers pdd_vggtransformer and its archs)
