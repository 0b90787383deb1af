"""``python -m fairseq_pdd.teachers.build_cache`` (``fairseq-pdd-cache``): run the teachers once, store top-k.

Runs the ``--ensemble-paths`` teachers over every sentence of each ``--gen-subset`` (comma-separated)
of a ``--task distillation`` data directory, batched by ``--max-tokens``/``--batch-size`` with
fairseq's own dataset, collater and batching, and writes ``CACHE_DIR/{subset}/`` in the format of
:mod:`fairseq_pdd.teachers.cache_format` (what is stored and the approximation: :mod:`fairseq_pdd.distill.topk_stats`).
``fairseq-train --task distillation --teacher-cache CACHE_DIR`` then trains with no teacher loaded.

Resumable and shardable: the subset is cut into parts of ``--part-sentences`` consecutive sentence
ids; part j is written atomically to ``CACHE_DIR/.{subset}.parts/part-{j}.npz`` and skipped when a
run finds it there. With ``--num-shards N --shard-id i`` a worker computes the parts j = i mod N
(e.g. one worker per GPU); the worker that finds every part present merges them into the final
arrays (written under a temporary name, checksummed, renamed) and removes the parts. Running again
without sharding merges what a sharded run left. Parts are stamped with the teachers' hashes, the
dictionaries, k and the dtype, and a run with other settings refuses to mix them.

Every sentence must be scored: a sentence longer than the teachers' maximum positions stops the run
(a cache with gaps could not serve every sample id).
"""
import json
import logging
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
from fairseq import options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import progress_bar

import fairseq_pdd
from fairseq_pdd.teachers.cache_format import (
    TeacherCacheError,
    open_cache,
    row_indices,
    scalar_columns,
    symbols_sha256,
    teacher_fingerprint,
    topk_to_arrays,
    write_cache,
)
from fairseq_pdd.teachers.checkpoints import CheckpointError
from fairseq_pdd.tasks.teacher_mixin import TeacherEnsembleMixin
from fairseq_pdd.teachers.ensemble import TeacherEnsemble, TeacherError, split_paths
from fairseq_pdd.distill.topk_stats import STORAGE_DTYPES, compress

# fairseq's --user-dir import finds this package already imported (by this module), so register here.
fairseq_pdd.register()

logger = logging.getLogger("fairseq_pdd.teachers.build_cache")

#: Header fields that must agree between parts, and between a finished cache and a new run.
FINGERPRINT_KEYS = ("subset", "num_sentences", "num_classes", "k", "dtype", "log_probs", "teacher_sha256", "dictionaries", "part_sentences")


def add_cache_args(parser) -> None:
    group = parser.add_argument_group("teacher cache (fairseq_pdd)")
    group.add_argument("--cache-dir", required=True, metavar="DIR", help="writes DIR/{subset}/ per --gen-subset")
    group.add_argument("--topk", type=int, default=64, help="classes of the ensemble mean kept per token")
    group.add_argument("--cache-dtype", choices=tuple(STORAGE_DTYPES), default="float16",
                       help="storage of the top-k probabilities and log-probabilities")
    group.add_argument("--no-log-probs", action="store_true",
                       help="omit the members' mean log-probabilities (EnD2's Dirichlet NLL then cannot use the cache)")
    group.add_argument("--part-sentences", type=int, default=10000,
                       help="sentences per resumable part (the unit of work of a shard)")


def fingerprint(header: dict) -> dict:
    return {key: header[key] for key in FINGERPRINT_KEYS}


def differences(theirs: dict, ours: dict) -> str:
    """``key: theirs vs ours`` for each fingerprint field that differs."""
    theirs, ours = fingerprint(theirs), fingerprint(ours)
    return "; ".join(f"{key}: {theirs[key]} vs {ours[key]}" for key in FINGERPRINT_KEYS if theirs[key] != ours[key])


class CacheBuilder:
    """Builds the cache of one subset for a task, its teachers and the run's options."""

    def __init__(self, cfg, args, task, teachers: TeacherEnsemble, teacher_info, subset: str):
        self.cfg, self.args, self.task, self.teachers, self.subset = cfg, args, task, teachers, subset
        self.dataset = task.dataset(subset)
        self.out = os.path.join(args.cache_dir, subset)
        self.work = os.path.join(args.cache_dir, f".{subset}.parts")
        self.dtype = STORAGE_DTYPES[args.cache_dtype]
        self.log_probs = not args.no_log_probs
        src = getattr(task, "source_dictionary", None)
        dictionaries = {"target": symbols_sha256(task.target_dictionary.symbols)}
        if src is not None:
            dictionaries["source"] = symbols_sha256(src.symbols)
        self.header = {
            "subset": subset,
            "num_sentences": len(self.dataset),
            "num_classes": len(task.target_dictionary),
            "k": args.topk,
            "dtype": args.cache_dtype,
            "log_probs": self.log_probs,
            "teacher_sha256": [t["sha256"] for t in teacher_info],
            "dictionaries": dictionaries,
            "part_sentences": args.part_sentences,
            "teachers": teacher_info,
            "num_models": len(teacher_info),
            "teacher_dtype": str(teachers.dtype).replace("torch.", ""),
            "scalar_columns": scalar_columns(self.log_probs),
        }
        self.num_parts = max(1, math.ceil(len(self.dataset) / args.part_sentences))

    # -- parts -----------------------------------------------------------------------------------
    def part_path(self, j: int) -> str:
        return os.path.join(self.work, f"part-{j:06d}.npz")

    def part_range(self, j: int):
        start = j * self.args.part_sentences
        return start, min(len(self.dataset), start + self.args.part_sentences)

    def check_part(self, j: int) -> None:
        with np.load(self.part_path(j)) as part:
            stamp = json.loads(str(part["fingerprint"]))
        if stamp != fingerprint(self.header):
            raise TeacherCacheError(
                f"{self.part_path(j)} was written with other settings than this run "
                f"({differences(stamp, self.header)}): remove {self.work} to start over"
            )

    def check_sizes(self) -> None:
        models = self.teachers.models
        max_positions = utils.resolve_max_positions(self.task.max_positions(), *[m.max_positions() for m in models])
        _, ignored = self.dataset.filter_indices_by_size(np.arange(len(self.dataset)), max_positions)
        if len(ignored):
            raise TeacherCacheError(
                f"{len(ignored)} sentences of subset {self.subset!r} exceed the teachers' maximum "
                f"positions {max_positions} (first ids: {list(ignored[:10])}); every sentence must be cached"
            )

    def batches(self, start: int, end: int):
        indices = np.arange(start, end, dtype=np.int64)
        try:
            sizes = self.dataset.num_tokens_vec(indices)
        except NotImplementedError:
            sizes = np.array([self.dataset.num_tokens(i) for i in indices])
        indices = indices[np.argsort(sizes, kind="stable")]
        max_tokens, max_sentences = self.cfg.dataset.max_tokens, self.cfg.dataset.batch_size
        if max_tokens is None and max_sentences is None:
            max_tokens = 4096
        return self.dataset.batch_by_size(indices, max_tokens=max_tokens, max_sentences=max_sentences)

    @torch.inference_mode()
    def compute_part(self, j: int) -> dict:
        """The arrays of part j (its sentences in id order) and their ``lengths``."""
        start, end = self.part_range(j)
        pad = self.task.target_dictionary.pad()
        use_cuda = torch.cuda.is_available() and not self.cfg.common.cpu
        lengths = np.zeros(end - start, dtype=np.int64)
        outputs = []
        batches = progress_bar.progress_bar(
            self.batches(start, end),
            log_format=self.cfg.common.log_format,
            log_interval=self.cfg.common.log_interval,
            prefix=f"{self.subset} part {j + 1}/{self.num_parts}",
            default_log_format="tqdm" if not self.cfg.common.no_progress_bar else "simple",
        )
        for batch_ids in batches:
            sample = self.dataset.collater([self.dataset[int(i)] for i in batch_ids])
            if use_cuda:
                sample = utils.move_to_cuda(sample)
            mask = sample["target"].ne(pad)
            stats = self.teachers.statistics(sample, mask)
            topk = compress(stats, self.args.topk, self.dtype, self.log_probs)
            local = sample["id"].cpu().numpy() - start
            lengths[local] = mask.sum(1).cpu().numpy()
            outputs.append((local, topk_to_arrays(topk, sample["target"][mask])))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        part = {
            name: np.empty((offsets[-1],) + value.shape[1:], dtype=value.dtype)
            for name, value in outputs[0][1].items()
        }
        for local, arrays in outputs:
            rows = row_indices(offsets, local)
            for name, value in arrays.items():
                part[name][rows] = value
        return dict(part, lengths=lengths)

    def write_part(self, j: int, part: dict) -> None:
        path = self.part_path(j)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.array(json.dumps(fingerprint(self.header))), **part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- merge -----------------------------------------------------------------------------------
    def merge(self) -> None:
        """Merge all parts into ``self.out`` (atomic); a concurrent merger that wins is accepted."""
        lengths, rest = [], []
        for j in range(self.num_parts):
            self.check_part(j)
            with np.load(self.part_path(j)) as part:
                lengths.append(part["lengths"])
                rest.append(part["scalars"][:, 0])  # the remaining mass
        lengths, rest = np.concatenate(lengths), np.concatenate(rest)

        def chunks():
            for j in range(self.num_parts):
                with np.load(self.part_path(j)) as part:
                    yield {name: part[name] for name in part.files if name not in ("lengths", "fingerprint")}

        header = dict(
            self.header,
            num_tokens=int(lengths.sum()),
            rest_mass={"mean": float(rest.mean()), "max": float(rest.max())},
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        try:
            write_cache(self.out, header, lengths, chunks())
        except FileExistsError:
            logger.info("%s was completed by another worker", self.out)
            return
        shutil.rmtree(self.work, ignore_errors=True)
        logger.info(
            "wrote %s: %d sentences, %d tokens, k=%d, remaining mass mean %.4g max %.4g",
            self.out, len(lengths), header["num_tokens"], self.args.topk,
            header["rest_mass"]["mean"], header["rest_mass"]["max"],
        )

    def run(self, shard_id: int, num_shards: int) -> None:
        if os.path.isdir(self.out):
            existing = open_cache(self.out, verify_checksums=False).header
            if fingerprint(existing) != fingerprint(self.header):
                raise TeacherCacheError(
                    f"{self.out} exists and was built with other settings (cache vs this run: "
                    f"{differences(existing, self.header)}): remove it to rebuild"
                )
            logger.info("%s is already complete", self.out)
            return
        if len(self.dataset) == 0:
            raise TeacherCacheError(f"subset {self.subset!r} has no sentences")
        self.check_sizes()
        os.makedirs(self.work, exist_ok=True)
        for j in range(shard_id, self.num_parts, num_shards):
            if os.path.isfile(self.part_path(j)):
                self.check_part(j)
                logger.info("%s: part %d/%d already done", self.subset, j + 1, self.num_parts)
                continue
            self.write_part(j, self.compute_part(j))
        missing = [j for j in range(self.num_parts) if not os.path.isfile(self.part_path(j))]
        if missing:
            logger.info("%s: %d parts still to do by other shards; the last worker merges", self.subset, len(missing))
            return
        self.merge()


def main(args) -> None:
    cfg = convert_namespace_to_omegaconf(args)
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    if not isinstance(task, TeacherEnsembleMixin):
        raise TeacherCacheError(f"--task {cfg.task._name} has no teachers: use --task distillation")
    if getattr(cfg.task, "teacher_cache", None):
        raise TeacherCacheError("--teacher-cache is for training from a cache; pass --cache-dir to build one")
    if cfg.task.init_temp != 1.0:
        raise TeacherCacheError(
            f"--init-temp {cfg.task.init_temp}: a cache stores the teachers' T = 1 statistics, and annealing "
            "needs the teachers online (train with --ensemble-paths and no --teacher-cache)"
        )
    if not 0 <= cfg.dataset.shard_id < cfg.dataset.num_shards:
        raise TeacherCacheError(f"--shard-id {cfg.dataset.shard_id} not in [0, --num-shards {cfg.dataset.num_shards})")
    if args.part_sentences < 1:
        raise TeacherCacheError("--part-sentences must be >= 1")
    paths = split_paths(cfg.task.ensemble_paths)
    teacher_info = teacher_fingerprint(paths)
    dtype = torch.float16 if cfg.common.fp16 else task.teacher_dtype()
    teachers = TeacherEnsemble.load(paths, task, dtype)
    if torch.cuda.is_available() and not cfg.common.cpu:
        teachers.to(torch.device("cuda"))
    if not 1 <= args.topk <= len(task.target_dictionary):
        raise TeacherCacheError(f"--topk {args.topk} must be in [1, {len(task.target_dictionary)}] (the target vocabulary)")
    os.makedirs(args.cache_dir, exist_ok=True)
    for subset in cfg.dataset.gen_subset.split(","):
        task.load_dataset(subset, combine=subset == cfg.dataset.train_subset)
        builder = CacheBuilder(cfg, args, task, teachers, teacher_info, subset)
        builder.run(cfg.dataset.shard_id, cfg.dataset.num_shards)


def cli_main(argv=None) -> None:
    parser = options.get_parser("Teacher cache", default_task="distillation")
    options.add_dataset_args(parser, gen=True)
    add_cache_args(parser)
    args = options.parse_args_and_arch(parser, input_args=argv)
    try:
        main(args)
    except (TeacherCacheError, TeacherError, CheckpointError) as e:
        sys.exit(f"fairseq-pdd-cache: error: {e}")


if __name__ == "__main__":
    cli_main()
