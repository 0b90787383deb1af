"""Loading the frozen members of a progressive (B-DISTIL-style) ensemble from checkpoints (fairseq glue).

``--bdistil-members r1.pt:r2.pt:...`` lists one checkpoint per earlier round. Member j is the
*newest* member of checkpoint j: for a checkpoint of a ``bdistil_*`` model with n members that is
member n (its weights under ``encoder.members.{n-1}``, ``decoder.members.{n-1}`` and, if it was
trained with a connection, ``decoder.connections.{n-1}``); any other fairseq encoder-decoder
checkpoint is a member as a whole. Checks, each failing with :class:`MemberError` naming the file:
the file exists and loads weights-only; its dictionaries are the task's; a checkpoint trained as
member n > 1 is listed at position n, on top of the same n - 1 earlier members (compared tensor by
tensor); its connection fits the previous member's feature size.
"""
import contextlib
import copy
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from fairseq.models import build_model
from omegaconf import OmegaConf, open_dict

from fairseq_pdd.teachers.checkpoints import load_checkpoint
from fairseq_pdd.teachers.ensemble import TeacherError, check_checkpoint_dictionaries

#: Registered ``bdistil_*`` architectures -> the architecture of their members.
BDISTIL_ARCHS: Dict[str, str] = {}

_MEMBER_KEY = re.compile(r"^(encoder\.members|decoder\.members|decoder\.connections)\.(\d+)\.(.*)$")
_PLAIN = {"encoder.members": "encoder.", "decoder.members": "decoder.", "decoder.connections": "connection."}


class MemberError(TeacherError):
    """A member checkpoint is missing or does not fit the ensemble it is listed in."""


@dataclass
class LoadedMember:
    """One member: its encoder-decoder model and, if it has one, its connection."""

    path: str
    model: torch.nn.Module
    #: the stored weights of its connection from the previous member's features, if it has one
    connection_weights: Optional[Dict[str, torch.Tensor]]
    #: the weights (model keys) of the earlier members it was trained on top of, in order
    earlier: List[Dict[str, torch.Tensor]]
    #: the connection, once checked against the previous member (:func:`load_members`)
    connection: Optional[torch.nn.Linear] = None


def split_members(weights: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    """A ``bdistil_*`` state dict -> one dict per member with keys ``encoder.*``, ``decoder.*``, ``connection.*``."""
    members: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        match = _MEMBER_KEY.match(key)
        if match:
            part, index, rest = match.groups()
            members.setdefault(int(index), {})[_PLAIN[part] + rest] = value
    return [members[i] for i in sorted(members)]


def member_cfg(model_cfg, member_arch: str):
    """A copy of a ``bdistil_*`` model config that builds its newest member's architecture."""
    cfg = copy.deepcopy(model_cfg)
    with open_dict(cfg) if OmegaConf.is_config(cfg) else contextlib.nullcontext():
        cfg._name = member_arch
        cfg.arch = member_arch
    return cfg


def load_member(path: str, task, position: int) -> LoadedMember:
    """Member ``position`` (1-based) of an ensemble, from ``path``, built against ``task``."""
    state = load_checkpoint(path)
    cfg = state.get("cfg")
    if cfg is None:
        raise MemberError(f"member {position} checkpoint {path} has no 'cfg' (a checkpoint from a very old fairseq?)")
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    arch = getattr(cfg.model, "_name", None) or getattr(cfg.model, "arch", None)
    if arch in BDISTIL_ARCHS:
        parts = split_members(state["model"])
        *earlier, own = parts
        if len(parts) > 1 and len(parts) != position:
            raise MemberError(
                f"{path} was trained as member {len(parts)} of its ensemble but is listed as member "
                f"{position} in --bdistil-members; list the rounds' checkpoints in order"
            )
        weights = {k: v for k, v in own.items() if not k.startswith("connection.")}
        connection = {k[len("connection."):]: v for k, v in own.items() if k.startswith("connection.")}
        model_cfg = member_cfg(cfg.model, BDISTIL_ARCHS[arch])
    else:
        earlier, weights, connection, model_cfg = [], state["model"], {}, cfg.model
    check_checkpoint_dictionaries(path, cfg, weights, task, who=f"member {position}")
    model = build_model(model_cfg, task)
    if arch in BDISTIL_ARCHS:
        # an ensemble stores its members' encoders and decoders only; buffers of the member model
        # itself (the VGG-Transformer's input_feat_per_channel) follow from the member's configuration
        own_buffers = {k: v for k, v in model.state_dict().items() if not k.startswith(("encoder.", "decoder."))}
        weights = {**own_buffers, **weights}
    try:
        model.load_state_dict(weights, strict=True, model_cfg=model_cfg)
    except RuntimeError as e:
        raise MemberError(f"member {position} checkpoint {path} does not fit its architecture: {e}") from e
    return LoadedMember(path, model, connection or None, earlier)


def check_same_earlier_members(member: LoadedMember, position: int, listed: List[Dict[str, torch.Tensor]]) -> None:
    """Member ``position`` must have been trained on top of exactly the members listed before it."""
    for j, (trained_on, given) in enumerate(zip(member.earlier, listed), start=1):
        same = trained_on.keys() == given.keys() and all(
            trained_on[k].shape == given[k].shape and torch.equal(trained_on[k].to(given[k].device), given[k])
            for k in trained_on
        )
        if not same:
            raise MemberError(
                f"member {position} ({member.path}) was trained on top of a different member {j} "
                "than the one listed in --bdistil-members; list the checkpoints of the same run, in order"
            )


def load_members(paths: List[str], task) -> List[LoadedMember]:
    """All listed members, in order, with the checks above; connections become checked ``Linear`` layers."""
    members: List[LoadedMember] = []
    for position, path in enumerate(paths, start=1):
        member = load_member(path, task, position)
        if member.connection_weights is not None:
            member.connection = check_connection(member, position, members[-1] if members else None)
        check_same_earlier_members(member, position, [member_state(m) for m in members])
        members.append(member)
    return members


def feature_size(decoder: torch.nn.Module, position: int, path: str) -> int:
    """The size of a member decoder's final features, which a connection reads or writes."""
    size = getattr(decoder, "output_embed_dim", None)
    if size is None or not hasattr(decoder, "extract_features") or not hasattr(decoder, "output_layer"):
        raise MemberError(
            f"member {position} ({path}): its decoder ({type(decoder).__name__}) has no "
            "extract_features/output_layer/output_embed_dim, which --bdistil-connection last-hidden needs"
        )
    return int(size)


def check_connection(member: LoadedMember, position: int, previous: Optional[LoadedMember]) -> torch.nn.Linear:
    """A stored connection into member ``position`` must map the previous member's features to its own."""
    weights = member.connection_weights
    out_dim, in_dim = weights["weight"].shape
    if previous is None:
        raise MemberError(f"member {position} ({member.path}) has a connection but there is no earlier member to read from")
    have = feature_size(previous.model.decoder, position - 1, previous.path)
    own = feature_size(member.model.decoder, position, member.path)
    if (in_dim, out_dim) != (have, own):
        raise MemberError(
            f"connection size mismatch: member {position} ({member.path}) has a last-hidden connection of size "
            f"{in_dim} -> {out_dim}, but member {position - 1} ({previous.path}) gives {have} features and "
            f"member {position} has {own} (were the members listed from another run?)"
        )
    linear = torch.nn.Linear(in_dim, out_dim, bias="bias" in weights)
    linear.load_state_dict(weights)
    return linear


def member_state(member: LoadedMember) -> Dict[str, torch.Tensor]:
    """A member's weights as stored by a ``bdistil_*`` checkpoint (``encoder.*``, ``decoder.*``, ``connection.*``)."""
    state = {k: v for k, v in member.model.state_dict().items() if k.startswith(("encoder.", "decoder."))}
    if member.connection is not None:
        state.update({"connection." + k: v for k, v in member.connection.state_dict().items()})
    return state
