#!/usr/bin/env python
"""The project's GPU check, one command with no network: ``bash benchmarks/gpu_check.sh`` runs this.

Everything runs in this one Python process (fairseq's own command-line entry points, called with their
arguments in ``sys.argv``), because importing fairseq costs ~15 s per process on the GPU machine:

1. **data**: a synthetic parallel corpus over a joined dictionary of ``vocab`` symbols (40,000 on a GPU:
   ``vocab - 4`` words ``w0 w1 ...`` plus fairseq's 4 specials), Zipf-distributed source words, each
   target word a fixed permutation of its source word; binarised by ``fairseq-preprocess --srcdict DICT
   --joined-dictionary``;
2. **teachers**: one cross-entropy ``fairseq-train`` run with ``--save-interval-updates`` gives
   ``members`` different checkpoints (one every ``save_every`` updates);
3. **training throughput**: ``fairseq-train`` for ``updates`` updates, ``--max-tokens`` per step, of
   (a) cross-entropy, (b) PD-EnD2 (``rkl_dirichlet_proxy_distillation``) with all ``members`` teachers
   online, (c) PD-EnD2 from a teacher cache (``fairseq-pdd-cache``, k = 64, built between (b) and (c)
   and timed on its own). Tokens/s is fairseq's ``wps`` over the ``train_inner`` log intervals after the
   first (which holds the warm-up): total target tokens / total time. Peak memory is the largest
   ``torch.cuda.max_memory_allocated`` of the run (fairseq's trainer resets the peak every step, so each
   reset is intercepted and the peak before it kept);
4. **criteria**: ``benchmarks/bench_criteria.py`` (``--preset big`` on a GPU);
5. **decoding**: ``fairseq-generate`` against ``fairseq-pdd-generate`` on the test split for an ensemble
   of 2 teachers and for the Dirichlet student of (b): gen time (fairseq's ``Translated ... in Xs``) and
   wall time of each decode, ``repeats`` rounds after a warm-up round, medians. The hypotheses must be
   identical where the search is the same: the ensemble (plain vs pdd) and the student searched with
   ``softmax(z)`` (``--predictive softmax``); the student's default search (the Dirichlet mean) is
   timed and its differences only counted.

Writes one JSON report (``--out``) and prints its table, fairseq's log beside it (``.log`` for
``.json``); exits 1 if a hypotheses check failed.
``--device cpu`` runs the same steps at tiny sizes (the CI smoke run, under a minute on 2 cores).
"""
import argparse
import gc
import glob
import json
import logging
import os
import platform
import random
import re
import shutil
import statistics
import sys
import time
from typing import Callable, Dict, List
from unittest import mock

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
for path in (REPO_ROOT, BENCH_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)

#: Sizes per device. GPU: Transformer-big, V = 40,000, 8192 tokens per step (the recipes' batch).
SIZES = {
    "cuda": dict(
        vocab=40000, train=16000, valid=100, test=400, min_len=10, max_len=44, max_tokens=8192,
        model=["--arch", "transformer_wmt_en_de_big", "--share-all-embeddings"],
        dtype=["--fp16"], ensemble_dtype=["--fp16-ensemble"], members=10, save_every=2, updates=40,
        log_interval=10, beam=5, batch_size=128, repeats=2,
        criteria=["--device", "cuda", "--preset", "big", "--methods", "ce", "rkl", "rkl_materialized",
                  "rkl_cache", "--repeats", "3"],
    ),
    "cpu": dict(
        vocab=1000, train=600, valid=16, test=16, min_len=3, max_len=10, max_tokens=400,
        model=["--arch", "transformer", "--share-all-embeddings", "--encoder-layers", "1", "--decoder-layers", "1",
               "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
               "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"],
        dtype=["--cpu"], ensemble_dtype=[], members=3, save_every=2, updates=6, log_interval=2, beam=3,
        batch_size=16, repeats=1,
        criteria=["--device", "cpu", "--vocab", "1000", "--batch", "4", "--tgt-len", "8", "--embed-dim", "32",
                  "--ffn-dim", "64", "--heads", "2", "--layers", "1", "--members", "1", "2", "--methods", "ce",
                  "rkl", "rkl_materialized", "rkl_cache", "--repeats", "1", "--warmup", "0"],
    ),
}
TOPK = 64
GiB = 2.0**30
TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s")

logger = logging.getLogger("gpu_check")


class ToolFailed(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ tools
class _Records(logging.Handler):
    """Every log record of a run as (logger name, message)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append((record.name, record.getMessage()))


def run_tool(prog: str, cli_main: Callable[[], None], argv: List[str]) -> dict:
    """``prog ARGV`` through its ``cli_main`` in this process; returns wall seconds and the log records."""
    handler = _Records()
    root = logging.getLogger()
    root.addHandler(handler)
    argv = [prog, *map(str, argv)]
    logger.info("+ %s", " ".join(argv))
    start = time.perf_counter()
    try:
        with mock.patch.object(sys, "argv", argv):
            cli_main()
    except SystemExit as e:
        if e.code not in (None, 0):
            raise ToolFailed(f"{prog} exited with {e.code}: {' '.join(argv)}") from e
    finally:
        root.removeHandler(handler)
    return {"wall_s": time.perf_counter() - start, "records": handler.records}


class PeakMemory:
    """The peak CUDA memory of a block (None on CPU). fairseq's trainer calls
    ``torch.cuda.reset_peak_memory_stats`` every step; each call is intercepted and the peak before it kept."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.peak_bytes = self.baseline_bytes = None

    def __enter__(self):
        import torch

        gc.collect()
        if not self.cuda:
            return self
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.baseline_bytes = torch.cuda.memory_allocated()
        self._reset = torch.cuda.reset_peak_memory_stats
        self._reset()
        self.peak_bytes = 0

        def reset(*args, **kwargs):
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated())
            return self._reset(*args, **kwargs)

        self._patch = mock.patch.object(torch.cuda, "reset_peak_memory_stats", reset)
        self._patch.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self._patch.stop()
            torch.cuda.synchronize()
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated())
        gc.collect()
        return False


# ------------------------------------------------------------------------------------------------- data
def write_corpus(folder: str, sizes: dict, seed: int = 1) -> str:
    """Synthetic parallel text (``train/valid/test.{src,tgt}``) and ``dict.txt``: ``vocab - 4`` words (fairseq
    adds 4 specials), Zipf-distributed source words, lengths uniform in [min_len, max_len], each target
    word a fixed permutation of its source word. Returns the dictionary's path."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(sizes["vocab"] - 4)]
    target_of = words[:]
    rng.shuffle(target_of)
    cumulative, total = [], 0.0
    for rank in range(len(words)):
        total += 1.0 / (rank + 1)
        cumulative.append(total)
    os.makedirs(folder, exist_ok=True)
    for split in ("train", "valid", "test"):
        with open(os.path.join(folder, f"{split}.src"), "w") as src, open(os.path.join(folder, f"{split}.tgt"), "w") as tgt:
            for _ in range(sizes[split]):
                n = rng.randint(sizes["min_len"], sizes["max_len"])
                ids = [int(i) for i in rng.choices(range(len(words)), cum_weights=cumulative, k=n)]
                src.write(" ".join(words[i] for i in ids) + "\n")
                tgt.write(" ".join(target_of[i] for i in ids) + "\n")
    dictionary = os.path.join(folder, "dict.txt")
    with open(dictionary, "w") as f:
        f.writelines(f"{w} {len(words) - i}\n" for i, w in enumerate(words))
    return dictionary


# ---------------------------------------------------------------------------------------------- training
def throughput(records: List[tuple]) -> dict:
    """Target tokens/s from fairseq's ``train_inner`` JSON records after the first: the tokens of those
    intervals (``wpb`` x updates) over their time (tokens / ``wps``)."""
    inner = [json.loads(message) for name, message in records if name == "train_inner"]
    if len(inner) < 2:
        raise ToolFailed(f"fairseq-train logged {len(inner)} train_inner records; need 2 or more (--log-interval)")
    tokens = seconds = 0.0
    previous = int(inner[0]["num_updates"])
    for rec in inner[1:]:
        updates = int(rec["num_updates"]) - previous
        previous = int(rec["num_updates"])
        interval_tokens = float(rec["wpb"]) * updates
        tokens += interval_tokens
        seconds += interval_tokens / float(rec["wps"])
    return {"tokens_per_s": tokens / seconds, "timed_updates": previous - int(inner[0]["num_updates"]),
            "tokens_per_update": tokens / (previous - int(inner[0]["num_updates"])), "updates": previous}


def fairseq_train(args, name: str, argv: List[str], timed: bool = True) -> dict:
    """``fairseq-train`` in this process under :class:`PeakMemory`; with ``timed``, its tokens/s."""
    from fairseq_cli import train

    with PeakMemory(args.device) as memory:
        run = run_tool("fairseq-train", train.cli_main, argv)
    out = {"name": name, "wall_s": run["wall_s"], "peak_bytes": memory.peak_bytes,
           "baseline_bytes": memory.baseline_bytes}
    if timed:
        out.update(throughput(run["records"]))
    return out


def common_train_args(args, sizes: dict, data: str) -> List[str]:
    return [data, "--user-dir", args.user_dir, *sizes["model"], *sizes["dtype"], "--optimizer", "adam",
            "--adam-betas", "(0.9, 0.98)", "--lr", "7e-4", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
            "--dropout", "0.1", "--max-tokens", sizes["max_tokens"], "--log-format", "json",
            "--log-interval", sizes["log_interval"], "--disable-validation", "--distributed-world-size", "1",
            "--num-workers", "0" if args.device == "cpu" else "1", "--seed", "1"]


def train_teachers(args, sizes: dict, data: str) -> dict:
    """One cross-entropy run saving every ``save_every`` updates: ``members`` distinct checkpoints. The run
    must end inside its first epoch: fairseq writes no interval checkpoint at an epoch's end (SIZES)."""
    save = os.path.join(args.work, "teachers")
    updates = sizes["members"] * sizes["save_every"]
    run = fairseq_train(args, "teachers", [
        *common_train_args(args, sizes, data), "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-update", updates, "--save-interval-updates", sizes["save_every"], "--no-epoch-checkpoints",
        "--no-last-checkpoints", "--no-save-optimizer-state", "--save-dir", save], timed=False)  # saves in the intervals
    # checkpoint_{epoch}_{updates}.pt, in the order of their updates
    paths = sorted(glob.glob(os.path.join(save, "checkpoint_*_*.pt")), key=lambda p: int(p.rsplit("_", 1)[1][:-3]))
    if len(paths) != sizes["members"]:
        raise ToolFailed(f"expected {sizes['members']} teacher checkpoints in {save}, found {len(paths)}")
    run["checkpoints"] = paths
    return run


def train_students(args, sizes: dict, data: str, teachers: List[str]) -> dict:
    """CE, PD-EnD2 with every teacher online (its checkpoint is the decoding student), the teacher cache's
    build, and PD-EnD2 from the cache: ``updates`` updates each."""
    from fairseq_pdd.teachers import build_cache

    timed = [*common_train_args(args, sizes, data), "--max-update", sizes["updates"]]
    pd_end2 = ["--criterion", "rkl_dirichlet_proxy_distillation", "--task", "distillation"]
    # --no-save still loads SAVE_DIR/checkpoint_last.pt if there is one: every run gets its own folder
    out = {"ce": fairseq_train(args, "ce", [*timed, "--criterion", "cross_entropy", "--no-save",
                                            "--save-dir", os.path.join(args.work, "ce")])}
    student = os.path.join(args.work, "student")
    out["pd_end2_online"] = fairseq_train(args, "pd_end2_online", [
        *timed, *pd_end2, "--ensemble-paths", ":".join(teachers), *sizes["ensemble_dtype"], "--save-dir", student,
        "--no-epoch-checkpoints", "--no-save-optimizer-state"])
    out["pd_end2_online"]["members"] = len(teachers)  # and the cache's below
    cache = os.path.join(args.work, "cache")
    with PeakMemory(args.device) as memory:
        run = run_tool("fairseq-pdd-cache", build_cache.cli_main, [
            data, "--user-dir", args.user_dir, "--task", "distillation", "--ensemble-paths", ":".join(teachers),
            "--gen-subset", "train", "--cache-dir", cache, "--topk", TOPK, "--max-tokens", sizes["max_tokens"],
            *sizes["ensemble_dtype"], *(["--cpu"] if args.device == "cpu" else [])])
    out["cache_build"] = {"wall_s": run["wall_s"], "peak_bytes": memory.peak_bytes, "members": len(teachers),
                          "topk": TOPK, "bytes": directory_bytes(cache)}
    out["pd_end2_cache"] = fairseq_train(args, "pd_end2_cache", [*timed, *pd_end2, "--teacher-cache", cache, "--no-save",
                                                                 "--save-dir", os.path.join(args.work, "pd_end2_cache")])
    out["pd_end2_cache"]["members"] = len(teachers)
    for name in ("pd_end2_online", "pd_end2_cache"):
        out[name]["x_ce_tokens_per_s"] = out[name]["tokens_per_s"] / out["ce"]["tokens_per_s"]
    out["student"] = os.path.join(student, "checkpoint_last.pt")
    return out


def directory_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


# ---------------------------------------------------------------------------------------------- criteria
def bench_criteria(args, sizes: dict) -> dict:
    """``benchmarks/bench_criteria.py`` in this process; its JSON report."""
    import bench_criteria as bench

    out = os.path.join(args.work, "criteria.json")
    start = time.perf_counter()
    bench.main([*sizes["criteria"], *args.criteria_args, "--out", out])
    with open(out) as f:
        report = json.load(f)
    report["wall_s"] = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------------------------- decoding
def hypotheses(path: str) -> Dict[int, str]:
    """``{sample id: hypothesis text}`` of the ``H-`` lines of a fairseq-generate output."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("H-"):
                fields = line.rstrip("\n").split("\t")
                out[int(fields[0][2:])] = fields[2] if len(fields) > 2 else ""
    return out


def compare_hypotheses(a: Dict[int, str], b: Dict[int, str], expected: int) -> dict:
    """How two decodings of the same ``expected`` sentences differ; ``identical`` only when both have
    every sentence and no hypothesis differs."""
    ids = sorted(set(a) | set(b))
    differ = [i for i in ids if i in a and i in b and a[i] != b[i]]
    missing = [i for i in ids if i not in a or i not in b]
    out = {"sentences": len(ids), "expected": expected, "differ": len(differ), "missing": len(missing),
           "identical": not differ and not missing and len(a) == len(b) == expected}
    if differ:
        out["first_difference"] = {"id": differ[0], "a": a[differ[0]], "b": b[differ[0]]}
    return out


def gen_seconds(records: List[tuple]) -> float:
    """fairseq-generate's decode-loop time, N / (sentences/s) of its ``Translated ...`` line."""
    for name, message in records:
        m = TRANSLATED.match(message)
        if name == "fairseq_cli.generate" and m:
            n, rate = int(m.group(1).replace(",", "")), float(m.group(4))
            return n / rate if rate > 0 else float(m.group(3))
    raise ToolFailed("no 'Translated N sentences ...' line in the decode's log")


def decode(args, sizes: dict, data: str, path: str, tool: str, subset: str, folder: str, extra=()) -> dict:
    """One decode (beam, n-best 1) into ``folder``: gen and wall seconds, hypotheses."""
    import fairseq_cli.generate as plain
    from fairseq_pdd.decoding import generate as pdd

    cli = plain.cli_main if tool == "fairseq-generate" else pdd.cli_main
    shutil.rmtree(folder, ignore_errors=True)
    run = run_tool(tool, cli, [
        data, "--user-dir", args.user_dir, "--path", path, "--gen-subset", subset, "--beam", sizes["beam"],
        "--nbest", 1, "--batch-size", sizes["batch_size"], "--required-batch-size-multiple", 1,
        "--max-len-a", "1.2", "--max-len-b", "10", "--results-path", folder, "--distributed-world-size", 1,
        *(["--fp16"] if args.device == "cuda" else ["--cpu"]), *extra])
    return {"wall_s": run["wall_s"], "gen_s": gen_seconds(run["records"]),
            "hypotheses": hypotheses(os.path.join(folder, f"generate-{subset}.txt"))}


#: (model, variant) -> (tool, extra options); the checked pairs and the informative one
DECODES = {
    ("ensemble", "plain"): ("fairseq-generate", []),
    ("ensemble", "pdd"): ("fairseq-pdd-generate", []),
    ("student", "plain"): ("fairseq-generate", []),
    ("student", "pdd"): ("fairseq-pdd-generate", []),
    ("student", "pdd_softmax"): ("fairseq-pdd-generate", ["--predictive", "softmax"]),
}
CHECKS = [("ensemble", "plain", "pdd"), ("student", "plain", "pdd_softmax")]


def bench_generate(args, sizes: dict, data: str, models: Dict[str, str]) -> dict:
    """Every decode of DECODES ``repeats`` times round-robin after a warm-up round on the valid split (each
    code path's CUDA kernels chosen once); medians, pdd / plain ratios and the hypotheses checks."""
    folder = os.path.join(args.work, "decodes")
    for (model, variant), (tool, extra) in DECODES.items():
        decode(args, sizes, data, models[model], tool, "valid", os.path.join(folder, "warmup"), extra)
    times = {key: {"gen_s": [], "wall_s": []} for key in DECODES}
    hyps = {}
    for _ in range(sizes["repeats"]):
        for (model, variant), (tool, extra) in DECODES.items():
            run = decode(args, sizes, data, models[model], tool, "test", os.path.join(folder, f"{model}-{variant}"), extra)
            times[(model, variant)]["gen_s"].append(run["gen_s"])
            times[(model, variant)]["wall_s"].append(run["wall_s"])
            hyps[(model, variant)] = run["hypotheses"]
    rows = []
    for (model, variant), t in times.items():
        gen, wall = statistics.median(t["gen_s"]), statistics.median(t["wall_s"])
        base = times[(model, "plain")]
        rows.append({"model": model, "variant": variant, "tool": DECODES[(model, variant)][0],
                     "options": DECODES[(model, variant)][1], "gen_s": gen, "wall_s": wall,
                     "gen_ratio": gen / statistics.median(base["gen_s"]),
                     "wall_ratio": wall / statistics.median(base["wall_s"]), "gen_s_all": t["gen_s"],
                     "wall_s_all": t["wall_s"]})
    checks = [{"model": model, "a": a, "b": b, **compare_hypotheses(hyps[(model, a)], hyps[(model, b)], sizes["test"])}
              for model, a, b in CHECKS]
    dirichlet = {"model": "student", "a": "plain", "b": "pdd", "note": "searched with alpha/a0, not softmax(z): "
                 "differences expected, not checked",
                 **compare_hypotheses(hyps[("student", "plain")], hyps[("student", "pdd")], sizes["test"])}
    return {"sentences": sizes["test"], "beam": sizes["beam"], "nbest": 1, "repeats": sizes["repeats"],
            "results": rows, "checks": checks, "student_dirichlet_vs_plain": dirichlet}


# ------------------------------------------------------------------------------------------------ report
def fmt(value, spec=".2f", scale=1.0):
    return "-" if value is None else format(value / scale, spec)


def table(report: dict) -> str:
    lines = [f"device: {report['device_name']} ({report['device']}); V = {report['data']['vocab']}; "
             f"{report['data']['max_tokens']} tokens per step; {report['training']['pd_end2_online']['members']} teachers",
             "", "| fairseq-train | tokens/s | x CE | peak GB | wall s |", "|---|---|---|---|---|"]
    for key in ("ce", "pd_end2_online", "pd_end2_cache"):
        r = report["training"][key]
        lines.append(f"| {key} | {r['tokens_per_s']:.0f} | {fmt(r.get('x_ce_tokens_per_s', 1.0))} | "
                     f"{fmt(r['peak_bytes'], '.1f', GiB)} | {r['wall_s']:.0f} |")
    c = report["training"]["cache_build"]
    lines.append(f"| (cache build, k = {c['topk']}) | - | - | {fmt(c['peak_bytes'], '.1f', GiB)} | {c['wall_s']:.0f} |")
    lines += ["", "| bench_criteria | M | tokens/s | step ms | x CE | step MiB | loss ms |", "|---|---|---|---|---|---|---|"]
    for r in report["criteria"]["results"]:
        lines.append(f"| {r['method']} | {r['members'] or '-'} | {fmt(r['tokens_per_s'], '.0f')} | "
                     f"{fmt(r['step_time_s'], '.1f', 1e-3)} | {fmt(r['time_ratio'])} | "
                     f"{fmt(r['step_peak_bytes'], '.0f', 2.0**20)} | {fmt(r['loss_time_s'], '.1f', 1e-3)} |")
    lines += ["", "| decode | variant | gen s | x plain | wall s | x plain |", "|---|---|---|---|---|---|"]
    for r in report["generate"]["results"]:
        lines.append(f"| {r['model']} | {r['variant']} | {r['gen_s']:.2f} | {r['gen_ratio']:.2f} | {r['wall_s']:.2f} | "
                     f"{r['wall_ratio']:.2f} |")
    for c in report["generate"]["checks"]:
        lines.append(f"hypotheses {c['model']} {c['a']} vs {c['b']}: "
                     f"{'identical' if c['identical'] else 'DIFFER'} ({c['sentences']} sentences, {c['differ']} differ, "
                     f"{c['missing']} missing)")
    d = report["generate"]["student_dirichlet_vs_plain"]
    lines.append(f"student plain vs pdd (Dirichlet mean, not checked): {d['differ']} of {d['sentences']} differ")
    lines.append(f"total {report['wall_s']:.0f} s")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=tuple(SIZES), default="cuda")
    p.add_argument("--cpu", dest="device", action="store_const", const="cpu", help="= --device cpu")
    p.add_argument("--work", default=None, help="working folder, emptied first (default: "
                   "benchmarks/results/gpu_check_work, removed after the run)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "gpu_check.json"))
    p.add_argument("--members", type=int, help="online teachers (default: 10 on a GPU, 3 on CPU)")
    p.add_argument("--updates", type=int, help="updates of each timed fairseq-train run")
    p.add_argument("--criteria-args", default="", type=str.split,
                   help="options appended to bench_criteria's (they win), e.g. \"--methods ce rkl --repeats 5\"")
    args = p.parse_args(argv)
    if args.members is not None and args.members < 2:
        p.error("--members: at least 2 (the ensemble decode takes 2)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = dict(SIZES[args.device])
    sizes.update({k: getattr(args, k) for k in ("members", "updates") if getattr(args, k) is not None})
    if sizes["updates"] < 2 * sizes["log_interval"]:  # tokens/s skips the first log interval
        sys.exit(f"gpu_check: --updates {sizes['updates']}: at least {2 * sizes['log_interval']} "
                 f"(two log intervals of {sizes['log_interval']})")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --cpu for the CPU smoke run)")
    if args.device == "cpu":
        torch.set_num_threads(1)  # the smoke run shares small CI machines
    temporary = args.work is None
    args.work = os.path.abspath(args.work or os.path.join(REPO_ROOT, "benchmarks", "results", "gpu_check_work"))
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # fairseq's INFO lines go to OUT's .log only (the console gets the stages and the table)
    log = os.path.splitext(os.path.abspath(args.out))[0] + ".log"
    logging.basicConfig(level=logging.INFO, handlers=[logging.FileHandler(log, mode="w")],
                        format="%(asctime)s | %(name)s | %(message)s", force=True)
    import fairseq_pdd
    from fairseq_pdd.cli import user_dir

    fairseq_pdd.register()  # fairseq's --user-dir import finds the package already imported
    args.user_dir = user_dir()
    start = time.perf_counter()
    stages = {}

    def stage(name, fn, *a):
        print(f"== {name} ({time.perf_counter() - start:.0f} s)", flush=True)
        t = time.perf_counter()
        result = fn(*a)
        stages[name] = time.perf_counter() - t
        return result

    def prepare():
        from fairseq_cli import preprocess

        raw = os.path.join(args.work, "raw")
        dictionary = write_corpus(raw, sizes)
        data = os.path.join(args.work, "data-bin")
        run_tool("fairseq-preprocess", preprocess.cli_main, [
            "--source-lang", "src", "--target-lang", "tgt", "--trainpref", f"{raw}/train", "--validpref", f"{raw}/valid",
            "--testpref", f"{raw}/test", "--destdir", data, "--srcdict", dictionary, "--joined-dictionary",
            "--workers", min(8, os.cpu_count() or 1)])
        return data

    data = stage("data", prepare)
    with open(os.path.join(data, "dict.tgt.txt")) as f:
        vocab = 4 + sum(1 for _ in f)
    teachers = stage("teachers", train_teachers, args, sizes, data)
    training = stage("training", train_students, args, sizes, data, teachers["checkpoints"])
    generate = stage("generate", bench_generate, args, sizes, data,
                     {"ensemble": ":".join(teachers["checkpoints"][-2:]), "student": training["student"]})
    criteria = stage("criteria", bench_criteria, args, sizes)
    report = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "data": {"vocab": vocab, "train_pairs": sizes["train"], "test_sentences": sizes["test"],
                 "max_tokens": sizes["max_tokens"], "model": sizes["model"]},
        "teachers": {k: v for k, v in teachers.items() if k != "checkpoints"} | {"members": len(teachers["checkpoints"])},
        "training": {k: v for k, v in training.items() if k != "student"},
        "criteria": criteria,
        "generate": generate,
        "stages_s": stages,
        "wall_s": time.perf_counter() - start,
    }
    report["table"] = table(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print("\n" + report["table"] + f"\nwrote {args.out}")
    if temporary:
        shutil.rmtree(args.work, ignore_errors=True)
    failed = [c for c in generate["checks"] if not c["identical"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
