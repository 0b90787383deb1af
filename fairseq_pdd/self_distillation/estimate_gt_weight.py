"""``python -m fairseq_pdd.self_distillation.estimate_gt_weight DATA --path-a0 A0.pt --path-a1 STEP0.pt``: choose ``a`` (fairseq glue).

Scores a held-out subset (``--subset valid``) teacher-forced with the step's ``a = 0`` student and
the ``a = 1`` student (the step-0 supervised model), and prints as JSON the ground-truth weight
chosen by :mod:`fairseq_pdd.self_distillation.gt_weight`: NLL-optimal (``--method nll``, default) or Brier-optimal
(``--method brier``), with the held-out objective at the chosen ``a``, at 0 and at 1.

The task is set up from the ``a = 0`` student's checkpoint with ``DATA`` as its data, so any task
works (translation, speech); both checkpoints are loaded weights-only and refused if their
dictionaries differ from the data's (:func:`fairseq_pdd.teachers.ensemble.load_teacher`).
"""
import argparse
import json
import sys
from dataclasses import asdict
from typing import Optional, Sequence

import torch
from fairseq import tasks, utils
from omegaconf import OmegaConf, open_dict

import fairseq_pdd
from fairseq_pdd.teachers.checkpoints import load_checkpoint
from fairseq_pdd.self_distillation.gt_weight import BrierStatistics, nll_optimal_weight
from fairseq_pdd.teachers.ensemble import TeacherError, load_teacher

# fairseq's --user-dir import finds this package already imported (by this module), so register here.
fairseq_pdd.register()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="the fairseq data directory (binarised) of the held-out subset")
    parser.add_argument("--path-a0", required=True, help="the a = 0 student of this step (trained on the teacher alone)")
    parser.add_argument("--path-a1", required=True, help="the a = 1 student: the step-0 supervised model")
    parser.add_argument("--method", choices=("nll", "brier"), default="nll")
    parser.add_argument("--subset", default="valid", help="held-out subset to choose a on (default: valid)")
    parser.add_argument("--max-tokens", type=int, default=4000)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    return parser


def setup_task(path: str, data: str):
    """The task saved in ``path``'s checkpoint, reading ``data`` and no teacher cache (only the two
    students are scored). Its options are a config (translation, ``distillation``) or, for a legacy
    argparse task (``speech_to_text``, ``asr_distillation``), a ``Namespace``."""
    cfg = load_checkpoint(path).get("cfg")
    if cfg is None:
        raise TeacherError(f"{path} has no 'cfg' (a checkpoint from a very old fairseq?)")
    task_cfg = OmegaConf.create(cfg)["task"] if isinstance(cfg, dict) else cfg.task
    overrides = {"data": data, **({"teacher_cache": ""} if "teacher_cache" in task_cfg else {})}
    if isinstance(task_cfg, argparse.Namespace):
        task_cfg = argparse.Namespace(**{**vars(task_cfg), **overrides})
    else:
        with open_dict(task_cfg):
            task_cfg.update(overrides)
    return tasks.setup_task(task_cfg)


@torch.inference_mode()
def estimate(args) -> dict:
    task = setup_task(args.path_a0, args.data)
    use_cuda = torch.cuda.is_available() and not args.cpu
    models = [load_teacher(p, task) for p in (args.path_a0, args.path_a1)]
    if use_cuda:
        models = [m.cuda() for m in models]
    task.load_dataset(args.subset, combine=False, epoch=1)
    batches = task.get_batch_iterator(
        dataset=task.dataset(args.subset),
        max_tokens=args.max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), *[m.max_positions() for m in models]),
        ignore_invalid_inputs=False,
        seed=1,
        num_workers=0,
    ).next_epoch_itr(shuffle=False)
    pad = task.target_dictionary.pad()
    gold, brier = ([], []), BrierStatistics()
    for sample in batches:
        sample = utils.move_to_cuda(sample) if use_cuda else sample
        mask = sample["target"].ne(pad)
        target = sample["target"][mask]
        logits = [m(**sample["net_input"])[0][mask] for m in models]
        if args.method == "brier":
            brier.add(*(torch.softmax(x, -1, dtype=torch.float32) for x in logits), target)
        else:
            for out, x in zip(gold, logits):
                lp = torch.log_softmax(x, -1, dtype=torch.float32)
                out.append(lp.gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu())
    if args.method == "brier":
        result = brier.estimate()
    else:
        result = nll_optimal_weight(torch.cat(gold[0]).numpy(), torch.cat(gold[1]).numpy())
    return {"method": args.method, "subset": args.subset, "path_a0": args.path_a0, "path_a1": args.path_a1,
            **asdict(result)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(estimate(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
