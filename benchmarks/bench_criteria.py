#!/usr/bin/env python
"""Time and peak memory of one training step of each distillation criterion, against cross-entropy.

One run measures, for the same fairseq Transformer student and the same batch:

* ``ce``: plain cross-entropy training (log_softmax + NLL over the non-pad positions), the baseline;
* ``rkl``, ``fkl``, ``nll``, ``kd``: the plugin's four criteria (PD-EnD2, forward KL to the proxy,
  EnD2 Dirichlet NLL, KD to the ensemble mean) exactly as training runs them: the teachers go
  through :class:`fairseq_pdd.teachers.ensemble.TeacherEnsemble` (streamed ``EnsembleAccumulator``), then
  the registered fairseq criterion's ``forward`` (fused float32 loss), then ``backward``;
* ``rkl_materialized``: the "authors' style" PD-EnD2, all teachers' probabilities stacked in a
  B x T x M x V float64 tensor, pbar/MKL from it, and ``KL(Dir(alpha) || Dir(B pbar + 1)) / B`` in
  float64 with plain autograd through lgamma/digamma;
* ``rkl_cache``: PD-EnD2 trained from the offline teacher cache, no teacher loaded: the batch's
  top-k rows (``--topk``, ``--cache-dtype``) of a real cache written by
  :func:`fairseq_pdd.teachers.cache_format.write_cache` from the max(M) teachers are moved to the device,
  expanded to dense statistics (:func:`fairseq_pdd.distill.topk_stats.expand`, as the ``distillation``
  task does) and fed to the same criterion. Reading the rows from the memory-mapped arrays happens
  in fairseq's data-loader workers during training; it is timed separately (``host_load_time_s``).

The student, the teachers and the batch are built once; all (method, M) runs share them (a run
with M members uses the first M teachers). A "step" is teacher forward passes + student forward +
loss + backward (no optimizer update); "loss only" is the same code with the networks replaced by
their cached outputs (teacher logits in, gradient on the student logits out). Times are medians
over ``--repeats`` rounds that visit every run in turn (so load changes hit all runs alike), after
``--warmup`` rounds. Peak memory is the step's high-water mark above what was allocated before it
(weights, gradients, the batch): ``torch.cuda.max_memory_allocated`` on CUDA, the running sum of
torch's CPU allocation events (``torch.profiler``, ``profile_memory=True``) on CPU. The report
gives tokens/s (non-pad target tokens per step time) and checks the teacher cache's three targets
(:data:`TARGETS`): rkl_cache >= 0.85x CE tokens/s, online peak growth from the smallest to the largest
M no more than the extra teachers' weights, PD-EnD2's loss >= 2x faster than the materialized form.

Run from the repository root: ``.venv/bin/python benchmarks/bench_criteria.py`` (CPU, a few
minutes) or ``--device cuda --preset big``.
"""
import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import types
import warnings

import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

#: Streamed criteria: benchmark name -> (registered fairseq criterion, what it is).
FUSED = {
    "rkl": ("rkl_dirichlet_proxy_distillation", "PD-EnD2, reverse KL to the proxy Dirichlet"),
    "fkl": ("dirichlet_proxy_distillation", "forward KL to the proxy Dirichlet"),
    "nll": ("sequence_distribution_distillation", "EnD2, Dirichlet NLL of the members"),
    "kd": ("forward_kl_mean_distillation", "KD to the ensemble mean"),
}
MATERIALIZED = "rkl_materialized"
CACHE = "rkl_cache"
METHODS = ("ce",) + tuple(FUSED) + (MATERIALIZED, CACHE)
#: The issue's targets: cache tokens/s vs CE, online growth M=1 -> max M vs teacher weights, loss speedup.
TARGETS = {"cache_vs_ce_tokens_per_s": 0.85, "online_growth_above_teacher_weights_bytes": 0, "pd_end2_loss_speedup": 2.0}
PRESETS = {
    "small": dict(vocab=8000, batch=16, tgt_len=24, embed_dim=128, ffn_dim=512, heads=4, layers=2),
    "big": dict(vocab=40000, batch=64, tgt_len=32, embed_dim=1024, ffn_dim=4096, heads=16, layers=6),
}
MiB = 2.0**20


# ----------------------------------------------------------------------------------------------
# Models and batch
# ----------------------------------------------------------------------------------------------
def build_task(vocab: int):
    """A stand-in task holding one shared fairseq Dictionary of ``vocab`` symbols (specials included)."""
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    for i in range(vocab - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    return types.SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)


def build_transformer(args, task, seed: int, dropout: float):
    """A fairseq ``TransformerModel`` (shared embeddings, ``args.layers`` encoder and decoder layers)."""
    from fairseq.models.transformer import TransformerModel, base_architecture

    cfg = argparse.Namespace(share_all_embeddings=True, dropout=dropout)
    for side in ("encoder", "decoder"):
        setattr(cfg, f"{side}_embed_dim", args.embed_dim)
        setattr(cfg, f"{side}_ffn_embed_dim", args.ffn_dim)
        setattr(cfg, f"{side}_attention_heads", args.heads)
        setattr(cfg, f"{side}_layers", args.layers)
    base_architecture(cfg)
    torch.manual_seed(seed)
    return TransformerModel.build_model(cfg, task).to(args.device)


def make_sample(args, task):
    """A fairseq-style batch: full-length sources, right-padded targets of lengths in [T/2, T]."""
    d = task.target_dictionary
    gen = torch.Generator().manual_seed(0)
    b, t = args.batch, args.tgt_len
    src = torch.randint(d.nspecial, len(d), (b, t), generator=gen)
    target = torch.randint(d.nspecial, len(d), (b, t), generator=gen)
    lengths = torch.randint(max(1, t // 2), t + 1, (b,), generator=gen)
    lengths[0] = t
    target[torch.arange(t).unsqueeze(0) >= lengths.unsqueeze(1)] = d.pad()
    prev = torch.cat([torch.full((b, 1), d.eos()), target[:, :-1]], dim=1)
    dev = args.device
    return {
        "id": torch.arange(b, device=dev),
        "nsentences": b,
        "ntokens": int(lengths.sum()),
        "net_input": {
            "src_tokens": src.to(dev),
            "src_lengths": torch.full((b,), t, device=dev),
            "prev_output_tokens": prev.to(dev),
        },
        "target": target.to(dev),
    }


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(x.numel() * x.element_size() for x in tensors)


class CachedOutput(torch.nn.Module):
    """Stands in for a network: returns a fixed output, so that a step measures the loss only."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, **net_input):
        return self.logits, None

    def get_targets(self, sample, net_output):
        return sample["target"]


# ----------------------------------------------------------------------------------------------
# The measured steps: each runs forward (teachers, student, loss) and backward, returns the loss
# ----------------------------------------------------------------------------------------------
def ce_step(student, teachers, sample, pad: int) -> torch.Tensor:
    """Baseline: log_softmax + NLL summed over the non-pad target positions."""
    target = sample["target"]
    mask = target.ne(pad)
    logits = student(**sample["net_input"])[0][mask]
    loss = F.nll_loss(torch.log_softmax(logits, -1, dtype=torch.float32), target[mask], reduction="sum")
    loss.backward()
    return loss.detach()


def build_criterion(name: str, task):
    """The registered fairseq criterion of benchmark method ``name``, default options."""
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY, CRITERION_REGISTRY

    import fairseq_pdd  # noqa: F401  (registers the criteria)

    registered = FUSED[name][0]
    return CRITERION_REGISTRY[registered](task, CRITERION_DATACLASS_REGISTRY[registered](sentence_avg=False))


def make_fused_step(name: str, task):
    """The training path of criterion ``name``: TeacherEnsemble statistics -> criterion -> backward."""
    from fairseq_pdd.criterions.distillation import STATS_KEY
    from fairseq_pdd.teachers.ensemble import TeacherEnsemble

    criterion = build_criterion(name, task)
    ensembles = {}  # one TeacherEnsemble per teacher list (it moves its models once)

    def step(student, teachers, sample, pad):
        if id(teachers) not in ensembles:
            names = [f"teacher{i}" for i in range(len(teachers))]
            ensembles[id(teachers)] = TeacherEnsemble(teachers, names, torch.float32)
        ensemble = ensembles[id(teachers)]
        stats = ensemble.statistics(sample, sample["target"].ne(pad))
        loss, _, _ = criterion(student, dict(sample, **{STATS_KEY: stats}))
        loss.backward()
        return loss.detach()

    return step


def materialized_rkl_step(student, teachers, sample, pad: int) -> torch.Tensor:
    """Authors' style PD-EnD2: B x T x M x V float64 ensemble tensor, loss by float64 autograd, with the offsets
    of the registered criterion's defaults."""
    from fairseq_pdd.criterions.distillation import ReverseKLProxyConfig
    from fairseq_pdd.distill.dirichlet import EPS_LOSS, concentrations

    defaults = ReverseKLProxyConfig()

    net_input = sample["net_input"]
    mask = sample["target"].ne(pad)
    with torch.no_grad():
        probs = torch.stack([torch.softmax(t(**net_input)[0].double(), -1) for t in teachers], dim=2)
        mean_probs = probs.mean(2)
        mkl = (mean_probs * (mean_probs.log() - probs.log().mean(2))).sum(-1)
        del probs
        k = mean_probs.shape[-1]
        scale = (k - 1) / (2 * mkl + EPS_LOSS) + k * defaults.target_offset
        beta = scale.unsqueeze(-1) * mean_probs + 1.0
    alpha = concentrations(student(**net_input)[0].double(), "exp", defaults.model_offset)
    a0, b0 = alpha.sum(-1), beta.sum(-1)
    kl = (
        torch.lgamma(a0)
        - torch.lgamma(alpha).sum(-1)
        - torch.lgamma(b0)
        + torch.lgamma(beta).sum(-1)
        + ((alpha - beta) * (torch.digamma(alpha) - torch.digamma(a0).unsqueeze(-1))).sum(-1)
    )
    loss = (kl / scale).masked_fill(~mask, 0.0).sum()
    loss.backward()
    return loss.detach()


def build_cache(args, teachers, sample, pad: int, directory: str):
    """Write the teacher cache of ``sample`` (its B sentences) from ``teachers``; return it opened."""
    from fairseq_pdd.teachers.cache_format import open_cache, scalar_columns, topk_to_arrays, write_cache
    from fairseq_pdd.teachers.ensemble import TeacherEnsemble
    from fairseq_pdd.distill.topk_stats import STORAGE_DTYPES, compress

    mask = sample["target"].ne(pad)
    with torch.no_grad():
        stats = TeacherEnsemble(teachers, [f"teacher{i}" for i in range(len(teachers))], torch.float32).statistics(sample, mask)
        topk = compress(stats, args.topk, STORAGE_DTYPES[args.cache_dtype], log_probs=True)
    del stats
    header = {"subset": "bench", "num_classes": args.vocab, "k": args.topk,
              "dtype": args.cache_dtype, "log_probs": True, "num_models": len(teachers), "teachers": [],
              "dictionaries": {}, "scalar_columns": scalar_columns(True)}
    shutil.rmtree(directory, ignore_errors=True)
    write_cache(directory, header, mask.sum(1).cpu().numpy(), [topk_to_arrays(topk, sample["target"][mask])])
    return open_cache(directory)


def make_cache_step(task, cache, sample):
    """PD-EnD2 from the cache as the ``distillation`` task runs it: top-k to device, expand, criterion."""
    from fairseq_pdd.criterions.distillation import STATS_KEY
    from fairseq_pdd.distill.topk_stats import expand

    criterion = build_criterion("rkl", task)
    topk = cache.topk(cache.rows(sample["id"].cpu().numpy()))  # what the data loader's collater gives
    num_classes = len(task.target_dictionary)

    def step(student, teachers, sample, pad):
        stats = expand(topk.to(sample["target"].device, non_blocking=True), num_classes, criterion.reads_mean_log_probs)
        loss, _, _ = criterion(student, dict(sample, **{STATS_KEY: stats}))
        loss.backward()
        return loss.detach()

    return step


def make_step(method: str, task):
    """The step function ``(student, teachers, sample, pad) -> loss`` of a benchmark method (not the cache)."""
    if method == "ce":
        return ce_step
    if method == MATERIALIZED:
        return materialized_rkl_step
    return make_fused_step(method, task)


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _stderr_silenced():
    """Hide the C++ profiler's start/stop log lines (written straight to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn) -> int:
    """Peak of the bytes held by torch's CPU allocator during ``fn()``, above those held before it.

    From the allocation and free events that ``torch.profiler`` records with ``profile_memory``,
    in time order. Counts tensor storage only: not allocator overhead, not the Python heap, not
    buffers that libraries (oneDNN, BLAS) allocate themselves.
    """
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn) -> int:
    """``torch.cuda.max_memory_allocated`` during ``fn()``, above the allocation before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def timed(fn, device: str) -> float:
    """Wall time (s) of one ``fn()``, synchronising CUDA around it."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def build_runs(args, jobs):
    """Build the student, max(M) teachers and the batch once; return one record per (method, M).

    Each record holds ``step`` (networks + loss + backward) and ``loss`` (the same on cached
    network outputs) closures; a job with M members uses the first M teachers.
    """
    task = build_task(args.vocab)
    pad = task.target_dictionary.pad()
    student = build_transformer(args, task, seed=0, dropout=0.1)
    num_teachers = max(m for _, m in jobs)
    teachers = [build_transformer(args, task, seed=1000 + i, dropout=0.1).eval().requires_grad_(False) for i in range(num_teachers)]
    sample = make_sample(args, task)
    with torch.no_grad():
        cached_teachers = [CachedOutput(t(**sample["net_input"])[0]) for t in teachers]
        cached_student = CachedOutput(student.eval()(**sample["net_input"])[0].requires_grad_())
    student.train()
    steps = {method: make_step(method, task) for method in {method for method, _ in jobs} if method != CACHE}
    runs = []
    for method, m in jobs:
        step, live, cached = steps.get(method), teachers[:m], cached_teachers[:m]
        extra = {}
        if method == CACHE:  # built from M teachers, trained with none
            cache = build_cache(args, live, sample, pad, os.path.join(args.work_dir, f"cache-M{m}"))
            step, live, cached = make_cache_step(task, cache, sample), [], []
            rows_of = functools.partial(cache.rows, sample["id"].cpu().numpy())
            extra = {"host_load": lambda: cache.topk(rows_of()), "topk": args.topk, "cache_dtype": args.cache_dtype}
        runs.append(
            {
                "method": method,
                "members": m,
                "step": functools.partial(step, student, live, sample, pad),
                "loss": functools.partial(step, cached_student, cached, sample, pad),
                "tokens": int(sample["target"].ne(pad).sum()),
                "student_weight_bytes": weight_bytes(student),
                "teacher_weight_bytes": sum(weight_bytes(t) for t in live),
                **extra,
            }
        )
    return runs


def measure(args, jobs) -> list:
    """Times (round-robin over all runs, so load changes hit all alike), then peak memory."""
    runs = build_runs(args, jobs)
    for run in runs:
        run["loss_value"] = float(run["loss"]())
    kinds = ("step", "loss")
    for _ in range(args.warmup):
        for run in runs:
            for kind in kinds:
                run[kind]()
    start = time.time()
    for r in range(args.repeats):
        for run in runs:
            for kind in kinds:
                run.setdefault(f"{kind}_times_s", []).append(timed(run[kind], args.device))
        print(f"  timing round {r + 1}/{args.repeats} ({time.time() - start:.0f}s)", flush=True)
    print("  measuring peak memory", flush=True)
    peak_bytes = cuda_peak_bytes if args.device == "cuda" else cpu_peak_bytes
    results = []
    for run in runs:
        for kind in kinds:
            gc.collect()
            run[f"{kind}_peak_bytes"] = peak_bytes(run[kind])
            run[f"{kind}_time_s"] = statistics.median(run[f"{kind}_times_s"])
        if "host_load" in run:
            run["host_load_time_s"] = statistics.median(timed(run["host_load"], "cpu") for _ in range(args.repeats))
        results.append({k: v for k, v in run.items() if k not in kinds + ("host_load",)})
    return results


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _ratio(a, b):
    return a / b if b else None


def add_ratios(results: list) -> dict:
    """Ratios to the CE baseline on each record; PD-EnD2 streamed-vs-materialized and M-growth summaries."""
    base = next(r for r in results if r["method"] == "ce")
    for r in results:
        r["tokens_per_s"] = _ratio(r["tokens"], r["step_time_s"])
        r["time_ratio"] = _ratio(r["step_time_s"], base["step_time_s"])
        r["loss_time_ratio"] = _ratio(r["loss_time_s"], base["loss_time_s"])
        r["mem_ratio"] = _ratio(r["step_peak_bytes"], base["step_peak_bytes"])
        # Weights + the student's gradients (allocated once, kept between steps) + the step's peak.
        r["online_peak_bytes"] = 2 * r["student_weight_bytes"] + r["teacher_weight_bytes"] + r["step_peak_bytes"]
    by_key = {(r["method"], r["members"]): r for r in results}
    pd_end2 = []
    for m in sorted({r["members"] for r in results if r["method"] == "rkl"}):
        fused, ref = by_key.get(("rkl", m)), by_key.get((MATERIALIZED, m))
        if fused and ref:
            pd_end2.append(
                {
                    "members": m,
                    "step_speedup": _ratio(ref["step_time_s"], fused["step_time_s"]),
                    "loss_speedup": _ratio(ref["loss_time_s"], fused["loss_time_s"]),
                    "step_mem_ratio": _ratio(ref["step_peak_bytes"], fused["step_peak_bytes"]),
                    "loss_mem_ratio": _ratio(ref["loss_peak_bytes"], fused["loss_peak_bytes"]),
                    "loss_rel_diff": abs(fused["loss_value"] - ref["loss_value"]) / max(abs(ref["loss_value"]), 1e-30),
                }
            )
    growth = []
    for method in tuple(FUSED) + (MATERIALIZED,):
        runs = sorted((r for r in results if r["method"] == method), key=lambda r: r["members"])
        if len(runs) >= 2:
            lo, hi = runs[0], runs[-1]
            growth.append(
                {
                    "method": method,
                    "members": [lo["members"], hi["members"]],
                    "online_peak_diff_bytes": hi["online_peak_bytes"] - lo["online_peak_bytes"],
                    "extra_teacher_weight_bytes": hi["teacher_weight_bytes"] - lo["teacher_weight_bytes"],
                    "step_peak_diff_bytes": hi["step_peak_bytes"] - lo["step_peak_bytes"],
                }
            )
    return {
        "pd_end2_streamed_vs_materialized": pd_end2,
        "growth_with_members": growth,
        "targets": targets(results, base, pd_end2, growth),
    }


def targets(results: list, base: dict, pd_end2: list, growth: list) -> list:
    """The issue's three targets, each with the measured value and whether it is met."""
    out = []
    cache = next((r for r in results if r["method"] == CACHE), None)
    if cache:
        value = _ratio(cache["tokens_per_s"], base["tokens_per_s"])
        out.append({"name": "cache_vs_ce_tokens_per_s", "value": value, "target": ">= 0.85",
                    "met": value >= TARGETS["cache_vs_ce_tokens_per_s"]})
    rkl = next((g for g in growth if g["method"] == "rkl"), None)
    if rkl:
        value = rkl["online_peak_diff_bytes"] - rkl["extra_teacher_weight_bytes"]
        out.append({"name": "online_growth_above_teacher_weights_bytes", "members": rkl["members"], "value": value,
                    "target": "<= 0", "met": value <= TARGETS["online_growth_above_teacher_weights_bytes"]})
    if pd_end2:
        value = min(s["loss_speedup"] for s in pd_end2)
        out.append({"name": "pd_end2_loss_speedup", "value": value, "target": ">= 2 (min over M)",
                    "met": value >= TARGETS["pd_end2_loss_speedup"]})
    return out


def _fmt(x, scale=1.0, spec=".1f"):
    return "-" if x is None else format(x / scale, spec)


def print_report(config: dict, results: list, summary: dict) -> None:
    """The readable tables on stdout."""
    print(
        f"\ndevice={config['device']} V={config['vocab']} batch={config['batch']}x{config['tgt_len']} "
        f"({results[0]['tokens']} non-pad tokens) d={config['embed_dim']} ffn={config['ffn_dim']} "
        f"layers={config['layers']} repeats={config['repeats']} threads={config['threads']} kernels={config['kernels_used']}"
    )
    head = (f"{'method':<17}{'M':>3} {'tokens/s':>9} {'step ms':>9}{'x CE':>7} {'step MiB':>9}{'x CE':>7} {'loss ms':>9}"
            f" {'x CE':>7} {'loss MiB':>9}  {'loss value':>12}")
    print(head + "\n" + "-" * len(head))
    for r in results:
        print(
            f"{r['method']:<17}{r['members'] or '-':>3} {_fmt(r['tokens_per_s'], 1, '.0f'):>9} "
            f"{_fmt(r['step_time_s'], 1e-3):>9}{_fmt(r['time_ratio'], 1, '.2f'):>7} "
            f"{_fmt(r['step_peak_bytes'], MiB):>9}{_fmt(r['mem_ratio'], 1, '.2f'):>7} "
            f"{_fmt(r['loss_time_s'], 1e-3):>9} {_fmt(r['loss_time_ratio'], 1, '.2f'):>7} "
            f"{_fmt(r['loss_peak_bytes'], MiB):>9}  {r['loss_value']:>12.5g}"
        )
    print("ce: cross-entropy baseline; " + "; ".join(f"{k}: {v[1]} ({v[0]})" for k, v in FUSED.items())
          + f"; {MATERIALIZED}: PD-EnD2 on a B x T x M x V float64 tensor with float64 autograd"
          + f"; {CACHE}: PD-EnD2 from the top-k teacher cache (built from M teachers, none loaded)")
    for r in results:
        if "host_load_time_s" in r:
            print(f"{r['method']}: k={r['topk']} {r['cache_dtype']}; reading the batch's rows from the memory-mapped cache "
                  f"(data-loader side, not in the step) {_fmt(r['host_load_time_s'], 1e-3, '.2f')} ms")
    if summary["pd_end2_streamed_vs_materialized"]:
        print("\nPD-EnD2: streamed fused float32 vs materialized float64 (materialized / streamed)")
        print(f"{'M':>3} {'step speedup':>13} {'loss speedup':>13} {'step mem x':>11} {'loss mem x':>11} {'loss rel diff':>14}")
        for s in summary["pd_end2_streamed_vs_materialized"]:
            print(
                f"{s['members']:>3} {_fmt(s['step_speedup'], 1, '.2f'):>13} {_fmt(s['loss_speedup'], 1, '.2f'):>13} "
                f"{_fmt(s['step_mem_ratio'], 1, '.2f'):>11} {_fmt(s['loss_mem_ratio'], 1, '.2f'):>11} {s['loss_rel_diff']:>14.2e}"
            )
    if summary["growth_with_members"]:
        per_teacher = next(r["teacher_weight_bytes"] / r["members"] for r in results if r["members"])
        print(f"\nGrowth with M (teacher weights {per_teacher / MiB:.1f} MiB each; online peak = weights + grads + step peak)")
        print(f"{'method':<17}{'M':>7} {'online peak diff MiB':>21} {'extra teacher weights MiB':>26} {'step peak diff MiB':>19}")
        for g in summary["growth_with_members"]:
            span = f"{g['members'][0]}->{g['members'][1]}"
            print(
                f"{g['method']:<17}{span:>7} {_fmt(g['online_peak_diff_bytes'], MiB):>21} "
                f"{_fmt(g['extra_teacher_weight_bytes'], MiB):>26} {_fmt(g['step_peak_diff_bytes'], MiB):>19}"
            )
    if summary["targets"]:
        print("\nTargets")
        for t in summary["targets"]:
            value = _fmt(t["value"], MiB, ".2f") + " MiB" if t["name"].endswith("bytes") else _fmt(t["value"], 1, ".2f")
            print(f"  {t['name']:<44} {value:>12}  target {t['target']:<18} {'met' if t['met'] else 'NOT met'}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--preset", choices=tuple(PRESETS), default="small", help="sizes; explicit options override")
    p.add_argument("--vocab", type=int, help="target = source vocabulary V")
    p.add_argument("--batch", type=int, help="sentences per batch")
    p.add_argument("--tgt-len", type=int, help="target (and source) length T")
    p.add_argument("--embed-dim", type=int)
    p.add_argument("--ffn-dim", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--layers", type=int, help="encoder and decoder layers each")
    p.add_argument("--members", type=int, nargs="+", default=[1, 5, 10], help="ensemble sizes M")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--topk", type=int, default=64, help="classes kept per token by the rkl_cache run")
    p.add_argument("--cache-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: 1 on CPU, as multi-threaded CPU times blow up 10-20x "
        "when other processes compete for the cores; torch's default on CUDA)",
    )
    p.add_argument(
        "--kernels",
        choices=("auto", "torch", "triton"),
        help="implementation of the fused losses: sets FAIRSEQ_PDD_KERNELS for this run (default: its value, else "
        "auto = Triton on CUDA, torch on CPU)",
    )
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "criteria.json"))
    p.add_argument("--work-dir", help="where the rkl_cache run writes its cache (default: a temporary directory)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv=None):
    args = parse_args(argv)
    # fairseq's decoder passes a bool padding mask beside a float causal mask (as in training).
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from fairseq_pdd.distill import backend

    if args.kernels:
        os.environ[backend.ENV_VAR] = args.kernels
    config = {k: v for k, v in vars(args).items() if k not in ("out", "methods", "work_dir")}
    config["kernels"] = backend.choice()
    config["kernels_used"] = "triton" if backend.use_triton(torch.empty(0, device=args.device)) else "torch"
    methods = ["ce"] + [m for m in args.methods if m != "ce"]
    jobs = [("ce", 0)] + [(method, m) for method in methods[1:] if method != CACHE for m in args.members]
    if CACHE in methods:
        jobs.append((CACHE, max(args.members)))
    config["threads"] = torch.get_num_threads()
    start, load_start = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        args.work_dir = args.work_dir or tmp
        results = measure(args, jobs)
    load = {"start": load_start, "end": os.getloadavg(), "cpus": os.cpu_count()}
    summary = add_ratios(results)
    print_report(config, results, summary)
    print(f"\nload average (1, 5, 15 min) at start {load['start']}, at end {load['end']}, {load['cpus']} CPUs")
    if args.device == "cpu" and max(load["start"][0], load["end"][0]) > load["cpus"]:
        print("WARNING: other processes competed for the CPUs during the run; times are less reliable "
              "(with more than one thread especially)")
    memory_method = (
        "torch.cuda.max_memory_allocated - memory_allocated before the step"
        if args.device == "cuda"
        else "torch.profiler(profile_memory=True): peak of the running sum of CPU allocator events during the step"
    )
    report = {
        "config": config,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "memory_method": memory_method,
        "load_average": load,
        "results": results,
        **summary,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out} ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
