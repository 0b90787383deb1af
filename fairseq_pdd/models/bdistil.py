"""``--arch bdistil_transformer`` (translation) and ``bdistil_pdd_vggtransformer_*`` (speech): a progressive
ensemble whose first k members decode (fairseq glue).

The model holds members 1..K: the earlier ones loaded from ``--bdistil-members`` (one checkpoint per
earlier round, see :mod:`fairseq_pdd.models.bdistil_members`) and frozen, the newest one built from
the usual architecture options and trained (criterion ``bdistil_residual_kd``). Its checkpoint holds
every member's weights, so decoding needs no other file; the member checkpoints are still read to
rebuild their architectures and to check them.

Output: the first ``--bdistil-prefix k`` members (0 = all) combined as a product of experts,

    log p_k = log_softmax( sum_{j<=k} log_softmax(z_j) )       (``--bdistil-combine product``)

or as the average of their log-probabilities (``mean``: a logit average, for independently trained
members). Only those k members' encoders and decoders run. At decoding time the prefix is chosen
with ``fairseq-generate --model-overrides "{'bdistil_prefix': k}"``.

``--bdistil-connection last-hidden`` adds ``Linear(d_{k-1} -> d_k)`` of member k-1's final decoder
features (those its output layer reads) to member k's final decoder features, position by position.
In beam search every member keeps its own incremental state in the shared dictionary (keys are
per module), and :meth:`PrefixDecoder.reorder_incremental_state_scripting` reorders all of them,
so the members and the connections always see the same hypotheses.

``--bdistil-early-stop-confidence TAU`` (anytime decoding, also via ``--model-overrides``): each
hypothesis stops adding members at the first j whose product has ``max_v p > TAU`` and uses members
1..j for the rest of the sentence, as do the hypotheses extending it (a member dropped for a
hypothesis has no cached state for its later tokens, so it cannot rejoin). Member j then decodes
only the rows that still use it; :meth:`PrefixDecoder.early_stop_step` has the bookkeeping, and
teacher-forced scoring applies the same rule (:meth:`PrefixDecoder.early_stop_scores`).
"""
import logging
from typing import Dict, List, Optional

import torch
from torch import nn
from fairseq.models import (
    ARCH_CONFIG_REGISTRY,
    ARCH_MODEL_REGISTRY,
    FairseqEncoder,
    FairseqEncoderDecoderModel,
    FairseqIncrementalDecoder,
    register_model,
    register_model_architecture,
)

from fairseq_pdd.bdistil import boosting
from fairseq_pdd.bdistil.boosting import ProductOfExperts
from fairseq_pdd.models import vggtransformer  # noqa: F401  (registers the speech members' architectures)
from fairseq_pdd.models.bdistil_members import BDISTIL_ARCHS, MemberError, feature_size, load_members
from fairseq_pdd.teachers.ensemble import split_paths

logger = logging.getLogger(__name__)

COMBINES = ("product", "mean")
SPEECH_MEMBER_ARCHS = ("pdd_vggtransformer_tiny", "pdd_vggtransformer_2")
CONNECTIONS = ("none", "last-hidden")


class PrefixEncoder(FairseqEncoder):
    """Runs the first ``prefix`` members' encoders; the output is ``{"members": [out_1, ...]}``."""

    def __init__(self, dictionary, encoders: List[nn.Module], prefix: int):
        super().__init__(dictionary)
        self.members = nn.ModuleList(encoders)
        self.prefix = prefix

    def forward(self, src_tokens, src_lengths=None, **kwargs):
        return {"members": [enc(src_tokens, src_lengths=src_lengths, **kwargs) for enc in self.members[: self.prefix]]}

    def reorder_encoder_out(self, encoder_out, new_order):
        return {
            "members": [enc.reorder_encoder_out(out, new_order) for enc, out in zip(self.members, encoder_out["members"])]
        }

    def max_positions(self):
        return min(enc.max_positions() for enc in self.members[: self.prefix])


class PrefixDecoder(FairseqIncrementalDecoder):
    """Runs the first ``prefix`` members' decoders and combines their outputs (see the module doc).

    ``encoders`` (the same modules as the :class:`PrefixEncoder`'s, kept as a plain tuple so they
    are not registered twice) select the rows of a member's encoder output for early stopping.
    """

    def __init__(self, dictionary, decoders: List[nn.Module], connections: Dict[int, nn.Linear], prefix: int,
                 combine: str, encoders: List[nn.Module] = (), early_stop: Optional[float] = None):
        super().__init__(dictionary)
        self.members = nn.ModuleList(decoders)
        self.connections = nn.ModuleDict({str(j): c for j, c in connections.items()})
        self.prefix = prefix
        self.combine = combine
        self.member_encoders = tuple(encoders)
        self.early_stop = early_stop
        #: members run and hypothesis tokens decoded with early stopping, summed over calls
        self.early_stop_counts = {"members": 0, "tokens": 0}

    def _uses_features(self, j: int) -> bool:
        return str(j) in self.connections or str(j + 1) in self.connections

    def run_member(self, j: int, prev_output_tokens, encoder_out_j, incremental_state, previous):
        """Member ``j`` (0-based): ``(logits (B, T, V), extra, final features or None)``; ``previous``
        are member j-1's final features (for a connection into member j)."""
        decoder = self.members[j]
        if not self._uses_features(j):
            logits, extra = decoder(prev_output_tokens, encoder_out=encoder_out_j, incremental_state=incremental_state)
            return logits, extra, None
        features, extra = decoder.extract_features(
            prev_output_tokens, encoder_out=encoder_out_j, incremental_state=incremental_state
        )
        if str(j) in self.connections:
            features = features + self.connections[str(j)](previous)
        return decoder.output_layer(features), extra, features

    def member_outputs(self, prev_output_tokens, encoder_out, incremental_state=None):
        """Yields ``(logits (B, T, V), extra)`` of members 1..prefix, in order."""
        previous = None
        for j in range(self.prefix):
            enc = encoder_out["members"][j]
            logits, extra, previous = self.run_member(j, prev_output_tokens, enc, incremental_state, previous)
            yield logits, extra

    def combiner(self) -> ProductOfExperts:
        return ProductOfExperts(average=self.combine == "mean")

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, features_only=False, **kwargs):
        """``(log p_k (B, T, V), the first member's extra output)``; already normalised."""
        if features_only:
            raise NotImplementedError("a bdistil ensemble has no single feature output (features_only=True)")
        if self.early_stop is not None:
            if incremental_state is not None:
                return self.early_stop_step(prev_output_tokens, encoder_out, incremental_state)
            return self.early_stop_scores(prev_output_tokens, encoder_out)
        combined, first_extra = self.combiner(), None
        for j, (logits, extra) in enumerate(self.member_outputs(prev_output_tokens, encoder_out, incremental_state)):
            combined.add(logits)
            first_extra = extra if j == 0 else first_extra
        return combined.log_probs(), first_extra

    # early stopping ----------------------------------------------------------------------------
    def early_stop_scores(self, prev_output_tokens, encoder_out):
        """Teacher-forced ``log p`` (B, T, V) under the early-stopping rule (two passes over the members:
        first the members used per position, then the combination of exactly those)."""
        combined = self.combiner()
        first = None
        for j, (logits, _) in enumerate(self.member_outputs(prev_output_tokens, encoder_out), start=1):
            combined.add(logits)
            stop = boosting.confident(combined.log_probs(), self.early_stop)
            first = torch.where(stop, j, self.prefix) if first is None else torch.where(stop & first.eq(self.prefix), j, first)
        used = boosting.members_used(first, self.prefix)
        combined, out, first_extra = self.combiner(), None, None
        for j, (logits, extra) in enumerate(self.member_outputs(prev_output_tokens, encoder_out), start=1):
            combined.add(logits)
            log_probs = combined.log_probs()
            if out is None:
                out, first_extra = log_probs, extra
            else:
                out = torch.where(used.eq(j).unsqueeze(-1), log_probs, out)
        return out, first_extra

    def early_stop_step(self, prev_output_tokens, encoder_out, incremental_state):
        """One beam-search step with early stopping (``log p`` (B, 1, V), member 1's extra output).

        ``used`` (B,), kept in the incremental state, is the number of members hypothesis row b
        still uses (``prefix`` at the start). At this step the members run one after the other, each
        on the rows that use it and are not yet confident (``max_v p > early_stop`` for the members
        so far); a row confident after member j uses members 1..j from now on (the rule of
        :func:`fairseq_pdd.bdistil.boosting.members_used`). Member j's incremental state therefore holds
        exactly the rows with ``used >= j``, in row order; before it runs, the rows that stopped
        earlier in this step are dropped from it, and :meth:`reorder_incremental_state_scripting`
        maps the beam's reordering onto it.
        """
        state = self.get_incremental_state(incremental_state, "early_stop")
        num_rows = prev_output_tokens.size(0)
        start = prev_output_tokens.new_full((num_rows,), self.prefix) if state is None else state["used"]
        used = start.clone()
        active = torch.ones(num_rows, dtype=torch.bool, device=used.device)
        combined, first_extra, previous, previous_rows = self.combiner(), None, None, None
        for j in range(self.prefix):
            rows = (active & used.gt(j)).nonzero().squeeze(-1)
            if rows.numel() == 0:
                break
            everyone = rows.numel() == num_rows
            cached = start.gt(j).nonzero().squeeze(-1)  # drop the rows that stopped before member j at this step
            self._select_cached_rows(j, incremental_state, torch.searchsorted(cached, rows), cached.numel())
            tokens = prev_output_tokens if everyone else prev_output_tokens[rows]
            enc = encoder_out["members"][j]
            if not everyone:  # a shallow copy: some encoders reorder their output dict in place
                enc = self.member_encoders[j].reorder_encoder_out(dict(enc), rows)
            if previous is not None and previous_rows.numel() != rows.numel():
                previous = previous[torch.searchsorted(previous_rows, rows)]
            logits, extra, previous = self.run_member(j, tokens, enc, incremental_state, previous)
            previous_rows = rows
            combined.add(logits, None if everyone else rows)
            first_extra = extra if j == 0 else first_extra
            stop = boosting.confident(combined.log_probs()[rows, -1], self.early_stop)
            used[rows[stop]] = j + 1
            active[rows[stop]] = False
        self.set_incremental_state(incremental_state, "early_stop", {"used": used})
        self.early_stop_counts["members"] += int(used.sum())
        self.early_stop_counts["tokens"] += num_rows
        return combined.log_probs(), first_extra

    def reorder_incremental_state_scripting(self, incremental_state, new_order):
        """Reorder every member's cached keys/values (and anything else cached under this decoder).

        With early stopping, member j's state holds only the rows with ``used >= j`` (see
        :meth:`early_stop_step`): it is reordered by the positions of the new rows' sources among those.
        """
        state = self.get_incremental_state(incremental_state, "early_stop")
        if state is None:
            for decoder in self.members[: self.prefix]:
                decoder.reorder_incremental_state_scripting(incremental_state, new_order)
            return
        used = state["used"]
        for j in range(self.prefix):
            cached = used.gt(j).nonzero().squeeze(-1)
            sources = new_order[used[new_order].gt(j)]
            self._select_cached_rows(j, incremental_state, torch.searchsorted(cached, sources), cached.numel())
        self.set_incremental_state(incremental_state, "early_stop", {"used": used[new_order]})

    def _select_cached_rows(self, j: int, incremental_state, positions, num_cached: int) -> None:
        """Member ``j``'s incremental state becomes its rows ``positions`` (indices into its ``num_cached`` rows).

        fairseq's attention leaves its cached encoder keys/values alone when the number of rows does
        not change (it assumes the rows were reordered within each sentence's beam, whose encoder
        outputs are equal); rows of other sentences may take the places here, so an order of the same
        size is applied in two size-changing steps.
        """
        decoder = self.members[j]
        if positions.numel() != num_cached:
            decoder.reorder_incremental_state_scripting(incremental_state, positions)
        elif not torch.equal(positions, torch.arange(num_cached, device=positions.device)):
            decoder.reorder_incremental_state_scripting(incremental_state, torch.cat([positions, positions[:1]]))
            decoder.reorder_incremental_state_scripting(incremental_state, torch.arange(num_cached, device=positions.device))

    def max_positions(self):
        return min(dec.max_positions() for dec in self.members[: self.prefix])


class BDistilModel(FairseqEncoderDecoderModel):
    """Frozen members 1..K-1 plus a trainable member K of architecture ``member_arch``."""

    #: the fairseq architecture of the members this model class trains (set by :func:`register_bdistil_arch`)
    member_arch: str = ""

    def __init__(self, args, encoder: PrefixEncoder, decoder: PrefixDecoder):
        super().__init__(encoder, decoder)
        self.args = args

    @classmethod
    def add_args(cls, parser):
        ARCH_MODEL_REGISTRY[cls.member_arch].add_args(parser)
        parser.add_argument("--bdistil-members", type=str, default="", metavar="CKPTS",
                            help="checkpoints of the earlier rounds, in order (a.pt:b.pt); their newest "
                                 "members are frozen members 1..K-1")
        parser.add_argument("--bdistil-connection", choices=CONNECTIONS, default="none",
                            help="last-hidden: add Linear(previous member's final decoder features)")
        parser.add_argument("--bdistil-prefix", type=int, default=0, metavar="K",
                            help="use only the first K members (0: all); at decoding time set it with "
                                 "--model-overrides \"{'bdistil_prefix': K}\"")
        parser.add_argument("--bdistil-early-stop-confidence", type=float, default=None, metavar="TAU",
                            help="anytime decoding: a hypothesis stops adding members once the members so far "
                                 "give max-probability > TAU, and keeps using only those for the rest of the "
                                 "sentence (1: never stops; 0: member 1 only); set it with --model-overrides")
        parser.add_argument("--bdistil-combine", choices=COMBINES, default="product",
                            help="product: sum of members' log-probabilities, renormalised (boosting); "
                                 "mean: their average (independently trained members)")

    @classmethod
    def build_model(cls, args, task):
        paths = split_paths(getattr(args, "bdistil_members", ""))
        loaded = load_members(paths, task)
        new = ARCH_MODEL_REGISTRY[cls.member_arch].build_model(args, task)
        models = [m.model for m in loaded] + [new]
        decoders = [m.decoder for m in models]
        connections = {j: m.connection for j, m in enumerate(loaded) if m.connection is not None}
        if getattr(args, "bdistil_connection", "none") == "last-hidden":
            if not loaded:
                raise MemberError("--bdistil-connection last-hidden needs an earlier member (--bdistil-members is empty)")
            k = len(models)
            connection = nn.Linear(
                feature_size(decoders[-2], k - 1, paths[-1]), feature_size(decoders[-1], k, "the member being trained")
            )
            nn.init.zeros_(connection.weight)  # training starts from the member without the connection
            nn.init.zeros_(connection.bias)
            connections[k - 1] = connection
        prefix = getattr(args, "bdistil_prefix", 0) or len(models)
        if not 1 <= prefix <= len(models):
            raise MemberError(f"--bdistil-prefix {prefix}: this ensemble has {len(models)} members (use 1..{len(models)}, or 0 for all)")
        combine = getattr(args, "bdistil_combine", "product")
        early_stop = getattr(args, "bdistil_early_stop_confidence", None)
        if early_stop is not None and not 0.0 <= early_stop <= 1.0:
            raise MemberError(f"--bdistil-early-stop-confidence {early_stop}: a probability threshold in [0, 1] is needed")
        model = cls(
            args,
            PrefixEncoder(task.source_dictionary, [m.encoder for m in models], prefix),
            PrefixDecoder(task.target_dictionary, decoders, connections, prefix, combine, [m.encoder for m in models],
                          early_stop=early_stop),
        )
        model.freeze_earlier_members(len(loaded))
        logger.info(
            "bdistil ensemble: %d members (%s), using the first %d; parameters per member: %s",
            len(models), combine, prefix, [sum(p.numel() for p in m.parameters()) for m in models],
        )
        return model

    def freeze_earlier_members(self, num_frozen: int) -> None:
        self.num_frozen = num_frozen
        for module in self.frozen_modules():
            module.requires_grad_(False)

    def frozen_modules(self) -> List[nn.Module]:
        """The earlier members' encoders, decoders and connections (never trained here)."""
        modules = []
        for j in range(self.num_frozen):
            modules += [self.encoder.members[j], self.decoder.members[j]]
            if str(j) in self.decoder.connections:
                modules.append(self.decoder.connections[str(j)])
        return modules

    def train(self, mode: bool = True):
        """Frozen members stay in eval mode (no dropout), as at the time they were accepted."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def set_prefix(self, prefix: int) -> None:
        if not 1 <= prefix <= len(self.decoder.members):
            raise MemberError(f"prefix {prefix}: this ensemble has {len(self.decoder.members)} members")
        self.encoder.prefix = self.decoder.prefix = prefix

    def max_positions(self):
        return (self.encoder.max_positions(), self.decoder.max_positions())


def early_stop_summary(model) -> str:
    """A line on the members a model decoded with early stopping used ("" for any other model)."""
    decoder = getattr(model, "decoder", None)
    counts = getattr(decoder, "early_stop_counts", None)
    if counts is None or decoder.early_stop is None or not counts["tokens"]:
        return ""
    return (f"bdistil early stop (confidence > {decoder.early_stop}): {counts['members'] / counts['tokens']:.4f} "
            f"members per hypothesis token on average, of {decoder.prefix}")


def register_bdistil_arch(member_arch: str) -> type:
    """Register ``--arch bdistil_{member_arch}``: a progressive ensemble of ``member_arch`` members.

    Any registered encoder-decoder architecture works as members (a speech model too); the
    connection additionally needs a decoder with ``extract_features``/``output_layer``.
    """
    name = f"bdistil_{member_arch}"
    cls = type(f"BDistil_{member_arch}", (BDistilModel,), {"member_arch": member_arch, "__doc__": BDistilModel.__doc__})
    register_model(name)(cls)
    register_model_architecture(name, name)(ARCH_CONFIG_REGISTRY[member_arch])
    BDISTIL_ARCHS[name] = member_arch
    return cls


BDistilTransformer = register_bdistil_arch("transformer")
#: speech members (``--task speech_to_text`` / ``asr_distillation``): ``--arch bdistil_pdd_vggtransformer_tiny``
#: and ``bdistil_pdd_vggtransformer_2``; their decoders have no connection (no ``extract_features``)
for _speech_arch in SPEECH_MEMBER_ARCHS:
    register_bdistil_arch(_speech_arch)
