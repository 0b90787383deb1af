"""Seed study of the toy demo's students: how much do BLEU and OOD detection move with the seed and
with the float order?

Trains the demo's teachers once (cached in ``--work-dir``), then one student per (criterion, seed,
thread count), decodes the in-domain test set and the two shifted sets (``unseen``: source words
never seen in training, ``perm``: permuted source words) with ``fairseq-pdd-generate`` and scores
them with ``fairseq-pdd-evaluate``. The thread count (``OMP_NUM_THREADS`` of the student's training
and decoding) changes the order of float reductions, the same kind of perturbation as another CPU.

Reported per (variant, criterion) over all seeds and thread counts: BLEU mean +- std (population
std), min and max, and the ROC-AUC of the sequence-level mutual information for each shifted set
(mean, min). A variant is a label plus extra ``fairseq-train`` options for the students (e.g.
``--variant offset0 --student-args "--model-offset 0"``), so settings can be compared on the same
teachers. Everything finished is skipped on a re-run; results go to ``WORK/results_<variant>.json``
(``_test<N>`` appended for another test size), which keeps the runs of earlier calls of the variant
(other seeds, thread counts or criteria) and summarises over all of them.

    python benchmarks/seed_study.py --work-dir runs/seed_study --seeds 1 2 3 4 5 --threads 1 2
"""
import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

from fairseq_pdd.data.toy_mt import TINY_TRAINING, TINY_TRANSFORMER

#: the demo's test set size (fairseq-pdd-toy-data's default)
TEST_SENTENCES = 100
CRITERIA = ("rkl_dirichlet_proxy_distillation", "forward_kl_mean_distillation")
#: decode subset -> name in the report (fairseq-preprocess names the extra test sets test1, test2)
SUBSETS = {"test": "test", "test1": "unseen", "test2": "perm"}
#: per-run numbers summarised over seeds and thread counts (besides the ROC-AUCs)
SUMMARISED = ("bleu", "length_ratio", "length_vs_ensemble", "p_eos_ref", "k_over_a0_ref")
DECODE = ["--beam", "5", "--nbest", "5", "--batch-size", "64", "--required-batch-size-multiple", "1",
          "--cpu", "--quiet", "--scoring", "sacrebleu", "--uncertainty-reference"]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, log_file, threads=1, nice=0):
    """Run ``cmd`` with OMP_NUM_THREADS=threads, output to ``log_file``; raise with the log's tail on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    with open(log_file, "w") as f:
        status = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if status:
        with open(log_file) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"command failed ({status}): {shlex.join(cmd)}\n{tail}")


def bin_dir(work):
    return os.path.join(work, "bin")


def prepare_data(args, python):
    raw, out = os.path.join(args.work_dir, "raw"), bin_dir(args.work_dir)
    if os.path.exists(os.path.join(out, "test2.src-tgt.tgt.idx")):
        return
    os.makedirs(raw, exist_ok=True)
    log("data")
    run([python, "-m", "fairseq_pdd.data.toy_mt", raw, "--seed", str(args.data_seed), "--ood", str(args.ood),
         "--test", str(args.test_sentences)]
        + shlex.split(args.data_args), os.path.join(args.work_dir, "data.log"))
    run([python, "-m", "fairseq_pdd.evaluation.ood_sets", "permute", "--source", f"{raw}/test.src",
         "--target", f"{raw}/test.tgt", "--out-source", f"{raw}/perm.src", "--out-target", f"{raw}/perm.tgt",
         "--seed", str(args.data_seed)], os.path.join(args.work_dir, "perm.log"))
    run([tool("fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt", "--trainpref", f"{raw}/train",
         "--validpref", f"{raw}/valid", "--testpref", f"{raw}/test,{raw}/ood,{raw}/perm", "--destdir", out,
         "--joined-dictionary", "--workers", "1"], os.path.join(args.work_dir, "preprocess.log"))


def tool(name):
    """A console script of this interpreter's environment (falls back to PATH)."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else name


def user_dir():
    import fairseq_pdd

    return os.path.dirname(fairseq_pdd.__file__)


def train(save_dir, extra, threads, nice, epochs, seed, args):
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    if os.path.exists(checkpoint):
        return checkpoint
    os.makedirs(save_dir, exist_ok=True)
    run([tool("fairseq-train"), bin_dir(args.work_dir), "--user-dir", user_dir()] + TINY_TRANSFORMER + TINY_TRAINING
        + ["--max-epoch", str(epochs), "--seed", str(seed), "--save-dir", save_dir, "--log-interval", "1000"]
        + extra, os.path.join(save_dir, "train.log"), threads, nice)
    return checkpoint


def decode_and_evaluate(name, path, out_dir, threads, nice, args):
    """Decode the three subsets into ``out_dir`` and return the system's report (dict)."""
    report_dir = os.path.join(out_dir, "report_" + "_".join(["test"] + args.shifted))
    report = os.path.join(report_dir, "report.json")
    if not os.path.exists(report):
        os.makedirs(out_dir, exist_ok=True)
        for subset, label in SUBSETS.items():
            if label != "test" and label not in args.shifted:
                continue
            out = os.path.join(out_dir, f"{label}.jsonl")
            if not os.path.exists(out):
                run([tool("fairseq-pdd-generate"), bin_dir(args.work_dir), "--user-dir", user_dir(), "--path", path,
                     "--gen-subset", subset, "--uncertainty-output", out + ".tmp"] + DECODE
                    + shlex.split(args.decode_args), os.path.join(out_dir, f"generate_{label}.log"), threads, nice)
                os.replace(out + ".tmp", out)
        shifted = [a for label in args.shifted for a in ("--ood", f"{label}={label}.jsonl")]
        run([tool("fairseq-pdd-evaluate"), "--system", f"{name}={out_dir}", "--in-domain", "test.jsonl", *shifted,
             "--task", "mt", "--nbest", "all",
             "--weighting", "bs", "--no-plots", "--out-dir", report_dir],
            os.path.join(out_dir, "evaluate.log"))
    with open(report) as f:
        return json.load(f)["systems"][name]


def option_label(options):
    """"" for no options, else "_" + the options with runs of other characters than [A-Za-z0-9.] as "_"."""
    label = re.sub(r"[^A-Za-z0-9.]+", "_", options).strip("_")
    return "_" + label if label else ""


def decode_dir(parent, args):
    """Decodes go to ``parent/decodes`` (``decodes_<options>`` with extra decoding options, ``_test<N>`` with
    another test set size), so cached decodes of other settings are never mistaken for these."""
    size = "" if args.test_sentences == TEST_SENTENCES else f"_test{args.test_sentences}"
    return os.path.join(parent, "decodes" + option_label(args.decode_args) + size)


def summary(system, measure):
    """BLEU, hypothesis/reference length ratio and the measure's OOD ROC-AUC per shifted set."""
    row = {"bleu": system["quality"]["bleu"]}
    for ood_set, by_measure in system["ood"].items():
        row[f"auc_{ood_set}"] = by_measure[measure]["roc_auc"]
    return row


def decode_lengths(out_dir):
    """On the in-domain test set: total top-hypothesis and reference length (tokens, EOS excluded), and the
    mean probability the system gives EOS at the end of the teacher-forced reference (``exp(-nll)`` at the
    last position of the rank -1 records, which ``--uncertainty-reference`` writes) and, for a Dirichlet
    student, the mean of ``(K - 1) / a0`` over the reference tokens (about the mass ``K * offset / a0`` that
    the model offset spreads over all classes of the mean ``alpha / a0``)."""
    hyp = ref = 0
    eos, spread = [], []
    with open(os.path.join(out_dir, "test.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record.get("rank") == 0:
                hyp += len(record["tokens"])
                ref += len(record["reference_tokens"])
            elif record.get("rank") == -1:
                eos.append(math.exp(-record["token"]["nll"][-1]))
                if record["model"] == "dirichlet":  # its token epkl is (K - 1) / a0
                    spread += record["token"]["epkl"]
    mean = lambda values: statistics.fmean(values) if values else float("nan")  # noqa: E731
    return {"hyp_tokens": hyp, "length_ratio": hyp / ref, "p_eos_ref": mean(eos), "k_over_a0_ref": mean(spread)}


def valid_nll(save_dir):
    """Validation NLL of the references (bits per token) of every epoch, from the training log (fairseq's
    simple format): ``nll_loss``, or ``loss`` for cross-entropy runs (which log no ``nll_loss``)."""
    values = []
    with open(os.path.join(save_dir, "train.log")) as f:
        for line in f:
            if "valid on 'valid' subset" in line:
                match = re.search(r"\| nll_loss ([0-9.eE+-]+)", line) or re.search(r"\| loss ([0-9.eE+-]+)", line)
                values.append(float(match.group(1)))
    return values


def stats(values):
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values), "max": max(values)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", required=True, help="teachers, students, decodes and results.json go here")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="student seeds")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="OMP_NUM_THREADS of each student's training and decoding (float-order perturbation)")
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA),
                   help="student criteria; cross_entropy trains a student of the same size on the references")
    p.add_argument("--variant", default="default", help="label of the students' extra options (--student-args)")
    p.add_argument("--student-args", default="", help="extra fairseq-train options of every student (one string)")
    p.add_argument("--decode-args", default="", help="extra fairseq-pdd-generate options (one string)")
    p.add_argument("--data-args", default="", help="extra fairseq-pdd-toy-data options (one string), e.g. a harder task")
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--student-epochs", type=int, default=12)
    p.add_argument("--data-seed", type=int, default=1, help="corpus seed; teacher m has seed data_seed + m")
    p.add_argument("--ood", type=int, default=200, help="sentences of the unseen-words set")
    p.add_argument("--test-sentences", type=int, default=TEST_SENTENCES,
                   help="in-domain test sentences (the permuted set is the same sentences permuted); the training "
                        "and validation data do not depend on it, so teachers and students can be shared with a work "
                        "dir of another test size")
    p.add_argument("--shifted", nargs="*", choices=("unseen", "perm"), default=["unseen", "perm"],
                   help="shifted test sets to decode and score (ROC-AUC against the in-domain test set)")
    p.add_argument("--measure", default="mutual_information", help="sequence measure for the OOD ROC-AUC")
    p.add_argument("--nice", type=int, default=10, help="niceness of the students' runs")
    p.add_argument("--skip-teachers-eval", action="store_true", help="do not decode the teachers and the ensemble")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    python = sys.executable
    prepare_data(args, python)
    teachers = []
    for m in range(1, args.teachers + 1):
        log(f"teacher {m}")
        teachers.append(train(os.path.join(args.work_dir, f"teacher{m}"), ["--criterion", "cross_entropy"],
                              args.threads[0], args.nice, args.teacher_epochs, args.data_seed + m, args))
    ensemble = ":".join(teachers)
    results = {"config": {k: v for k, v in vars(args).items()}, "reference": {}, "runs": [], "summary": {}}
    if not args.skip_teachers_eval:
        for name, path in [(f"teacher{m + 1}", t) for m, t in enumerate(teachers)] + [("ensemble", ensemble)]:
            log(f"decode {name}")
            out = os.path.join(decode_dir(args.work_dir, args), name)
            row = summary(decode_and_evaluate(name, path, out, args.threads[0], args.nice, args), args.measure)
            row.update(decode_lengths(out))
            if name != "ensemble":
                row["valid_nll"] = valid_nll(os.path.dirname(path))
            results["reference"][name] = row
        teacher_rows = [results["reference"][f"teacher{m}"] for m in range(1, args.teachers + 1)]
        results["reference"]["teachers_mean"] = {k: statistics.fmean(r[k] for r in teacher_rows)
                                                 for k in teacher_rows[0] if k != "valid_nll"}
    out_file = os.path.join(args.work_dir, f"results_{args.variant}{os.path.basename(decode_dir('', args))[len('decodes'):]}.json")
    earlier = read_results(out_file)
    results["reference"] = results["reference"] or earlier["reference"]
    ensemble_tokens = results["reference"].get("ensemble", {}).get("hyp_tokens")
    for criterion in args.criteria:
        for seed in args.seeds:
            for threads in args.threads:
                label = f"{args.variant}/{criterion}/seed{seed}_threads{threads}"
                log(f"student {label}")
                save = os.path.join(args.work_dir, "students", label)
                task = [] if criterion == "cross_entropy" else ["--task", "distillation", "--ensemble-paths", ensemble]
                checkpoint = train(save, task + ["--criterion", criterion] + shlex.split(args.student_args),
                                   threads, args.nice, args.student_epochs, seed, args)
                out = decode_dir(save, args)
                row = summary(decode_and_evaluate("student", checkpoint, out, threads, args.nice, args), args.measure)
                row.update(seed=seed, threads=threads, criterion=criterion, **decode_lengths(out))
                if ensemble_tokens:
                    row["length_vs_ensemble"] = row["hyp_tokens"] / ensemble_tokens
                row["valid_nll"] = valid_nll(save)
                results["runs"].append(row)
                log(f"  {json.dumps(row)}")
    merge_earlier_calls(results, earlier)
    with open(out_file, "w") as f:
        json.dump(results, f, indent=1)
    print_table(results)
    log(f"results: {out_file}")


def run_key(row):
    return row["criterion"], row["seed"], row["threads"]


def read_results(out_file):
    """The results file of earlier calls of this variant and test size (empty if none)."""
    if not os.path.exists(out_file):
        return {"reference": {}, "runs": []}
    with open(out_file) as f:
        return json.load(f)


def merge_earlier_calls(results, earlier):
    """Keep the runs of ``earlier`` (earlier calls of the same variant and test size: other seeds, thread counts
    or criteria) that this call did not redo, then summarise every criterion over all its runs (the numbers
    every run has)."""
    redone = {run_key(row) for row in results["runs"]}
    results["runs"] = [row for row in earlier["runs"] if run_key(row) not in redone] + results["runs"]
    for criterion in dict.fromkeys(row["criterion"] for row in results["runs"]):
        rows = [row for row in results["runs"] if row["criterion"] == criterion]
        keys = [k for k in rows[0] if (k in SUMMARISED or k.startswith("auc_")) and all(k in r for r in rows)
                and not any(math.isnan(r[k]) for r in rows)]
        results["summary"][criterion] = {k: stats([r[k] for r in rows]) for k in keys}


def print_table(results):
    for name, row in results["reference"].items():
        print(f"{name:36s} BLEU {row['bleu']:6.2f}  len {row['length_ratio']:.3f}  P(EOS) {row['p_eos_ref']:.3f}  "
              + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("auc_")))
    for criterion, s in results["summary"].items():
        vs_ensemble = f"  vs ens {s['length_vs_ensemble']['mean']:.3f}" if "length_vs_ensemble" in s else ""
        print(f"{results['config']['variant'] + ' ' + criterion:36s} BLEU {s['bleu']['mean']:6.2f} +- {s['bleu']['std']:5.2f}"
              f" [{s['bleu']['min']:.2f}, {s['bleu']['max']:.2f}]  len {s['length_ratio']['mean']:.3f}{vs_ensemble}"
              f"  P(EOS) {s['p_eos_ref']['mean']:.3f}"
              + (f"  (K-1)/a0 {s['k_over_a0_ref']['mean']:.4f}  " if "k_over_a0_ref" in s else "  ")
              + "  ".join(f"{k} {v['mean']:.3f} (min {v['min']:.3f})" for k, v in s.items() if k.startswith("auc_")))


if __name__ == "__main__":
    main()
