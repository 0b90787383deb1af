"""A fairseq dataset wrapper that adds the teacher cache's rows to every batch (fairseq glue).

The cache is keyed by fairseq's sample id (the dataset index) and target position, so it follows
whatever order, batching, epoch or DDP shard the batch iterator produces. The collater (run in the
data-loader workers) gathers the batch's rows from the memory-mapped arrays, checks that the cached
target tokens equal the batch's non-padding target tokens (row-major, the order of
``sample["ensemble_stats"]``), and stores the compressed statistics as
``sample["teacher_topk"]``: a :class:`fairseq_pdd.distill.topk_stats.TopKStatistics`, a plain object that
fairseq's ``move_to_cuda``/``apply_half`` leave alone, so its float32 entropies never become half.
"""
import os
from typing import Optional, Sequence

import numpy as np
from fairseq.data import BaseWrapperDataset

from fairseq_pdd.teachers.cache_format import TeacherCache, TeacherCacheError, check_compatible, open_cache

TOPK_KEY = "teacher_topk"


class TeacherCacheDataset(BaseWrapperDataset):
    def __init__(self, dataset, cache: TeacherCache, pad: int, subset: str):
        super().__init__(dataset)
        self.cache, self.pad, self.subset = cache, pad, subset

    def collater(self, samples):
        batch = super().collater(samples)
        if not batch:
            return batch
        ids = batch["id"].numpy()
        rows = self.cache.rows(ids)
        target = batch["target"]
        ours = target[target.ne(self.pad)].numpy()
        cached = self.cache.target(rows)
        if len(ours) != len(cached) or not np.array_equal(ours, cached):
            self.raise_mismatch(ids, target)
        batch[TOPK_KEY] = self.cache.topk(rows)
        return batch

    def raise_mismatch(self, ids: np.ndarray, target) -> None:
        for sentence, row in zip(ids, target):
            ours = row[row.ne(self.pad)].numpy()
            cached = self.cache.target(self.cache.rows([sentence]))
            if len(ours) != len(cached) or not np.array_equal(ours, cached):
                raise TeacherCacheError(
                    f"teacher cache {self.cache.directory}: the target tokens of sentence id {sentence} "
                    f"of subset {self.subset!r} differ from the cached ones ({len(ours)} vs {len(cached)} "
                    "tokens): the cache was built from other data"
                )


def wrap(
    dataset,
    cache_dir: str,
    subset: str,
    task,
    teachers: Sequence[dict] = (),
    verify_checksums: bool = True,
    cache: Optional[TeacherCache] = None,
) -> TeacherCacheDataset:
    """Open ``cache_dir/subset`` (or reuse ``cache``), check it against ``task``'s data, wrap ``dataset``."""
    if cache is None:
        directory = os.path.join(cache_dir, subset)
        if not os.path.isdir(directory):
            raise TeacherCacheError(
                f"no teacher cache for subset {subset!r} in {cache_dir}: build it with "
                f"python -m fairseq_pdd.teachers.build_cache DATA --gen-subset {subset} --cache-dir {cache_dir} ..."
            )
        cache = open_cache(directory, verify_checksums)
    source = getattr(task, "source_dictionary", None)
    check_compatible(
        cache,
        subset,
        None if source is None else source.symbols,
        task.target_dictionary.symbols,
        len(dataset),
        getattr(dataset, "tgt_sizes", None),
        teachers,
    )
    return TeacherCacheDataset(dataset, cache, task.target_dictionary.pad(), subset)
