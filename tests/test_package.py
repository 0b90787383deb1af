"""What importing the package does, in a fresh interpreter."""
import subprocess
import sys


def _modules_after(statement: str) -> set:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_pure_modules_do_not_import_fairseq():
    """The math, the evaluation and the toy data work (and start fast) without fairseq."""
    modules = _modules_after("import fairseq_pdd.distill.losses, fairseq_pdd.decoding.uncertainty, fairseq_pdd.distill.ensemble_stats, "
                             "fairseq_pdd.data.toy_mt, fairseq_pdd.evaluation.cli, fairseq_pdd.cli")
    assert "fairseq_pdd.distill.losses" in modules and "fairseq" not in modules


def test_import_after_fairseq_registers_everything():
    """fairseq's --user-dir imports the package after fairseq: criteria, tasks and the allow-list are in."""
    code = ("import fairseq, fairseq_pdd, argparse, torch; "
            "from fairseq.criterions import CRITERION_REGISTRY; from fairseq.tasks import TASK_REGISTRY; "
            "from fairseq import checkpoint_utils; "
            "assert 'rkl_dirichlet_proxy_distillation' in CRITERION_REGISTRY; "
            "assert 'distillation' in TASK_REGISTRY; "
            "assert checkpoint_utils.load_checkpoint_to_cpu.fairseq_pdd_wrapped; "
            "assert argparse.Namespace in torch.serialization.get_safe_globals()")
    subprocess.run([sys.executable, "-c", code], check=True)
