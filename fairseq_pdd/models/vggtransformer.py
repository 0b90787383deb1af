"""The VGG-Transformer for speech recognition (Mohamed et al., 2019), fairseq's own implementation.

Registered as model ``pdd_vggtransformer`` with the architectures ``pdd_vggtransformer_2`` (fairseq's
``vggtransformer_2``, the authors' LibriSpeech model) and ``pdd_vggtransformer_tiny`` (for tests and
demos), names that cannot clash with fairseq's examples when those are loaded too. The encoder,
decoder, options and architecture defaults are fairseq's ``examples/speech_recognition`` code
(loaded by :mod:`fairseq_pdd.models.fairseq_examples`); this module adds only:

* batches of fairseq's ``speech_to_text`` task: ``src_tokens`` (B, T, C * F) float features,
  ``src_lengths`` (B,), ``prev_output_tokens`` (B, L); ``F`` (``input_feat_per_channel``) and ``C``
  come from the data's ``config.yaml``;
* layer configurations parsed as literals (tuples, lists, numbers, booleans and ``sequence * int``)
  instead of fairseq's ``eval``, so a checkpoint's config cannot run code when it is loaded;
* clear errors when features and model disagree: a batch whose feature dimension is not the
  model's (:class:`FeatureDimensionError` from the encoder), or a checkpoint trained on features of
  another dimension than the data's (the model keeps its input dimension as the buffer
  ``input_feat_per_channel`` and checks it on ``load_state_dict``).
"""
import ast
import operator

import torch
from fairseq.models import register_model, register_model_architecture

from fairseq_pdd.models.fairseq_examples import load_example_module

fairseq_vgg = load_example_module("speech_recognition/models/vggtransformer.py")


class FeatureDimensionError(ValueError):
    """Speech features and model (or checkpoint) disagree on the feature dimension."""


def parse_layer_config(text, option: str):
    """A layer configuration such as ``"((256, 4, 1024, True, 0.2, 0.2, 0.2),) * 2"`` as Python values.

    Only literals and ``sequence * int`` are accepted (never arbitrary code); ``option`` names the
    option in the error.
    """
    if not isinstance(text, str):
        return text

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool)):
            return node.value
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [value(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return operator.neg(value(node.operand))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            left, right = value(node.left), value(node.right)
            if isinstance(left, (tuple, list)) and isinstance(right, int) and not isinstance(right, bool):
                return left * right
        raise ValueError(f"--{option.replace('_', '-')}: unsupported expression {ast.unparse(node)!r} in {text!r}")

    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"--{option.replace('_', '-')}: cannot parse {text!r} ({e.msg})") from None
    return value(tree.body)


class VGGTransformerEncoder(fairseq_vgg.VGGTransformerEncoder):
    """fairseq's encoder, refusing features of the wrong dimension with a clear error."""

    def forward(self, src_tokens, src_lengths, **kwargs):
        expected = self.in_channels * self.input_dim
        if src_tokens.dim() != 3 or src_tokens.size(-1) != expected:
            raise FeatureDimensionError(
                f"speech features of shape {tuple(src_tokens.shape)} (batch x frames x dim) do not fit the "
                f"model, which expects {expected}-dim frames ({self.in_channels} channel(s) x "
                f"{self.input_dim} features): input_feat_per_channel / input_channels in the data's "
                "config.yaml must match the features on disk and the model"
            )
        return super().forward(src_tokens, src_lengths, **kwargs)


@register_model("pdd_vggtransformer")
class VGGTransformerModel(fairseq_vgg.VGGTransformerModel):
    """fairseq's ``asr_vggtransformer`` (same options and modules) for ``speech_to_text`` data."""

    def __init__(self, encoder, decoder):
        super().__init__(encoder, decoder)
        self.register_buffer("input_feat_per_channel", torch.tensor(encoder.input_dim))

    @classmethod
    def build_encoder(cls, args, task):
        return VGGTransformerEncoder(
            input_feat_per_channel=args.input_feat_per_channel,
            vggblock_config=parse_layer_config(args.vggblock_enc_config, "vggblock_enc_config"),
            transformer_config=parse_layer_config(args.transformer_enc_config, "transformer_enc_config"),
            encoder_output_dim=args.enc_output_dim,
            in_channels=args.in_channels,
        )

    @classmethod
    def build_decoder(cls, args, task):
        return fairseq_vgg.TransformerDecoder(
            dictionary=task.target_dictionary,
            embed_dim=args.tgt_embed_dim,
            transformer_config=parse_layer_config(args.transformer_dec_config, "transformer_dec_config"),
            conv_config=parse_layer_config(args.conv_dec_config, "conv_dec_config"),
            encoder_output_dim=args.enc_output_dim,
        )

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        saved = state_dict.get("input_feat_per_channel")
        if saved is not None and int(saved) != int(self.input_feat_per_channel):
            raise FeatureDimensionError(
                f"the checkpoint was trained on {int(saved)}-dim speech features but the data has "
                f"{int(self.input_feat_per_channel)}-dim ones (input_feat_per_channel in its config.yaml): "
                "prepare the data with the same number of mel bins as the model's training data"
            )
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


@register_model_architecture("pdd_vggtransformer", "pdd_vggtransformer_2")
def vggtransformer_2(args):
    """fairseq's ``vggtransformer_2``: VGG (64, 128 channels), 16 x 1024-dim encoder layers, 6 decoder layers."""
    fairseq_vgg.vggtransformer_2(args)
    fairseq_vgg.base_architecture(args)


@register_model_architecture("pdd_vggtransformer", "pdd_vggtransformer_tiny")
def vggtransformer_tiny(args):
    """A few-thousand-parameter VGG-Transformer for CPU tests: 2 VGG blocks, 1 encoder and 1 decoder layer."""
    args.input_feat_per_channel = getattr(args, "input_feat_per_channel", 80)
    args.vggblock_enc_config = getattr(args, "vggblock_enc_config", "[(8, 3, 2, 1, True), (8, 3, 2, 1, True)]")
    args.transformer_enc_config = getattr(args, "transformer_enc_config", "((64, 4, 128, True, 0.1, 0.1, 0.1),)")
    args.enc_output_dim = getattr(args, "enc_output_dim", 64)
    args.tgt_embed_dim = getattr(args, "tgt_embed_dim", 64)
    args.conv_dec_config = getattr(args, "conv_dec_config", "((64, 3, True),)")
    args.transformer_dec_config = getattr(args, "transformer_dec_config", "((64, 4, 128, True, 0.1, 0.1, 0.1),)")
    fairseq_vgg.base_architecture(args)
