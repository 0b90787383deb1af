"""The offline teacher cache: built by its CLI, trained from with no teacher loaded, refused when it
does not fit, and its top-k approximation against the full statistics on the toy teachers' outputs."""
import os
import pickle
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from cli_runner import assert_two_processes_train_like_one, run, train, valid_losses
from fairseq import options, tasks
from fairseq.criterions import CRITERION_DATACLASS_REGISTRY, CRITERION_REGISTRY

import fairseq_pdd
from fairseq_pdd.teachers import build_cache as cache_builder
from fairseq_pdd.teachers.cache_format import HEADER, TeacherCacheError, open_cache
from fairseq_pdd.teachers.ensemble import TeacherEnsemble, load_teacher
from fairseq_pdd.distill.topk_stats import compress, expand

fairseq_pdd.register()  # the plugin's tasks and criteria, and the weights-only allow-list

PD_END2 = "rkl_dirichlet_proxy_distillation"
CRITERIA = {
    "kd": "forward_kl_mean_distillation",
    "rkl": PD_END2,
    "fkl": "dirichlet_proxy_distillation",
    "nll": "sequence_distribution_distillation",
}
#: Unit roundoff of the storage dtypes.
ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11}


def make_task(data: str, *extra: str):
    """The ``distillation`` task as fairseq-train builds it from these options (in this process)."""
    parser = options.get_training_parser(default_task="distillation")
    args = options.parse_args_and_arch(parser, [data, "--task", "distillation", "--arch", "transformer", *extra])
    return tasks.setup_task(args)


def build_cache(toy_mt, cache_dir, *extra, expect_failure=False):
    return run(
        "python",
        ["-m", "fairseq_pdd.teachers.build_cache", toy_mt.data, "--ensemble-paths", ":".join(toy_mt.teachers),
         "--cache-dir", cache_dir, "--cpu", "--max-tokens", "2000", "--no-progress-bar", *extra],
        toy_mt.root,
        expect_failure,
    )


@dataclass
class Caches:
    full: str  #: k = V, float32: shard 0 of 2, then a resumed run without sharding
    top8: str  #: k = 8, float16 (the default dtype)
    after_first_shard: dict
    resumed_log: str
    num_classes: int


@pytest.fixture(scope="module")
def caches(toy_mt) -> Caches:
    root = os.path.join(toy_mt.root, "caches")
    full, top8 = os.path.join(root, "full"), os.path.join(root, "top8")
    num_classes = len(make_task(toy_mt.data).target_dictionary)
    settings = ["--gen-subset", "train,valid", "--topk", str(num_classes), "--cache-dtype", "float32",
                "--part-sentences", "700"]

    def sharded_then_resumed():
        build_cache(toy_mt, full, *settings, "--num-shards", "2", "--shard-id", "0")
        after_first = {name: sorted(os.listdir(os.path.join(full, name))) for name in os.listdir(full)}
        resumed = build_cache(toy_mt, full, *settings)
        return after_first, resumed.stdout + resumed.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:  # two subprocesses at a time
        job = pool.submit(sharded_then_resumed)
        build_cache(toy_mt, top8, "--gen-subset", "train,valid", "--topk", "8")
        return Caches(full, top8, *job.result(), num_classes)


def test_sharded_and_resumed_build(caches):
    """Shard 0 of 2 writes parts 1 and 3 of train (3 parts of 700 sentences) and all of valid (1 part),
    which it merges; a second run without sharding skips what is done, writes part 2, merges train
    and removes the parts."""
    first = caches.after_first_shard
    assert sorted(first) == [".train.parts", "valid"]
    assert first[".train.parts"] == ["part-000000.npz", "part-000002.npz"]
    for done in ("train: part 1/3 already done", "train: part 3/3 already done", "valid is already complete"):
        assert done in caches.resumed_log, done
    assert "part 2/3 already done" not in caches.resumed_log
    assert sorted(os.listdir(caches.full)) == ["train", "valid"]
    header = open_cache(os.path.join(caches.full, "train")).header
    assert (header["num_sentences"], header["k"], header["dtype"], header["num_models"]) == (
        2000, caches.num_classes, "float32", 2)
    assert set(header["arrays"]) == {"offsets", "target", "ids", "probs", "scalars", "log_probs"}


# --------------------------------------------------------------------------------------------------
# The cache holds the teachers' statistics, aligned to the sample ids
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_outputs(toy_mt):
    """Task, the whole valid set as one batch, the teachers' full statistics, two students' logits."""
    task = make_task(toy_mt.data)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    order = np.random.RandomState(0).permutation(len(dataset))  # ids in a shuffled order
    sample = dataset.collater([dataset[int(i)] for i in order])
    mask = sample["target"].ne(task.target_dictionary.pad())
    ensemble = TeacherEnsemble.load(toy_mt.teachers, task)
    stats = ensemble.statistics(sample, mask)
    untrained = load_teacher(os.path.join(toy_mt.root, "untrained", "checkpoint_last.pt"), task)
    with torch.no_grad():
        students = {
            "untrained": untrained(**sample["net_input"])[0][mask],
            "trained": ensemble.models[0](**sample["net_input"])[0][mask],  # a student near the optimum
        }
    return task, sample, stats, students


def test_cache_holds_the_teachers_statistics(caches, teacher_outputs):
    task, sample, stats, _ = teacher_outputs
    ids = sample["id"].numpy()
    full = open_cache(os.path.join(caches.full, "valid"))
    rows = full.rows(ids)
    target = sample["target"]
    assert np.array_equal(full.target(rows), target[target.ne(task.target_dictionary.pad())].numpy())
    dense = expand(full.topk(rows), caches.num_classes, log_probs=True)
    for name in ("mean_probs", "mean_log_probs", "entropy_of_expected", "expected_entropy", "cross_entropy"):
        torch.testing.assert_close(getattr(dense, name), getattr(stats, name), rtol=1e-5, atol=1e-5, msg=name)
    top8 = open_cache(os.path.join(caches.top8, "valid"))
    topk = top8.topk(top8.rows(ids))
    assert topk.probs.dtype == torch.float16 and topk.k == 8
    torch.testing.assert_close(topk.probs.float(), stats.mean_probs.gather(-1, topk.ids), rtol=1e-3, atol=1e-6)
    assert (topk.probs.float().min(-1).values >= stats.mean_probs.topk(9, -1).values[:, -1] - 1e-3).all()
    torch.testing.assert_close(topk.rest_mass + topk.probs.float().sum(-1), torch.ones(len(rows)))


# --------------------------------------------------------------------------------------------------
# Training from the cache through fairseq-train
# --------------------------------------------------------------------------------------------------
EPOCH_STATS = ("loss", "nll_loss", "ensemble_mkl", "ensemble_epkl", "ensemble_precision", "precision")


def distil(toy_mt, name, extra):
    proc = train(
        toy_mt.data, os.path.join(toy_mt.root, name), toy_mt.root,
        ["--task", "distillation", "--criterion", PD_END2, "--max-epoch", "2", "--seed", "3", *extra],
    )
    return proc.stdout + proc.stderr


def epoch_stats(log):
    """Per epoch and subset, the logged statistics of :data:`EPOCH_STATS`."""
    out = []
    for line in log.splitlines():
        if "| train | epoch" in line or "valid on 'valid' subset" in line:
            out.append({key: float(re.search(rf"\| {key} ([-\d.]+)", line).group(1)) for key in EPOCH_STATS})
    return out


SELF_DISTILLATION = ["--criterion", "gt_mixed_self_distillation", "--gt-weight", "0.5", "--max-epoch", "1"]


@pytest.fixture(scope="module")
def logs(toy_mt, caches):
    """The fairseq-train logs of the students of the tests below, trained two at a time: PD-EnD2 with the
    teachers online, from the full cache (the teachers given too: hashed, not loaded) and from the top-8
    cache alone; a self-distillation criterion online and from the full cache."""
    teachers = ["--ensemble-paths", ":".join(toy_mt.teachers)]
    runs = {"online": teachers, "cache_full": ["--teacher-cache", caches.full, *teachers],
            "cache_top8": ["--teacher-cache", caches.top8], "sd_online": [*teachers, *SELF_DISTILLATION],
            "sd_cache": ["--teacher-cache", caches.full, *SELF_DISTILLATION]}
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {name: pool.submit(distil, toy_mt, f"cache_run_{name}", extra) for name, extra in runs.items()}
        return {name: job.result() for name, job in jobs.items()}


def test_training_from_full_cache_equals_online_training(caches, logs):
    """k = V in float32: the same updates as with the teachers online (shuffled batches, 2 epochs)."""
    log, online_log = logs["cache_full"], logs["online"]
    assert "loaded 2 teachers" not in log and f"teacher cache {caches.full}" in log
    ours, reference = epoch_stats(log), epoch_stats(online_log)
    assert len(ours) == len(reference) == 4
    for a, b in zip(ours, reference):
        assert a == pytest.approx(b, rel=2e-3), (a, b)


def test_two_gloo_processes_train_from_the_cache_like_one(toy_mt, caches, tmp_path):
    """Rows are keyed by sample id, so DDP shards read the right ones: 2 processes (fairseq's own
    distributed code, gloo) train from the cache exactly like 1 process with --update-freq 2."""
    assert_two_processes_train_like_one(toy_mt.data, str(tmp_path),
                                        ["--task", "distillation", "--teacher-cache", caches.top8,
                                         "--criterion", PD_END2])


def test_training_from_top8_cache_without_teachers(caches, logs):
    log, online_log = logs["cache_top8"], logs["online"]
    assert "loaded 2 teachers" not in log and f"teacher cache {caches.top8}" in log
    losses, reference = valid_losses(log), valid_losses(online_log)
    assert len(losses) == 2 and losses[1] < losses[0]
    assert losses[1] == pytest.approx(reference[1], rel=0.03)
    ours, online = epoch_stats(log)[-1], epoch_stats(online_log)[-1]
    for key in ("ensemble_mkl", "ensemble_epkl", "ensemble_precision"):  # stored exactly, not top-k
        assert ours[key] == pytest.approx(online[key], rel=2e-3), key


def test_self_distillation_from_full_cache_equals_online_training(logs):
    """A self-distillation criterion reads the log of the rebuilt mean: k = V gives the online updates."""
    online, cached = logs["sd_online"], logs["sd_cache"]
    assert "loaded 2 teachers" not in cached

    def stats(log):
        return [{key: float(re.search(rf"\| {key} ([-\d.]+)", line).group(1)) for key in ("loss", "nll_loss",
                                                                                       "distill_kl")}
                for line in log.splitlines() if "| train | epoch" in line or "valid on 'valid' subset" in line]

    ours, reference = stats(cached), stats(online)
    assert len(ours) == len(reference) == 2
    for a, b in zip(ours, reference):
        assert a == pytest.approx(b, rel=2e-3), (a, b)


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------
def test_refuses_cache_of_other_teachers(toy_mt, caches):
    """--ensemble-paths with --teacher-cache: the checkpoints are hashed, not loaded, and must match."""
    other = os.path.join(toy_mt.root, "untrained", "checkpoint_last.pt")
    task = make_task(toy_mt.data, "--teacher-cache", caches.top8, "--ensemble-paths", f"{toy_mt.teachers[0]}:{other}")
    with pytest.raises(TeacherCacheError, match=f"{os.path.join(caches.top8, 'valid')} was built from other teachers"):
        task.load_dataset("valid")


def copy_data(toy_mt, tmp_path, name):
    dest = str(tmp_path / name)
    shutil.copytree(toy_mt.data, dest)
    return dest


def test_refuses_other_dictionary(toy_mt, caches, tmp_path):
    data = copy_data(toy_mt, tmp_path, "other_dict")
    for lang in ("src", "tgt"):
        with open(os.path.join(data, f"dict.{lang}.txt"), "a") as f:
            f.write("zzz 1\n")
    with pytest.raises(TeacherCacheError, match="built with another target dictionary"):
        make_task(data, "--teacher-cache", caches.top8).load_dataset("valid")


def test_refuses_other_dataset(toy_mt, caches, tmp_path):
    data = copy_data(toy_mt, tmp_path, "other_data")
    for split, source in (("valid", "test"), ("train", "valid")):
        for ext in ("src", "tgt"):
            for kind in ("bin", "idx"):
                shutil.copy(os.path.join(toy_mt.data, f"{source}.src-tgt.{ext}.{kind}"),
                            os.path.join(data, f"{split}.src-tgt.{ext}.{kind}"))
    task = make_task(data, "--teacher-cache", caches.top8)
    with pytest.raises(TeacherCacheError, match="other target lengths than in the data"):
        task.load_dataset("valid")  # the test sentences: as many, other lengths
    with pytest.raises(TeacherCacheError, match="holds 2000 sentences but subset 'train' of the data has 100"):
        task.load_dataset("train")


def test_refuses_other_target_tokens_at_the_batch(toy_mt, caches):
    """Same lengths, other tokens: caught by the collater before any step uses the batch."""
    task = make_task(toy_mt.data, "--teacher-cache", caches.top8)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    target = np.array(dataset.cache.arrays["target"])
    rows = dataset.cache.rows([7])
    target[rows[1]] += 1
    dataset.cache.arrays["target"] = target
    assert dataset.collater([dataset[i] for i in range(5)])["teacher_topk"].k == 8
    with pytest.raises(TeacherCacheError, match="target tokens of sentence id 7 of subset 'valid' differ"):
        dataset.collater([dataset[i] for i in (3, 7, 9)])


def test_cache_pickles_without_its_arrays(caches):
    """Spawned data-loader workers receive the opened cache: small pickle, arrays mapped again."""
    cache = open_cache(os.path.join(caches.top8, "train"))
    data = pickle.dumps(cache)
    assert len(data) < 100_000 < cache.arrays["ids"].nbytes
    copy = pickle.loads(data)
    rows = copy.rows([5, 1999, 0])
    assert isinstance(copy.arrays["probs"], np.memmap)
    assert torch.equal(copy.topk(rows).probs, cache.topk(rows).probs)


@pytest.fixture
def cache_copy(caches, tmp_path):
    dest = str(tmp_path / "cache")
    shutil.copytree(caches.top8, dest)
    return dest


def test_refuses_truncated_and_corrupt_arrays(toy_mt, cache_copy):
    probs = os.path.join(cache_copy, "valid", "probs.npy")
    size = os.path.getsize(probs)
    with open(probs, "r+b") as f:
        f.seek(size - 100)
        byte = f.read(1)
        f.seek(size - 100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(TeacherCacheError, match="probs.npy: sha256 checksum mismatch"):
        make_task(toy_mt.data, "--teacher-cache", cache_copy).load_dataset("valid")
    open_cache(os.path.join(cache_copy, "valid"), verify_checksums=False)  # sizes alone still agree
    os.truncate(probs, size - 10)
    with pytest.raises(TeacherCacheError, match=f"probs.npy has {size - 10} bytes, its header says {size}: truncated"):
        make_task(toy_mt.data, "--teacher-cache", cache_copy, "--teacher-cache-skip-checksums").load_dataset("valid")


def test_refuses_incomplete_or_foreign_format(toy_mt, cache_copy):
    valid = os.path.join(cache_copy, "valid")
    header = os.path.join(valid, HEADER)
    with open(header) as f:
        text = f.read()
    with open(header, "w") as f:
        f.write(text.replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(TeacherCacheError, match="version 99; this fairseq_pdd reads"):
        open_cache(valid)
    os.remove(header)
    with pytest.raises(TeacherCacheError, match="has no header.json: not a complete cache"):
        open_cache(valid)
    os.rename(valid, os.path.join(cache_copy, ".valid.tmp-123"))  # as a crashed build leaves it
    with pytest.raises(TeacherCacheError, match="no teacher cache for subset 'valid'"):
        make_task(toy_mt.data, "--teacher-cache", cache_copy).load_dataset("valid")


def test_builder_refuses_other_settings_in_an_existing_cache(toy_mt, caches):
    argv = [toy_mt.data, "--ensemble-paths", ":".join(toy_mt.teachers), "--cache-dir", caches.top8,
            "--gen-subset", "valid", "--topk", "4", "--cpu"]
    with pytest.raises(SystemExit, match=r"valid exists and was built with other settings \(cache vs this run: k: 8 vs 4\)"):
        cache_builder.cli_main(argv)


# --------------------------------------------------------------------------------------------------
# The approximation, against the full statistics, on the toy teachers' outputs
# --------------------------------------------------------------------------------------------------
def loss_and_gradient(task, name, logits, stats, **options):
    config = CRITERION_DATACLASS_REGISTRY[CRITERIA[name]](sentence_avg=False, **options)
    criterion = CRITERION_REGISTRY[CRITERIA[name]](task, config)
    z = logits.clone().requires_grad_()
    loss, _ = criterion.token_loss(z, stats)
    loss.sum().backward()
    return loss.detach(), z.grad


def approximation_errors(teacher_outputs, ks, dtype, names=tuple(CRITERIA), **options):
    """{(student, criterion): [(k, relative loss error, relative gradient error, per-token L1 excess)]} of the
    criteria ``names`` with config ``options``."""
    task, _, stats, students = teacher_outputs
    errors = {}
    for student, logits in students.items():
        for name in names:
            loss0, grad0 = loss_and_gradient(task, name, logits, stats, **options)
            for k in ks:
                topk = compress(stats, k, dtype)
                expanded = expand(topk, stats.num_classes, log_probs=True)
                loss, grad = loss_and_gradient(task, name, logits, expanded, **options)
                bound = 2 * topk.rest_mass + 2 * ROUNDOFF[dtype]
                errors.setdefault((student, name), []).append((
                    k,
                    float((loss - loss0).abs().sum() / loss0.abs().sum()),
                    float((grad - grad0).abs().sum() / grad0.abs().sum()),
                    float(((grad - grad0).abs().sum(-1) - bound).max()),
                ))
    return errors


def test_top_k_cache_is_exact_when_k_is_the_vocabulary(teacher_outputs):
    for key, [(_, loss_error, grad_error, _)] in approximation_errors(
        teacher_outputs, [teacher_outputs[2].num_classes], torch.float32
    ).items():
        assert loss_error < 1e-6 and grad_error < 1e-6, (key, loss_error, grad_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_approximation_error_against_k(teacher_outputs, dtype):
    """Errors shrink as k grows for all four losses (default options), and for PD-EnD2 with model offset 1; for
    KD and PD-EnD2 with offset >= 1 the per-token L1 gradient error stays within 2 * remaining mass + 2 u (u:
    the storage dtype's unit roundoff). PD-EnD2's default offset 0 has no such bound (docs/teacher_cache.md)."""
    ks = [1, 2, 4, 8, 16, 32, 64]
    errors = approximation_errors(teacher_outputs, ks, dtype)
    offset1 = approximation_errors(teacher_outputs, ks, dtype, names=("rkl",), model_offset=1.0)
    for (student, name), rows in list(errors.items()) + [((s, "rkl offset 1"), r) for (s, _), r in offset1.items()]:
        loss_errors, grad_errors = [r[1] for r in rows], [r[2] for r in rows]
        assert loss_errors == sorted(loss_errors, reverse=True), (student, name, loss_errors)
        assert grad_errors == sorted(grad_errors, reverse=True), (student, name, grad_errors)
        assert grad_errors[ks.index(16)] < 0.1, (student, name, grad_errors)
        if name in ("kd", "rkl offset 1"):
            assert max(r[3] for r in rows) <= 1e-6, (student, name, rows)


def test_dirichlet_nll_needs_the_cached_log_probabilities(teacher_outputs):
    stats = teacher_outputs[2]
    topk = compress(stats, 8, log_probs=False)
    expand(topk, stats.num_classes)  # fine for the criteria that read only the mean
    with pytest.raises(ValueError, match="EnD2's Dirichlet NLL cannot be trained from them"):
        expand(topk, stats.num_classes, log_probs=True)
