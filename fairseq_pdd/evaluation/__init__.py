"""Evaluation of decoded n-best lists with uncertainties: quality, OOD detection, error detection, calibration.

Pure Python / numpy / scikit-learn / sacrebleu / matplotlib: nothing here imports fairseq or torch, so
the numbers can be recomputed anywhere from the JSONL files written by the decoding entry point.

Modules, one job each:

* :mod:`.io`        read and validate the per-hypothesis JSONL files, group by sample id and rank, n-best;
* :mod:`.aggregate` the sign convention of the measures and the n-best weighting ("bs" / "mc");
* :mod:`.quality`   corpus / sentence BLEU (sacrebleu), WER and word alignments with token error labels;
* :mod:`.metrics`   OOD ROC-AUC / PR-AUC, prediction-rejection ratio (PRR) and curves, ECE, token error PR-AUC;
* :mod:`.plots`     rejection curves, ROC curves and reliability diagrams (matplotlib, Agg backend);
* :mod:`.report`    evaluate systems into a nested dict, ``report.json`` and a side-by-side text table;
* :mod:`.cli`       ``fairseq-pdd-evaluate`` (``main(argv)``);
* :mod:`.ood_sets`  build the standard MT OOD sets (permuted source, source in another language).

Submodules are imported on use (``from fairseq_pdd.evaluation import metrics``), not here.
"""
