"""The Triton kernels, checked on CPU with Triton's interpreter, and the choice between them and the torch path.

The checks themselves are ``tests/triton_kernel_checks.py``: they need ``TRITON_INTERPRET=1`` before triton is
imported, so they run in a child pytest with it set; this process is left as it was.
"""
import os
import subprocess
import sys

import pytest
import torch

from fairseq_pdd.distill import backend

HERE = os.path.dirname(os.path.abspath(__file__))


def test_kernels_match_torch_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop(backend.ENV_VAR, None)
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
         os.path.join(HERE, "triton_kernel_checks.py")],
        cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=900,
    )
    summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else ""
    assert child.returncode == 0, child.stdout[-20000:] + child.stderr[-5000:]
    assert " passed" in summary and "skipped" not in summary, summary


def test_kernels_compile_for_an_h100_class_gpu_without_one():
    """The interpreter runs the kernels as Python; this compiles them as the GPU would (Triton's front end, LLVM,
    the ptxas it ships) for sm_90, so type or lowering errors show here, not first on a GPU."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as compile_kernel

    from fairseq_pdd.decoding import triton_measures
    from fairseq_pdd.distill import triton_losses, triton_stats

    def build(kernel, signature, constants):
        signature = dict(signature, **{name: "constexpr" for name in constants})
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        assert compile_kernel(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]

    loss_args = {"z_ptr": "*fp32", "t_ptr": "*fp32", "s_ptr": "*fp32", "loss_ptr": "*fp32", "log_norm_ptr": "*fp32",
                 "grad_ptr": "*fp32", "K": "i32", "z_stride": "i32", "t_stride": "i32", "g_stride": "i32",
                 "upper": "fp32", "model_offset": "fp32", "target_offset": "fp32",
                 "z_scale": "fp32"}
    variants = [(loss, 0, "fp32") for loss in range(4)] + [(1, 1, "fp16"), (0, 1, "bf16")]
    for loss, param, dtype in variants:
        grad = "*fp32" if dtype == "fp16" else f"*{dtype}"
        build(triton_losses._token_loss_kernel, dict(loss_args, z_ptr=f"*{dtype}", grad_ptr=grad),
              {"LOSS": loss, "PARAM": param, "NEED_GRAD": True, "BLOCK": triton_losses.MAX_BLOCK})
    for mixture in (False, True):
        for logits in (False, True):
            build(triton_stats._accumulate_kernel,
                  {"x_ptr": "*fp16" if logits else "*bf16", "sum_p_ptr": "*fp32", "sum_lp_ptr": "*fp32",
                   "probs_ptr": "*fp32", "entropy_ptr": "*fp32", "ep_ptr": "*fp32", "weight_ptr": "*fp32",
                   "finite_ptr": "*i8" if logits else "*fp32", "K": "i32", "x_stride": "i32",
                   "weight_stride": "i32", "inv_t": "fp32"},
                  {"FIRST": mixture, "WRITE_PROBS": not mixture, "MIXTURE": mixture, "LOGITS": logits,
                   "BLOCK": triton_stats.MAX_BLOCK})
        build(triton_stats._finalize_kernel,
              {"sum_p_ptr": "*fp32", "sum_lp_ptr": "*fp32", "entropy_ptr": "*fp32", "cross_ptr": "*fp32",
               "ep_ptr": "*fp32", "ep_entropy_ptr": "*fp32", "ep_cross_ptr": "*fp32", "K": "i32", "inv_m": "fp32"},
              {"MIXTURE": mixture, "BLOCK": 1024})
    build(triton_measures._dirichlet_measures_kernel, {"alpha_ptr": "*fp16", "out_ptr": "*fp32", "a0_ptr": "*fp32",
                                                       "bad_ptr": "*i8", "K": "i32", "stride": "i32"}, {"BLOCK": 1024})


def test_the_torch_path_does_not_import_triton():
    """The losses, statistics and measures import triton only when the backend picks it (CPU: never)."""
    code = ("import sys, torch; from fairseq_pdd.distill import losses, ensemble_stats; "
            "from fairseq_pdd.decoding import uncertainty, step_uncertainty; "
            "z = torch.randn(3, 5, requires_grad=True); p = torch.softmax(torch.randn(3, 5), -1); "
            "losses.rkl_proxy_loss(z, p, torch.full((3,), 9.0))[0].sum().backward(); "
            "ensemble_stats.ensemble_statistics([p.log()]); uncertainty.dirichlet_token_measures(p + 1); "
            "step_uncertainty.EnsembleStepUncertainty(2).step([p.log(), p.log()], torch.zeros(3, 1).long(), 2); "
            "print('triton' in sys.modules)")
    env = {key: value for key, value in os.environ.items() if key != backend.ENV_VAR}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split()[-1] == "False"


def test_backend_choice(monkeypatch):
    cpu32, cpu64 = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert not backend.use_triton(cpu32)  # auto: CPU tensors take the torch path
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert not backend.use_triton(cpu32)
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    assert not backend.use_triton(cpu64)  # float64 is always the torch reference
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.use_triton(cpu32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.use_triton(cpu32)
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"FAIRSEQ_PDD_KERNELS='cuda'.*'auto', 'torch', 'triton'"):
        backend.use_triton(cpu32)
