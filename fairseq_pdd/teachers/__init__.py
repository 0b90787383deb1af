"""The frozen teachers: safe checkpoint loading, the ensemble, and the offline teacher cache.

* :mod:`.checkpoints`    ``torch.load(weights_only=True)`` with the allow-list fairseq checkpoints need;
* :mod:`.ensemble`       loading teachers, dictionary / feature checks, streamed statistics per batch;
* :mod:`.cache_format`   the cache on disk: memory-mapped arrays, JSON header, validation (no fairseq);
* :mod:`.cache_dataset`  the fairseq dataset wrapper that adds the cache's rows to every batch;
* :mod:`.build_cache`    ``fairseq-pdd-cache``: run the teachers once and write the cache.
"""
