"""``fairseq-pdd-generate``: fairseq-generate plus uncertainty measures for every hypothesis.

It runs fairseq's own ``fairseq_cli.generate`` (same options, same S-/T-/H-/D-/P- lines and scorer)
with three hooks installed for the duration of the run:

* after the checkpoints are loaded, the model kind is decided: one checkpoint trained with a
  Dirichlet criterion is a *Dirichlet student* (its predictive, also for beam search, is the mean
  ``alpha / a0`` with the checkpoint's parametrization and offset, not ``softmax(z)``); anything
  else is an *ensemble* of softmax members (M = 1 included);
* when the task builds its generator, fairseq's ensemble wrapper is replaced by one that stops the search at
  the first NaN log-probability with an error naming the model, and (``--uncertainty-from beam``, the
  default) computes the measures inside beam search from the distributions the search already has, step
  by step for every beam row (:mod:`fairseq_pdd.decoding.beam_uncertainty`), so the models run once;
* after each batch is decoded, the measures of :mod:`fairseq_pdd.decoding.uncertainty` are attached to its
  n-best lists: a ``U-{id}`` line per hypothesis in fairseq's output and one JSONL record per
  hypothesis in ``--uncertainty-output`` (default ``{results_path or .}/uncertainty-{gen_subset}.jsonl``),
  written to a temporary file (``.tmp`` appended) and renamed when decoding finishes, as is fairseq's
  ``{results_path}/generate-{gen_subset}.txt`` with ``--results-path``, so a killed run leaves no partial
  output under either name. The references
  (``--uncertainty-reference``), and the hypotheses themselves with ``--uncertainty-from rescore`` or with
  a generator other than fairseq's plain beam search, are re-scored teacher-forced in batched passes
  (:mod:`fairseq_pdd.decoding.rescoring`);
* the output stream fairseq writes to is shared, so the U- lines sit with the batch's other lines;
* a ``bdistil_*`` model decoded with early stopping gets a last line with the mean number of
  members per decoded hypothesis token.
"""
import contextlib
import logging
import os
from typing import Optional
from unittest import mock

import torch
from fairseq import checkpoint_utils, options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import fairseq_cli.generate as fairseq_generate
import fairseq_pdd
from fairseq_pdd.decoding import beam_uncertainty, jsonl, rescoring, uncertainty
from fairseq_pdd.decoding.step_uncertainty import DirichletStepUncertainty, EnsembleStepUncertainty, pad_columns
from fairseq_pdd.distill.dirichlet import concentrations
from fairseq_pdd.distill.ensemble_stats import Workspace
from fairseq_pdd.models.bdistil import early_stop_summary
from fairseq_pdd.decoding.jsonl import SymbolText

logger = logging.getLogger(__name__)

# fairseq's --user-dir import finds this package already imported (by this module), so register here.
fairseq_pdd.register()

#: Criteria whose students parametrize a Dirichlet.
DIRICHLET_CRITERIA = (
    "rkl_dirichlet_proxy_distillation",
    "dirichlet_proxy_distillation",
    "sequence_distribution_distillation",
)

#: Default re-scoring group size, in logits elements (rows x length x K): 256 MiB of float32 logits.
BUCKET_ELEMENTS = 2 ** 26


def add_uncertainty_args(parser) -> None:
    group = parser.add_argument_group("uncertainty (fairseq_pdd)")
    group.add_argument("--uncertainty-output", default=None, metavar="FILE",
                       help="JSONL, one record per hypothesis (default: RESULTS_PATH/uncertainty-SUBSET.jsonl)")
    group.add_argument("--uncertainty-reference", action="store_true",
                       help="also forced-decode each reference (records with rank -1, token confidence "
                            "and correctness for calibration)")
    group.add_argument("--uncertainty-from", choices=["beam", "rescore"], default="beam",
                       help="beam: compute the measures during beam search for every beam row, so the models "
                            "run once (generators other than fairseq's plain beam search are re-scored); "
                            "rescore: re-score the n-best lists teacher-forced after decoding, one more pass of "
                            "every model (same values, but the measures ignore --temperature)")
    group.add_argument("--uncertainty-max-tokens", type=int, default=None, metavar="N",
                       help="re-score hypotheses in length-sorted groups of at most N padded target tokens "
                            f"(default: {BUCKET_ELEMENTS} / vocabulary size, bounding the logits to that many elements)")
    group.add_argument("--predictive", choices=["auto", "softmax", "dirichlet"], default="auto",
                       help="auto: Dirichlet mean for one checkpoint trained with a Dirichlet criterion")


class PredictiveOptionError(ValueError):
    """``--predictive`` asks for what the checkpoints cannot give (reported as a one-line CLI error)."""


class DirichletPredictive:
    """``get_normalized_probs`` of a Dirichlet student: ``log(alpha / a0)`` from its logits; the
    concentrations of the last call stay in ``last_alpha`` (for the measures of a beam step)."""

    def __init__(self, parametrization: str, offset: float):
        self.parametrization, self.offset = parametrization, offset
        self.last_alpha: Optional[torch.Tensor] = None

    def alpha(self, logits: torch.Tensor) -> torch.Tensor:
        return concentrations(logits.float(), self.parametrization, self.offset)

    def __call__(self, net_output, log_probs, sample=None):
        alpha = self.last_alpha = self.alpha(net_output[0])
        lp = alpha.log() - alpha.sum(-1, keepdim=True).log()
        return lp if log_probs else lp.exp()


def dirichlet_predictive(saved_cfg, choice: str) -> Optional[DirichletPredictive]:
    """The student's predictive if it is a Dirichlet (per ``--predictive``), else None."""
    criterion = getattr(saved_cfg, "criterion", None)
    name = getattr(criterion, "_name", None)
    if choice == "softmax" or (choice == "auto" and name not in DIRICHLET_CRITERIA):
        return None
    if name not in DIRICHLET_CRITERIA:
        raise PredictiveOptionError(f"--predictive dirichlet needs a checkpoint trained with a Dirichlet criterion, not {name!r}")
    return DirichletPredictive(str(criterion.parametrization), float(criterion.model_offset))


class UncertaintyRun:
    """State and hooks of one ``fairseq-pdd-generate`` run."""

    def __init__(self, args):
        self.args = args
        self.cfg = None
        self.output_file = None
        self.predictive: Optional[DirichletPredictive] = None
        self.records: Optional[jsonl.JsonlWriter] = None
        self.decode = None  #: the run's detokenizer / BPE decoder (built with the texts below, at first use)
        self.source_text = self.reference_text = self.hypothesis_text = None  #: SymbolText of token ids
        self.step_measures = None  #: the StepUncertainty when the measures come from beam search
        self.workspace = Workspace()  #: the re-scoring's (rows, length, K) buffers, kept between groups
        self.model_paths = []
        self.models = []

    # hooks ------------------------------------------------------------------------------------
    def main(self, original):
        def hooked_main(cfg, output_file):
            # plain values: omegaconf attribute access is slow in the per-record loop
            self.nbest, self.post_process = cfg.generation.nbest, cfg.common_eval.post_process
            self.quiet = cfg.common_eval.quiet
            self.records = jsonl.JsonlWriter(self.output_path(cfg, self.args.uncertainty_output))
            outputs = [self.records]
            try:
                if self.args.results_path is not None:  # fairseq's generate-SUBSET.txt, also renamed at the end
                    outputs.append(jsonl.ReplacedOnCommit(
                        os.path.join(self.args.results_path, f"generate-{cfg.dataset.gen_subset}.txt"), "w",
                        buffering=1, encoding="utf-8"))
                    output_file = outputs[-1].file
                self.cfg, self.output_file = cfg, output_file
                scorer = original(cfg, output_file)
                for model in self.models:
                    summary = early_stop_summary(model)
                    if summary:
                        print(summary, file=output_file)
            except BaseException:
                for output in outputs:
                    output.discard()  # no half-written output survives a failed run
                raise
            for output in outputs:
                output.commit()
            return scorer

        return hooked_main

    def load_model_ensemble(self, original):
        def hooked_load(filenames, *args, **kwargs):
            models, saved_cfg = original(filenames, *args, **kwargs)
            self.model_paths = list(filenames)
            self.models = models
            if len(models) == 1:
                self.predictive = dirichlet_predictive(saved_cfg, self.args.predictive)
                if self.predictive is not None:
                    models[0].get_normalized_probs = self.predictive
            elif self.args.predictive == "dirichlet":
                raise PredictiveOptionError("--predictive dirichlet takes one checkpoint; several are decoded as an ensemble")
            return models, saved_cfg

        return hooked_load

    def setup_task(self, original):
        def hooked_setup(cfg, **kwargs):
            task = original(cfg, **kwargs)
            inference_step = task.inference_step

            def inference_step_with_uncertainty(generator, models, sample, **kw):
                hypos = inference_step(generator, models, sample, **kw)
                self.score_batch(task, generator, models, sample, hypos)
                return hypos

            task.inference_step = inference_step_with_uncertainty
            build_generator = task.build_generator

            def build_measuring_generator(models, *args, **kw):
                generator = build_generator(models, *args, **kw)
                self.install_ensemble(generator, len(models), task.target_dictionary.eos())
                return generator

            task.build_generator = build_measuring_generator
            return task

        return hooked_setup

    # work -------------------------------------------------------------------------------------
    def install_ensemble(self, generator, num_models: int, eos: int) -> None:
        """Have fairseq's plain beam search stop at a NaN naming the model, and compute the measures during the
        search (``--uncertainty-from beam``)."""
        in_beam = self.args.uncertainty_from == "beam"
        if not in_beam:
            measures = outputs_of = None
        elif self.predictive is not None:
            measures = DirichletStepUncertainty()
            outputs_of = lambda captured: self.predictive.last_alpha[:, -1, :]  # noqa: E731
        else:
            measures, outputs_of = EnsembleStepUncertainty(num_models), beam_uncertainty.ensemble_outputs
        if beam_uncertainty.install(generator, self.model_paths, measures, outputs_of, eos):
            self.step_measures = measures
        elif in_beam:
            logger.warning("%s is not fairseq's plain beam search: its hypotheses are re-scored after decoding",
                           type(generator).__name__)

    def output_path(self, cfg, explicit: Optional[str]) -> str:
        return explicit or os.path.join(self.args.results_path or ".", f"uncertainty-{cfg.dataset.gen_subset}.jsonl")

    def measures(self, models, encoder_outs, batch: rescoring.HypothesisBatch, eos: int, pad: int):
        """(token measures (H, L), sequence measures (H,), predictive (H, L, K): alpha or mean probs, the
        latter valid until the next call)."""
        if self.predictive is not None:
            logits = rescoring.teacher_forced_logits(models[0], encoder_outs[0], batch, eos, pad)
            alpha = self.predictive.alpha(logits)
            token, sequence = uncertainty.dirichlet_hypothesis_measures(alpha, batch.tokens, batch.mask,
                                                                        workspace=self.workspace)
            return token, sequence, alpha
        acc = uncertainty.EnsembleHypothesisAccumulator(batch.tokens, batch.mask, workspace=self.workspace)
        for model, encoder_out in zip(models, encoder_outs):
            logits = rescoring.teacher_forced_logits(model, encoder_out, batch, eos, pad)
            acc.add(torch.log_softmax(logits, -1, dtype=torch.float32))
        stats, chosen, ep_probs = acc.finalize()
        token, sequence = uncertainty.ensemble_hypothesis_measures(stats, chosen, batch.mask, ep_probs)
        return token, sequence, stats.mean_probs

    def score_batch(self, task, generator, models, sample, hypos) -> None:
        """Attach the measures to the batch's n-best (from beam search, or re-scored in length buckets, as are
        the references); write its records in order."""
        tgt_dict = task.target_dictionary
        pad, eos = tgt_dict.pad(), tgt_dict.eos()
        batches = [rescoring.from_nbest(hypos, self.nbest, pad)]
        texts = self.texts(task, generator, sample)
        if self.step_measures is not None:  # measured during beam search
            batch = batches.pop()
            columns = beam_uncertainty.take_columns(hypos, self.nbest, self.step_measures.channels)
            token, sequence = self.step_measures.hypothesis_measures(pad_columns(columns), batch.mask)
            self.write(self.records_of(task, generator, sample, hypos, batch, token, sequence, None, texts))
        if self.args.uncertainty_reference and sample.get("target") is not None:
            batches.append(rescoring.from_references(sample["target"], pad))
        if not batches:
            return
        encoder_outs = [rescoring.encode(model, sample["net_input"]) for model in models]
        budget = self.args.uncertainty_max_tokens or max(1, BUCKET_ELEMENTS // len(tgt_dict))
        for batch in batches:
            records = [None] * len(batch.ranks)
            for rows in rescoring.length_buckets(batch.mask.sum(-1), budget):
                bucket = batch.select(rows)
                token, sequence, predictive = self.measures(models, encoder_outs, bucket, eos, pad)
                reference_stats = None
                if bucket.ranks[0] == -1:
                    confidence, argmax = predictive.max(-1)
                    if self.predictive is not None:  # alpha -> mean
                        confidence = confidence / predictive.sum(-1)
                    reference_stats = (confidence, argmax.eq(bucket.tokens))
                bucket_records = self.records_of(task, generator, sample, hypos, bucket, token, sequence,
                                                 reference_stats, texts)
                for h, record in zip(rows.tolist(), bucket_records):
                    records[h] = record
            self.write(records)

    def texts(self, task, generator, sample):
        """(source, reference, reference token ids) per batch row, decoded as fairseq-generate does."""
        if self.decode is None:
            tokenizer, bpe = task.build_tokenizer(self.cfg.tokenizer), task.build_bpe(self.cfg.bpe)

            def decode(x):
                x = bpe.decode(x) if bpe is not None else x
                return tokenizer.decode(x) if tokenizer is not None else x

            self.decode = decode
            strip = fairseq_generate.get_symbols_to_strip_from_output(generator)
            src_dict, tgt_dict = getattr(task, "source_dictionary", None), task.target_dictionary
            self.source_text = None if src_dict is None else SymbolText(src_dict, self.post_process)
            self.reference_text = SymbolText(tgt_dict, self.post_process, strip, escape_unk=True)
            self.hypothesis_text = SymbolText(tgt_dict, self.post_process, strip)
        pad = task.target_dictionary.pad()
        net_input = sample["net_input"]
        sources = (net_input["src_tokens"].tolist()
                   if self.source_text is not None and "src_tokens" in net_input else None)
        targets = sample["target"].tolist() if sample.get("target") is not None else None
        out = []
        for i in range(sample["id"].numel()):
            src = self.decode(self.source_text([t for t in sources[i] if t != pad])) if sources else ""
            ref, ref_tokens = None, None
            if targets is not None:
                ref_tokens = [t for t in targets[i] if t != pad]
                ref = self.decode(self.reference_text(ref_tokens))
            out.append((src, ref, ref_tokens))
        return out

    def records_of(self, task, generator, sample, hypos, batch, token, sequence, reference_stats, texts) -> list:
        """One record per hypothesis of ``batch``, in its row order (numbers as float32 numpy views)."""
        tgt_dict = task.target_dictionary
        lengths = batch.mask.sum(-1).tolist()
        ids, rows = sample["id"].tolist(), batch.source_rows.tolist()
        token = jsonl.measure_arrays(token, ids, rows, batch.mask)  # one conversion per batch
        sequence = jsonl.measure_arrays(sequence, ids, rows)
        rows_tokens = batch.tokens.tolist()
        if reference_stats is not None:
            confidence = reference_stats[0].to("cpu", torch.float32).numpy()
            correct = reference_stats[1].to("cpu", torch.uint8).numpy()
        model = "dirichlet" if self.predictive is not None else "ensemble"
        if batch.ranks and batch.ranks[0] >= 0:  # fairseq's own scores of the hypotheses
            scores = torch.stack([hypos[row][rank]["score"] for row, rank in zip(rows, batch.ranks)])
            scores = scores.to("cpu", torch.float32).numpy()
        records = []
        for h, (row, rank) in enumerate(zip(rows, batch.ranks)):
            source, reference, reference_tokens = texts[row]
            length = lengths[h]
            tokens = rows_tokens[h][:length]
            if rank >= 0:
                hypothesis = self.decode(self.hypothesis_text(tokens))
                score = scores[h]
            else:
                hypothesis, score = reference, sequence["score"][h]
            record = {
                "id": ids[row],
                "rank": rank,
                "source": source,
                "reference": reference,
                "hypothesis": hypothesis,
                "score": score,
                "log_prob": sequence["log_prob"][h],
                "length": length,
                "tokens": [tgt_dict.symbols[t] for t in tokens[:-1]],  # without EOS
                "model": model,
                "token": {k: v[h, :length] for k, v in token.items()},
                "sequence": {k: v[h] for k, v in sequence.items()},
            }
            if rank == 0 and reference_tokens is not None:
                record["reference_tokens"] = [tgt_dict[t] for t in reference_tokens[:-1]]
            if reference_stats is not None:
                record["token_confidence"] = confidence[h, :length]
                record["token_correct"] = correct[h, :length]
            records.append(record)
        return records

    def write(self, records) -> None:
        """The records to the JSONL and, unless ``--quiet``, their ``U-`` lines to fairseq's output."""
        self.records.write(records)
        if not self.quiet:
            for record in records:
                shown = " ".join(f"{k}={record['sequence'][k]:.4f}" for k in sorted(record["sequence"]))
                print(f"U-{record['id']}\t{record['rank']}\t{shown}", file=self.output_file)


def main(args) -> None:
    run = UncertaintyRun(args)
    cfg = convert_namespace_to_omegaconf(args)
    cfg.common_eval.results_path = None  # the run writes RESULTS_PATH/generate-SUBSET.txt itself, renamed at the end
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(fairseq_generate, "_main", run.main(fairseq_generate._main)))
        stack.enter_context(mock.patch.object(
            checkpoint_utils, "load_model_ensemble", run.load_model_ensemble(checkpoint_utils.load_model_ensemble)))
        stack.enter_context(mock.patch.object(tasks, "setup_task", run.setup_task(tasks.setup_task)))
        fairseq_generate.main(cfg)


def cli_main() -> None:
    parser = options.get_generation_parser()
    # fairseq's default multiple of 8 cuts the last batch to a multiple of 8 sentences, so some test
    # sentences would silently never be decoded (fairseq issue #5036); every sentence is scored here.
    parser.set_defaults(required_batch_size_multiple=1)
    add_uncertainty_args(parser)
    args = options.parse_args_and_arch(parser)
    try:
        main(args)
    except (PredictiveOptionError, beam_uncertainty.NonFiniteOutputError,
            jsonl.NonFiniteMeasureError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    cli_main()
