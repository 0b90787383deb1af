"""``--arch bdistil_transformer``: a progressive ensemble whose first k members decode (fairseq glue).

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
"""
import logging
from typing import Dict, List

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

from fairseq_pdd.boosting import ProductOfExperts
from fairseq_pdd.models.bdistil_members import BDISTIL_ARCHS, MemberError, feature_size, load_members
from fairseq_pdd.teachers import split_paths

logger = logging.getLogger(__name__)

COMBINES = ("product", "mean")
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
    """Runs the first ``prefix`` members' decoders and combines their outputs (see the module doc)."""

    def __init__(self, dictionary, decoders: List[nn.Module], connections: Dict[int, nn.Linear], prefix: int, combine: str):
        super().__init__(dictionary)
        self.members = nn.ModuleList(decoders)
        self.connections = nn.ModuleDict({str(j): c for j, c in connections.items()})
        self.prefix = prefix
        self.combine = combine

    def _uses_features(self, j: int) -> bool:
        return str(j) in self.connections or str(j + 1) in self.connections

    def member_outputs(self, prev_output_tokens, encoder_out, incremental_state=None):
        """Yields ``(logits (B, T, V), extra)`` of members 1..prefix, in order."""
        previous = None
        for j, decoder in enumerate(self.members[: self.prefix]):
            enc = encoder_out["members"][j]
            if not self._uses_features(j):
                yield decoder(prev_output_tokens, encoder_out=enc, incremental_state=incremental_state)
                continue
            features, extra = decoder.extract_features(prev_output_tokens, encoder_out=enc, incremental_state=incremental_state)
            if str(j) in self.connections:
                features = features + self.connections[str(j)](previous)
            previous = features
            yield decoder.output_layer(features), extra

    def combiner(self) -> ProductOfExperts:
        return ProductOfExperts(average=self.combine == "mean")

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, features_only=False, **kwargs):
        """``(log p_k (B, T, V), the first member's extra output)``; already normalised."""
        if features_only:
            raise NotImplementedError("a bdistil ensemble has no single feature output (features_only=True)")
        combined, first_extra = self.combiner(), None
        for j, (logits, extra) in enumerate(self.member_outputs(prev_output_tokens, encoder_out, incremental_state)):
            combined.add(logits)
            first_extra = extra if j == 0 else first_extra
        return combined.log_probs(), first_extra

    def reorder_incremental_state_scripting(self, incremental_state, new_order):
        """Reorder every member's cached keys/values (and anything else cached under this decoder)."""
        for decoder in self.members[: self.prefix]:
            decoder.reorder_incremental_state_scripting(incremental_state, new_order)

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
        model = cls(
            args,
            PrefixEncoder(task.source_dictionary, [m.encoder for m in models], prefix),
            PrefixDecoder(task.target_dictionary, decoders, connections, prefix, combine),
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
