"""Does a distillation objective prefer a good mean or the collapse? Scores fixed Dirichlets on a split.

Teacher-forced on a binarised split at T = 1, the EnD2 loss (``sequence_distribution_distillation``) and the
forward KL to the proxy (``dirichlet_proxy_distillation``), in bits per target token, of:

- ``flat``: all ``f(z) = 0``, i.e. ``alpha = model_offset`` for every class (the collapse with offset 1);
- ``ensemble mean``: ``alpha = s * pbar + model_offset`` with the ensemble's own mean pbar and the common
  precision s of a grid that scores best (what a student that knows the mean exactly can reach with one
  precision for all tokens);
- each ``--students`` checkpoint, its logits used as they are (``--model-offset`` and ``--parametrization``
  exp must be the student's).

With the teachers' statistics smoothed by ``--teacher-smoothing`` and the proxy precision capped by
``--max-target-precision``, as the task and criterion options do. The numbers behind docs/errors.md,
"EnD2 and the forward KL to the proxy from scratch":

    python benchmarks/objective_probe.py DATA_BIN --teachers T1:T2:T3 --students S1 S2 --model-offset 1
"""
import argparse
import json
import math

import torch

import fairseq_pdd
from fairseq import tasks
from fairseq_pdd.distill import losses
from fairseq_pdd.distill.dirichlet import proxy_precision
from fairseq_pdd.distill.ensemble_stats import EnsembleAccumulator
from fairseq_pdd.teachers.checkpoints import load_checkpoint
from fairseq_pdd.teachers.ensemble import load_teacher
from student_diagnostics import batches

#: common precisions tried for the ensemble-mean Dirichlet
PRECISIONS = (1, 3, 10, 30, 100, 300, 1e3, 1e4, 1e5, 1e6)


def setup_task(data, checkpoint):
    cfg = load_checkpoint(checkpoint)["cfg"]
    cfg["task"]["data"] = data
    cfg["task"]["_name"] = "translation"
    from omegaconf import OmegaConf

    return tasks.setup_task(OmegaConf.create(cfg["task"]))


@torch.no_grad()
def collect(task, teachers, students, subset, smoothing):
    """(mean_probs, mean_log_probs, mkl, epkl) of the ensemble and each student's logits, over the split."""
    stats, logits = [], [[] for _ in students]
    for sample in batches(task, subset, max_tokens=4000):
        mask = sample["target"].ne(task.target_dictionary.pad())
        acc = EnsembleAccumulator()
        for model in teachers:
            acc.add_logits(model(**sample["net_input"])[0][mask], smoothing=smoothing)
        s = acc.finalize()
        stats.append((s.mean_probs.clone(), s.mean_log_probs.clone(), s.mkl, s.epkl))
        for out, model in zip(logits, students):
            out.append(model(**sample["net_input"])[0][mask].float())
    return [torch.cat(x) for x in zip(*stats)], [torch.cat(x) for x in logits]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--teachers", required=True, help="colon-separated teacher checkpoints")
    p.add_argument("--students", nargs="*", default=[], help="Dirichlet student checkpoints (exp parametrization)")
    p.add_argument("--subset", default="valid")
    p.add_argument("--model-offset", type=float, default=1.0)
    p.add_argument("--target-offset", type=float, default=1.0)
    p.add_argument("--teacher-smoothing", type=float, default=0.0)
    p.add_argument("--max-target-precision", type=float, default=0.0)
    args = p.parse_args(argv)
    fairseq_pdd.register()
    paths = args.teachers.split(":")
    task = setup_task(args.data, paths[0])
    teachers = [load_teacher(t, task) for t in paths]
    students = [load_teacher(s, task) for s in args.students]
    (pbar, mlog, mkl, epkl), logits = collect(task, teachers, students, args.subset, args.teacher_smoothing)
    beta0 = proxy_precision(mkl, epkl, pbar.shape[-1], "mkl", args.max_target_precision)
    offset = args.model_offset

    def scores(z):
        end2 = losses.dirichlet_nll_loss(z, mlog, "exp", offset)[0].mean().item()
        fkl = losses.fkl_proxy_loss(z, pbar, beta0, args.target_offset, "exp", offset)[0].mean().item()
        return {"end2": end2 / math.log(2), "fkl_proxy": fkl / math.log(2)}

    report = {"tokens": int(pbar.shape[0]), "flat": scores(torch.full_like(pbar, -80.0))}
    mean = {s: scores(torch.log(s * pbar).clamp(min=-80.0)) for s in PRECISIONS}
    report["ensemble_mean"] = {loss: min((v[loss], s) for s, v in mean.items()) for loss in ("end2", "fkl_proxy")}
    report["ensemble_mean"] = {loss: {"bits": b, "precision": s} for loss, (b, s) in report["ensemble_mean"].items()}
    report["students"] = {path: scores(z) for path, z in zip(args.students, logits)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
