"""Diagnostics of the proxy target and of Dirichlet students on a binarised split (teacher-forced).

For the teachers: the proxy precision beta0 = (K-1) / (2 MKL + eps) at every target position, its
quantiles, and how often MKL is exactly 0 after the float32 clamp (beta0 then sits at its ceiling
(K-1)/eps, set by rounding, not by disagreement); the same from float64 statistics of the same
log-probabilities, to show what float32 cancellation does to it.

For each student: the precision a0 quantiles, the mass ``K * offset / a0`` the offset spreads over
all classes, how often the clamp on f(z) binds, the norm of the PD-EnD2 gradient per token, and at
the reference's EOS positions the EOS probability of the ensemble mean, the student's Dirichlet mean
``alpha / a0`` and the student's ``softmax(z)`` (= the mean with the offset removed, for "exp").

    python benchmarks/student_diagnostics.py DATA_BIN --teachers T1:T2:T3 --students S1 S2 --subset valid
"""
import argparse
import json

import numpy as np
import torch

import fairseq_pdd
from fairseq import checkpoint_utils, tasks
from fairseq_pdd.distill import losses
from fairseq_pdd.distill.dirichlet import ALPHA_MAX, ALPHA_MIN, EPS_LOSS, alpha_and_derivative, proxy_precision
from fairseq_pdd.distill.ensemble_stats import EnsembleAccumulator

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def quantiles(x):
    x = x.double().cpu().numpy()
    return {f"q{int(q * 100)}": float(np.quantile(x, q)) for q in QUANTILES}


def load(path, data):
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    model = models[0].eval()
    return model, cfg, task


def batches(task, subset, max_tokens=2000):
    task.load_dataset(subset)
    itr = task.get_batch_iterator(task.dataset(subset), max_tokens=max_tokens, required_batch_size_multiple=1)
    return itr.next_epoch_itr(shuffle=False)


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--teachers", required=True, help="colon-separated teacher checkpoints")
    p.add_argument("--students", nargs="*", default=[], help="Dirichlet student checkpoints")
    p.add_argument("--subset", default="valid")
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)
    fairseq_pdd.register()
    teachers = [load(t, args.data)[0] for t in args.teachers.split(":")]
    cfg = checkpoint_utils.load_checkpoint_to_cpu(args.teachers.split(":")[0])["cfg"]
    cfg.task.data = args.data
    task = tasks.setup_task(cfg.task)
    students = [load(s, args.data) for s in args.students]
    eos = task.target_dictionary.eos()
    collected = {"beta0": [], "beta0_f64": [], "eos_mask": [], "pbar_eos": [], "nll_pbar": [], "nll_proxy_mean": [],
                 "proxy_mean_eos": []}
    per_student = [{"a0": [], "floor": [], "clamp_low": [], "clamp_high": [], "grad": [], "mean_eos": [],
                    "softmax_eos": [], "nll_mean": [], "nll_softmax": []} for _ in students]
    for sample in batches(task, args.subset):
        target = sample["target"]
        mask = target.ne(task.target_dictionary.pad())
        tgt = target[mask]
        acc, acc64 = EnsembleAccumulator(), EnsembleAccumulator()
        for model in teachers:
            lp = torch.log_softmax(model(**sample["net_input"])[0][mask].float(), -1)
            acc.add(lp)
            acc64.add(lp.double())
        stats, stats64 = acc.finalize(), acc64.finalize()
        k = stats.num_classes
        collected["beta0"].append(proxy_precision(stats.mkl, stats.epkl, k))
        collected["beta0_f64"].append(proxy_precision(stats64.mkl, stats64.epkl, k))
        is_eos = tgt.eq(eos)
        collected["eos_mask"].append(is_eos)
        collected["pbar_eos"].append(stats.mean_probs[:, eos])
        # the proxy Dir(B pbar + 1), B = beta0 + K (target_offset 1): its mean is what a perfect student's alpha / a0 is
        scale = collected["beta0"][-1].unsqueeze(-1) + k
        proxy_mean = (scale * stats.mean_probs + 1) / (scale + k)
        collected["nll_pbar"].append(-stats.mean_probs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).log())
        collected["nll_proxy_mean"].append(-proxy_mean.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).log())
        collected["proxy_mean_eos"].append(proxy_mean[:, eos])
        for (model, scfg, _), out in zip(students, per_student):
            crit = scfg.criterion
            z = model(**sample["net_input"])[0][mask].float()
            raw = z.exp() if crit.parametrization == "exp" else torch.nn.functional.softplus(z)
            alpha, _ = alpha_and_derivative(z, crit.parametrization, crit.model_offset, False)
            a0 = alpha.sum(-1)
            out["a0"].append(a0)
            out["floor"].append(k * crit.model_offset / a0)
            out["clamp_low"].append((raw < ALPHA_MIN).float().mean(-1))
            out["clamp_high"].append((raw > ALPHA_MAX / k).float().mean(-1))
            scale = collected["beta0"][-1] + k * getattr(crit, "target_offset", 1.0)
            zg = z.clone().requires_grad_(True)
            with torch.enable_grad():
                loss, _ = losses.rkl_proxy_loss(zg, stats.mean_probs, scale, crit.parametrization, crit.model_offset)
                (grad,) = torch.autograd.grad(loss.sum(), zg)
            out["grad"].append(grad.norm(dim=-1))
            out["mean_eos"].append(alpha[:, eos] / a0)
            out["softmax_eos"].append(torch.softmax(z, -1)[:, eos])
            out["nll_mean"].append(a0.log() - alpha.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).log())
            out["nll_softmax"].append(-torch.log_softmax(z, -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1))
    cat = {key: torch.cat(v) for key, v in collected.items()}
    k = len(task.target_dictionary)
    ceiling = (k - 1) / EPS_LOSS
    report = {
        "K": k,
        "tokens": int(cat["beta0"].numel()),
        "beta0": quantiles(cat["beta0"]),
        "beta0_at_ceiling": float((cat["beta0"] >= 0.999 * ceiling).double().mean()),
        "beta0_f64": quantiles(cat["beta0_f64"]),
        "beta0_f64_at_ceiling": float((cat["beta0_f64"] >= 0.999 * ceiling).double().mean()),
        "log10_beta0_f32_vs_f64_abs_diff": quantiles((cat["beta0"].log10() - cat["beta0_f64"].log10()).abs()),
        "ensemble_eos_prob_at_eos": float(cat["pbar_eos"][cat["eos_mask"]].mean()),
        "ensemble_eos_prob_elsewhere": float(cat["pbar_eos"][~cat["eos_mask"]].mean()),
        "proxy_mean_eos_prob_at_eos": float(cat["proxy_mean_eos"][cat["eos_mask"]].mean()),
        "reference_nll_nats": {"ensemble_mean": float(cat["nll_pbar"].mean()),
                               "proxy_mean": float(cat["nll_proxy_mean"].mean())},
        "students": {},
    }
    for path, out in zip(args.students, per_student):
        s = {key: torch.cat(v) for key, v in out.items()}
        m = cat["eos_mask"]
        report["students"][path] = {
            "a0": quantiles(s["a0"]),
            "offset_mass_K_offset_over_a0": quantiles(s["floor"]),
            "clamp_low_fraction": float(s["clamp_low"].mean()),
            "clamp_high_fraction": float(s["clamp_high"].mean()),
            "rkl_grad_norm": quantiles(s["grad"]),
            "reference_nll_nats": {"dirichlet_mean": float(s["nll_mean"].mean()),
                                   "softmax_z": float(s["nll_softmax"].mean())},
            "mean_eos_prob_at_eos": float(s["mean_eos"][m].mean()),
            "softmax_eos_prob_at_eos": float(s["softmax_eos"][m].mean()),
            "mean_eos_prob_elsewhere": float(s["mean_eos"][~m].mean()),
            "softmax_eos_prob_elsewhere": float(s["softmax_eos"][~m].mean()),
        }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
