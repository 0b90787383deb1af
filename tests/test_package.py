"""What importing the package does, in a fresh interpreter."""
import subprocess
import sys


def _modules_after(statement: str) -> set:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


#: Modules that must work without fairseq: the math, the measures, evaluation, data tools, reports.
FAIRSEQ_FREE = [
    "fairseq_pdd.cli",
    "fairseq_pdd.distill.dirichlet", "fairseq_pdd.distill.ensemble_stats", "fairseq_pdd.distill.fused",
    "fairseq_pdd.distill.losses", "fairseq_pdd.distill.topk_stats", "fairseq_pdd.distill.backend",
    "fairseq_pdd.distill.special", "fairseq_pdd.distill.triton_losses", "fairseq_pdd.distill.triton_stats",
    "fairseq_pdd.decoding.uncertainty", "fairseq_pdd.decoding.step_uncertainty", "fairseq_pdd.decoding.triton_measures",
    "fairseq_pdd.teachers.cache_format",
    "fairseq_pdd.data.toy_mt", "fairseq_pdd.data.toy_asr", "fairseq_pdd.data.mt_text", "fairseq_pdd.data.librispeech",
    "fairseq_pdd.self_distillation.loss", "fairseq_pdd.self_distillation.gt_weight",
    "fairseq_pdd.self_distillation.kernel_ridge", "fairseq_pdd.self_distillation.chain_report",
    "fairseq_pdd.bdistil.boosting",
    "fairseq_pdd.evaluation.cli", "fairseq_pdd.evaluation.report", "fairseq_pdd.evaluation.ood_sets",
]


def test_pure_modules_do_not_import_fairseq():
    """The math, the evaluation, the data tools and the reports work (and start fast) without fairseq."""
    modules = _modules_after("import " + ", ".join(FAIRSEQ_FREE))
    assert set(FAIRSEQ_FREE) <= modules and "fairseq" not in modules


#: Console scripts that need neither fairseq nor torch nor sklearn to start (``--help`` in well under a second
#: of imports); the others (generate, cache, estimate-gt-weight, bdistil) drive fairseq in-process.
LIGHT_SCRIPTS = ["fairseq-pdd-user-dir", "fairseq-pdd-toy-data", "fairseq-pdd-asr-toy-data",
                 "fairseq-pdd-prepare-librispeech", "fairseq-pdd-evaluate", "fairseq-pdd-chain-report"]


def test_light_console_scripts_start_without_fairseq_torch_or_sklearn():
    """Each light script's entry-point module, imported as its console script does, leaves fairseq, torch and
    sklearn unimported (they are imported where the work needs them)."""
    from importlib.metadata import entry_points

    scripts = {e.name: e.value.split(":")[0] for e in entry_points(group="console_scripts")
               if e.value.startswith("fairseq_pdd")}
    assert set(LIGHT_SCRIPTS) <= set(scripts), set(LIGHT_SCRIPTS) - set(scripts)
    for name in LIGHT_SCRIPTS:
        heavy = _modules_after(f"import {scripts[name]}") & {"fairseq", "torch", "sklearn"}
        assert not heavy, f"{name} ({scripts[name]}) imports {sorted(heavy)} at start-up"


def test_every_module_imports():
    """Every module of the package imports (after fairseq, as --user-dir does): no stale path after a move."""
    code = ("import fairseq, importlib, pkgutil, fairseq_pdd; "
            "names = [m.name for m in pkgutil.walk_packages(fairseq_pdd.__path__, 'fairseq_pdd.')]; "
            "[importlib.import_module(n) for n in names]; print(len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) >= 45


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
