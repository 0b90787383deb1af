"""Decoding with uncertainty: ``fairseq-pdd-generate`` and the measures it writes.

* :mod:`.uncertainty`       token / sequence / n-best measures of ensembles and Dirichlet students (pure torch);
* :mod:`.step_uncertainty`  the same measures tracked step by step through a re-ordered beam (pure torch);
* :mod:`.triton_measures`   a Dirichlet's distribution measures as one Triton kernel (CUDA; see ``distill.backend``);
* :mod:`.beam_uncertainty`  fairseq's beam search carrying those measures (fairseq glue);
* :mod:`.rescoring`         batched, length-grouped teacher-forced re-scoring of n-best lists and references;
* :mod:`.jsonl`             the per-hypothesis JSONL: texts of token ids, float32 measure arrays;
* :mod:`.generate`          ``fairseq-pdd-generate`` (fairseq-generate + measures + JSONL).
"""
