"""``python -m fairseq_pdd.bdistil.cli``: the small steps of building a progressive ensemble.

* ``accept LOG --gamma G``: the acceptance rule on the last ``valid on`` line of a ``fairseq-train`` or
  ``fairseq-validate`` log of ``--criterion bdistil_residual_kd``: accept member k iff its weighted
  edge >= G and its unweighted KL to the teacher does not exceed its prefix's. Prints JSON; exit
  status 0 if accepted, 3 if not.
* ``metrics LOG``: that line's numbers as JSON.
* ``assemble OUT M1.pt M2.pt ... [--combine mean]``: a ``bdistil_*`` checkpoint of existing members
  without training (e.g. independently trained members, combined by a logit average), which
  ``fairseq-generate`` / ``fairseq-validate`` then decode or score with any prefix k.
* ``params CKPT [--prefix K]``: the number of parameters (tied weights counted once) of a checkpoint,
  or of the first K members of a ``bdistil_*`` checkpoint.
"""
import argparse
import copy
import json
import re
import sys
from typing import Dict, List

import torch

import fairseq_pdd
from fairseq_pdd.bdistil import boosting
from fairseq_pdd.teachers.checkpoints import load_raw_checkpoint
from fairseq_pdd.models.bdistil import COMBINES
from fairseq_pdd.models.bdistil_members import BDISTIL_ARCHS, MemberError, split_members

# fairseq's --user-dir import finds this package already imported (by this module), so register here.
fairseq_pdd.register()

_NUMBER = re.compile(r"\|\s*([A-Za-z_0-9]+) (-?[\d.]+(?:e-?\d+)?)\b")


def last_valid_metrics(log: str) -> Dict[str, float]:
    """The numbers of the last ``valid on '<subset>' subset`` line of a fairseq log."""
    lines = [line for line in log.splitlines() if "valid on '" in line]
    if not lines:
        raise ValueError("no \"valid on '<subset>'\" line in the log (did fairseq-train/validate finish?)")
    return {key: float(value) for key, value in _NUMBER.findall(lines[-1].split("subset", 1)[1])}


def acceptance(metrics: Dict[str, float], gamma: float, tolerance: float = 0.0) -> boosting.Acceptance:
    missing = [k for k in ("edge", "kl_teacher", "kl_prefix") if k not in metrics]
    if missing:
        raise ValueError(f"the log's last validation line lacks {missing}: was it --criterion bdistil_residual_kd?")
    return boosting.accept(metrics["edge"], metrics["kl_teacher"], metrics["kl_prefix"], gamma, tolerance)


def _model_cfg_get(model_cfg, key, default=None):
    return model_cfg.get(key, default) if isinstance(model_cfg, dict) else getattr(model_cfg, key, default)


def _model_cfg_set(model_cfg, **values) -> None:
    for key, value in values.items():
        if isinstance(model_cfg, dict):
            model_cfg[key] = value
        else:
            setattr(model_cfg, key, value)


def newest_member_weights(state: dict, path: str) -> Dict[str, torch.Tensor]:
    """The newest member of a checkpoint, keys ``encoder.*``, ``decoder.*``, ``connection.*``."""
    arch = _model_cfg_get(state["cfg"]["model"], "_name") or _model_cfg_get(state["cfg"]["model"], "arch")
    if arch in BDISTIL_ARCHS:
        return split_members(state["model"])[-1]
    if not all(k.startswith(("encoder.", "decoder.")) for k in state["model"]):
        raise MemberError(f"{path} is not an encoder-decoder checkpoint (its weights are not all under encoder./decoder.)")
    return dict(state["model"])


def assemble(out: str, paths: List[str], combine: str) -> None:
    """Write ``out``: members ``paths`` (newest member of each), the last one's configuration."""
    if len(paths) < 1:
        raise ValueError("assemble needs at least one member checkpoint")
    states = [load_raw_checkpoint(p) for p in paths]
    weights = {}
    for j, (state, path) in enumerate(zip(states, paths)):
        for key, value in newest_member_weights(state, path).items():
            part, rest = key.split(".", 1)
            prefix = {"encoder": "encoder.members", "decoder": "decoder.members", "connection": "decoder.connections"}[part]
            weights[f"{prefix}.{j}.{rest}"] = value
    result = dict(states[-1])
    result["cfg"] = copy.deepcopy(states[-1]["cfg"])
    model_cfg = result["cfg"]["model"]
    arch = _model_cfg_get(model_cfg, "_name") or _model_cfg_get(model_cfg, "arch")
    if arch not in BDISTIL_ARCHS:
        arch = f"bdistil_{arch}"
        if arch not in BDISTIL_ARCHS:
            raise MemberError(f"{paths[-1]}: no registered bdistil architecture for its members ({arch})")
    _model_cfg_set(
        model_cfg, _name=arch, arch=arch, bdistil_members=":".join(paths[:-1]), bdistil_prefix=0,
        bdistil_combine=combine, bdistil_connection="last-hidden" if "connection.weight" in newest_member_weights(states[-1], paths[-1]) else "none",
    )
    result["model"] = weights
    result["args"] = None
    torch.save(result, out)


def count_parameters(path: str, prefix: int = 0) -> int:
    """Parameters of a checkpoint (or of the first ``prefix`` members of a bdistil one); tied weights once."""
    state = load_raw_checkpoint(path)
    arch = _model_cfg_get(state["cfg"]["model"], "_name") or _model_cfg_get(state["cfg"]["model"], "arch")
    if arch in BDISTIL_ARCHS:
        members = split_members(state["model"])
        if prefix > len(members):
            raise MemberError(f"{path} has {len(members)} members, not {prefix}")
        tensors = [t for m in members[: prefix or len(members)] for k, t in m.items() if not k.endswith(".version")]
    else:
        tensors = [t for k, t in state["model"].items() if not k.endswith(".version")]
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairseq_pdd.bdistil.cli", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("accept", help="the acceptance rule on a validation log")
    p.add_argument("log")
    p.add_argument("--gamma", type=float, default=0.02, help="minimum weighted edge")
    p.add_argument("--tolerance", type=float, default=0.0, help="allowed rise of the unweighted KL")
    p = sub.add_parser("metrics", help="the last validation line of a log as JSON")
    p.add_argument("log")
    p = sub.add_parser("assemble", help="a bdistil checkpoint of existing members, without training")
    p.add_argument("out")
    p.add_argument("members", nargs="+")
    p.add_argument("--combine", choices=COMBINES, default="mean")
    p = sub.add_parser("params", help="number of parameters")
    p.add_argument("checkpoint")
    p.add_argument("--prefix", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command in ("accept", "metrics"):
        with open(args.log) as f:
            metrics = last_valid_metrics(f.read())
        if args.command == "metrics":
            print(json.dumps(metrics))
            return 0
        verdict = acceptance(metrics, args.gamma, args.tolerance)
        print(json.dumps(verdict.__dict__))
        return 0 if verdict.accepted else 3
    if args.command == "assemble":
        assemble(args.out, args.members, args.combine)
    else:
        print(count_parameters(args.checkpoint, args.prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
