#!/usr/bin/env python
"""Overhead of ``fairseq-pdd-generate`` over plain ``fairseq-generate``: same data, same models, same options.

One run:

1. unless ``--data``/``--ensemble``/``--student`` are given, builds the toy corpus
   (:func:`fairseq_pdd.data.toy_mt.write_corpus`, ``--test`` sentences in the test split, default 1000),
   binarises it (subset ``test``, plus subset ``test1`` = the first test sentence alone), trains two tiny
   Transformer teachers with ``fairseq-train`` and a tiny PD-EnD2 student with ``--task distillation``;
2. times, in subprocesses with ``OMP_NUM_THREADS=1``, wall clock, ``--repeats`` rounds that visit every
   configuration in turn (so a change of machine load hits all of them alike):

   * for the ensemble (both teachers, ``--path a:b``) and the student (one Dirichlet checkpoint),
   * with ``--nbest 1`` and ``--nbest 5`` (beam 5),
   * ``plain``: ``fairseq-generate``; ``pdd``: ``fairseq-pdd-generate`` (default ``--uncertainty-from
     beam``: measures computed inside the beam search); ``pdd+ref``: the same with
     ``--uncertainty-reference`` (forced-decoded references too); ``pdd-rescore``: ``--uncertainty-from
     rescore`` (the n-best lists re-scored teacher-forced after decoding);

   each on subset ``test`` and, once per (tool, model) and round, on the 1-sentence subset ``test1``:
   the *start-up* cost (Python and fairseq imports, hydra config, checkpoint loading, data loading),
   which is the same whatever the test set's size.
3. reports, per configuration, the medians of: the wall time; fairseq's own generation time (the
   ``Translated N sentences (T tokens) in Xs (S sentences/s ...)`` line, taken as N / S for precision;
   for ``fairseq-pdd-generate`` it includes the measures, the re-scoring and the JSONL writing, which run inside
   fairseq's timed ``inference_step``); and the *net* time = wall - start-up of the same tool and model.
   Ratios pdd / plain are given for all three. Writes ``--out`` (JSON) and prints a table.

All decodes use ``--cpu --batch-size 64 --required-batch-size-multiple 1 --quiet --scoring sacrebleu`` (with
fairseq's default multiple of 8 the last batch is cut to a multiple of 8 and some sentences are never
decoded). ``--quiet`` keeps fairseq's per-sentence printing out of both; ``fairseq-pdd-generate`` still
writes its JSONL.

Run from the repository root: ``.venv/bin/python benchmarks/bench_generate.py`` (CPU, ~12 minutes with
the defaults; ``--repeats 1 --test 200`` for a smoke run).
"""
import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from fairseq_pdd.cli import user_dir  # noqa: E402
from fairseq_pdd.data.toy_mt import TINY_TRAINING, TINY_TRANSFORMER, write_corpus  # noqa: E402

BIN = os.path.dirname(sys.executable)
VARIANTS = {  # name -> (tool, extra options)
    "plain": ("fairseq-generate", []),
    "pdd": ("fairseq-pdd-generate", []),
    "pdd+ref": ("fairseq-pdd-generate", ["--uncertainty-reference"]),
    "pdd-rescore": ("fairseq-pdd-generate", ["--uncertainty-from", "rescore"]),
}
TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s")
BLEU = re.compile(r"BLEU = ([\d.]+)")


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(tool, args, cwd):
    """Run a venv console script; return (wall seconds, stdout + stderr). Fails loudly."""
    start = time.perf_counter()
    proc = subprocess.run([os.path.join(BIN, tool), *map(str, args)], cwd=cwd, env=env(),
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{tool} {' '.join(map(str, args))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return wall, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------- setup


def build(args):
    """Toy corpus, binarised data, two teachers and a PD-EnD2 student under ``args.work`` (resumable)."""
    work = args.work
    raw, data = os.path.join(work, "raw"), os.path.join(work, "bin")
    if not os.path.exists(os.path.join(data, "test1.src-tgt.src.idx")):
        write_corpus(raw, {"train": args.train, "valid": 100, "test": args.test}, seed=args.seed)
        for side in ("src", "tgt"):  # the 1-sentence start-up subset: the first test sentence
            with open(os.path.join(raw, f"test.{side}")) as f, open(os.path.join(raw, f"one.{side}"), "w") as g:
                g.write(f.readline())
        shutil.rmtree(data, ignore_errors=True)
        print("preprocess", flush=True)
        run("fairseq-preprocess",
            ["--source-lang", "src", "--target-lang", "tgt", "--trainpref", f"{raw}/train",
             "--validpref", f"{raw}/valid", "--testpref", f"{raw}/test,{raw}/one", "--destdir", data,
             "--joined-dictionary", "--workers", "1"], work)
    teachers = []
    for seed in (1, 2):
        save = os.path.join(work, f"teacher{seed}")
        ck = os.path.join(save, "checkpoint_last.pt")
        if not os.path.exists(ck):
            print(f"train teacher {seed} ({args.teacher_epochs} epochs)", flush=True)
            run("fairseq-train", [data, "--user-dir", user_dir(), *TINY_TRANSFORMER, *TINY_TRAINING, *args.model_args,
                                  "--save-dir", save, "--criterion", "cross_entropy",
                                  "--max-epoch", args.teacher_epochs, "--seed", seed], work)
        teachers.append(ck)
    save = os.path.join(work, "student")
    student = os.path.join(save, "checkpoint_last.pt")
    if not os.path.exists(student):
        print(f"train PD-EnD2 student ({args.student_epochs} epochs)", flush=True)
        run("fairseq-train", [data, "--user-dir", user_dir(), *TINY_TRANSFORMER, *TINY_TRAINING, *args.model_args,
                              "--save-dir", save, "--task", "distillation", "--ensemble-paths", ":".join(teachers),
                              "--criterion", "rkl_dirichlet_proxy_distillation",
                              "--max-epoch", args.student_epochs, "--seed", 3], work)
    return data, ":".join(teachers), student


# --------------------------------------------------------------------------------------------- measure


def decode_args(data, subset, path, nbest, extra, jsonl, args):
    out = [data, "--user-dir", user_dir(), "--path", path, "--gen-subset", subset, "--beam", args.beam,
           "--nbest", nbest, "--batch-size", args.batch_size, "--required-batch-size-multiple", 1,
           "--scoring", "sacrebleu", "--cpu", "--quiet", *args.generate_args, *extra]
    if jsonl:
        out += ["--uncertainty-output", jsonl]
    return out


def parse(log):
    m = TRANSLATED.search(log)
    if not m:
        sys.exit(f"no 'Translated ...' line in:\n{log[-2000:]}")
    n, tokens, shown, rate = int(m.group(1).replace(",", "")), int(m.group(2).replace(",", "")), float(
        m.group(3)), float(m.group(4))
    b = BLEU.search(log)
    return {"sentences": n, "tokens": tokens, "gen_s": n / rate if rate > 0 else shown,
            "bleu": float(b.group(1)) if b else None}


def measure(args, data, models, startup_subset):
    """Round-robin over every configuration; returns {config name: record}."""
    out_dir = os.path.join(args.work, "decodes")
    os.makedirs(out_dir, exist_ok=True)
    jobs = []  # (name, model, nbest, variant, subset)
    for model in models:
        for nbest in args.nbest:
            for variant in args.variants:
                jobs.append((f"{model}/nbest{nbest}/{variant}", model, nbest, variant, "test"))
    if startup_subset:
        for model in models:
            for variant in ("plain", "pdd"):
                jobs.append((f"{model}/startup/{variant}", model, 1, variant, startup_subset))
    results = {name: {"model": model, "nbest": nbest, "variant": variant, "subset": subset, "tool": VARIANTS[variant][0],
                      "wall_s": [], "gen_s": [], "sentences": None, "tokens": None, "bleu": None, "jsonl_bytes": None}
               for name, model, nbest, variant, subset in jobs}
    for rnd in range(args.warmup + args.repeats):
        label = "warm-up" if rnd < args.warmup else f"round {rnd - args.warmup + 1}/{args.repeats}"
        print(f"{label}: {len(jobs)} decodes", flush=True)
        for name, model, nbest, variant, subset in jobs:
            tool, extra = VARIANTS[variant]
            jsonl = os.path.join(out_dir, name.replace("/", "_") + ".jsonl") if tool != "fairseq-generate" else None
            wall, log = run(tool, decode_args(data, subset, models[model], nbest, extra, jsonl, args), args.work)
            parsed = parse(log)
            rec = results[name]
            if rnd >= args.warmup:
                rec["wall_s"].append(wall)
                rec["gen_s"].append(parsed["gen_s"])
            rec.update(sentences=parsed["sentences"], tokens=parsed["tokens"], bleu=parsed["bleu"])
            if jsonl:
                rec["jsonl_bytes"] = os.path.getsize(jsonl)
                rec.update(hypothesis_lengths(jsonl))
    for rec in results.values():
        rec["wall_median_s"] = statistics.median(rec["wall_s"])
        rec["gen_median_s"] = statistics.median(rec["gen_s"])
        rec["wall_min_s"], rec["gen_min_s"] = min(rec["wall_s"]), min(rec["gen_s"])
    return results


def hypothesis_lengths(jsonl):
    """Mean and max length (tokens incl. EOS) of the n-best hypotheses in a fairseq-pdd-generate JSONL: the
    re-scoring pads every batch's hypotheses to its longest one."""
    lengths = []
    with open(jsonl) as f:
        for line in f:
            rec = json.loads(line)
            if rec["rank"] >= 0:
                lengths.append(rec["length"])
    return {"hyp_len_mean": sum(lengths) / len(lengths), "hyp_len_max": max(lengths)}


def summarise(results, models, nbests, variants, has_startup):
    """Per (model, nbest, pdd variant): medians and pdd / plain ratios (wall, fairseq's gen time, net)."""
    rows = []
    startup = {}
    for model in models:
        for variant in ("plain", "pdd"):
            rec = results.get(f"{model}/startup/{variant}")
            startup[(model, variant)] = rec["wall_median_s"] if rec else None
    for model in models:
        for nbest in nbests:
            plain = results[f"{model}/nbest{nbest}/plain"]
            p_net = plain["wall_median_s"] - startup[(model, "plain")] if has_startup else None
            for variant in [v for v in variants if v != "plain"]:
                rec = results[f"{model}/nbest{nbest}/{variant}"]
                net = rec["wall_median_s"] - startup[(model, "pdd")] if has_startup else None
                rows.append({
                    "model": model, "nbest": nbest, "variant": variant,
                    "plain_wall_s": plain["wall_median_s"], "pdd_wall_s": rec["wall_median_s"],
                    "wall_ratio": rec["wall_median_s"] / plain["wall_median_s"],
                    "plain_gen_s": plain["gen_median_s"], "pdd_gen_s": rec["gen_median_s"],
                    "gen_ratio": rec["gen_median_s"] / plain["gen_median_s"],
                    "plain_startup_s": startup[(model, "plain")], "pdd_startup_s": startup[(model, "pdd")],
                    "plain_net_s": p_net, "pdd_net_s": net,
                    "net_ratio": net / p_net if has_startup and p_net > 0 else None,
                    "plain_bleu": plain["bleu"], "pdd_bleu": rec["bleu"],
                    "sentences": rec["sentences"], "jsonl_bytes": rec["jsonl_bytes"],
                    "hyp_len_mean": rec["hyp_len_mean"], "hyp_len_max": rec["hyp_len_max"],
                })
    return rows


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows):
    head = ("model", "nbest", "variant", "wall plain", "wall pdd", "ratio", "gen plain", "gen pdd", "ratio",
            "net plain", "net pdd", "ratio", "BLEU plain/pdd", "hyp len mean/max")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"], str(r["nbest"]), r["variant"], fmt(r["plain_wall_s"]), fmt(r["pdd_wall_s"]),
            fmt(r["wall_ratio"]), fmt(r["plain_gen_s"]), fmt(r["pdd_gen_s"]), fmt(r["gen_ratio"]),
            fmt(r["plain_net_s"]), fmt(r["pdd_net_s"]), fmt(r["net_ratio"]),
            f"{fmt(r['plain_bleu'])}/{fmt(r['pdd_bleu'])}", f"{fmt(r['hyp_len_mean'], 1)}/{r['hyp_len_max']}",
        ]) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=os.path.join(REPO_ROOT, "benchmarks", "results", "generate_work"),
                   help="working directory for the corpus, models and decodes (re-used when it exists)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "generate.json"))
    p.add_argument("--data", help="binarised data (skips building); with --ensemble and --student")
    p.add_argument("--ensemble", help="colon-separated teacher checkpoints (with --data)")
    p.add_argument("--student", help="a Dirichlet student checkpoint (with --data)")
    p.add_argument("--startup-subset", default=None,
                   help="subset of --data with one (or a few) sentences, to measure the start-up cost "
                        "(default: test1 when the data is built here, none with --data)")
    p.add_argument("--test", type=int, default=1000, help="test sentences of the built corpus")
    p.add_argument("--train", type=int, default=2000, help="training sentences of the built corpus")
    p.add_argument("--model-args", default="", type=str.split,
                   help="training options appended to the tiny Transformer's (they win), e.g. "
                        "\"--encoder-embed-dim 256 --decoder-embed-dim 256 --encoder-layers 3 --decoder-layers 3\" "
                        "(use a new --work)")
    p.add_argument("--generate-args", default="", type=str.split,
                   help="options added to every decode of both tools, e.g. \"--max-len-a 0 --max-len-b 12\"")
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--student-epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--nbest", type=int, nargs="+", default=[1, 5])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="what to time (plain is always timed: the ratios' baseline)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (file caches)")
    args = p.parse_args(argv)
    args.variants = ["plain"] + [v for v in args.variants if v != "plain"]
    given = [args.data, args.ensemble, args.student]
    if any(given) and not all(given):
        p.error("--data, --ensemble and --student go together")
    if any(n > args.beam for n in args.nbest):
        p.error("--nbest values must not exceed --beam")
    return args


def main(argv=None):
    args = parse_args(argv)
    args.work = os.path.abspath(args.work)
    os.makedirs(args.work, exist_ok=True)
    start, load_start = time.time(), os.getloadavg()
    if args.data:
        # the decodes run in --work: absolute paths
        data, student = os.path.abspath(args.data), os.path.abspath(args.student)
        ensemble = ":".join(os.path.abspath(p) for p in args.ensemble.split(":"))
        startup_subset = args.startup_subset
    else:
        data, ensemble, student = build(args)
        startup_subset = args.startup_subset or "test1"
    models = {"ensemble": ensemble, "student": student}
    results = measure(args, data, models, startup_subset)
    rows = summarise(results, list(models), args.nbest, args.variants, bool(startup_subset))
    load = {"start": load_start, "end": os.getloadavg(), "cpus": os.cpu_count()}
    text = table(rows)
    print()
    print(text)
    print("\ntimes in seconds, medians over rounds; wall = whole process; gen = fairseq's 'Translated ... in Xs' "
          "(for pdd it includes re-scoring and JSONL writing); net = wall - start-up (the same tool and model "
          "on a 1-sentence subset); ratio = pdd / plain")
    print(f"load average (1, 5, 15 min) at start {load['start']}, at end {load['end']}, {load['cpus']} CPUs")
    if max(load["start"][0], load["end"][0]) > load["cpus"]:
        print("WARNING: other processes competed for the CPUs during the run; times are less reliable")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(data=data, ensemble=ensemble, student=student, startup_subset=startup_subset)
    import torch  # only for the versions in the report

    report = {
        "config": config,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": "OMP_NUM_THREADS=1, one decode at a time",
        "load_average": load,
        "results": results,
        "summary": rows,
        "table": text,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out} ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
