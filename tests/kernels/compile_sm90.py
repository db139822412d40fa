"""Compile every Triton kernel for an H100 (sm_90) without a GPU: catches what the interpreter lets
through (dtype/shape rules of the real compiler, tl.dot constraints). Run by test_compile.py in a
process with TRITON_INTERPRET=0, since interpreted kernels cannot be compiled. Prints one line per
kernel: "<name> ok" or "<name> FAILED: <error>".
"""

import os

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from leader_edge.kernels import triton_embedding_bag as bag  # noqa: E402
from leader_edge.kernels import triton_wide_max_head as head  # noqa: E402

I, C = "i32", "constexpr"
TILES = dict(BLOCK_B=64, BLOCK_M=64, BLOCK_K=32)


def jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):  # unwrap the Autotuner
        kernel = kernel.fn
    return kernel


def cases(p: str):
    """(kernel, signature, constexprs) with float pointers of type `p`."""
    yield bag._embedding_bag_forward_kernel, dict(
        weight_ptr=p, codes_ptr="*i64", out_ptr=p, scale_ptr="*fp32", V=I, L=I, D=I, stride_weight_v=I, stride_out_b=I,
        MEAN=C, BLOCK_L=C, BLOCK_D=C), dict(MEAN=True, BLOCK_L=16, BLOCK_D=64)
    yield bag._embedding_bag_backward_atomic_kernel, dict(
        grad_out_ptr=p, codes_ptr="*i64", scale_ptr="*fp32", grad_weight_ptr="*fp32", V=I, L=I, D=I,
        stride_grad_out_b=I, stride_grad_weight_v=I, BLOCK_L=C, BLOCK_D=C), dict(BLOCK_L=16, BLOCK_D=64)
    yield bag._embedding_bag_backward_sorted_kernel, dict(
        grad_out_ptr=p, scale_ptr="*fp32", bag_of_ptr="*i64", segment_ptr="*i64", grad_weight_ptr=p, D=I,
        stride_grad_out_b=I, stride_grad_weight_v=I, BLOCK_L=C, BLOCK_D=C), dict(BLOCK_L=16, BLOCK_D=64)
    head_args = dict(h_ptr=p, weight_ptr=p, bias_ptr=p, table_ptr=p, codes_ptr="*i64", extra_ptr=p, target_ptr="*fp32",
                     out_ptr=p, best_ptr="*fp32", ties_ptr="*fp32", partial_ptr="*fp32", B=I, M=I, D=I, L=I, B_BUCKET=I,
                     stride_h_b=I, stride_weight_m=I, stride_table_v=I, stride_codes_b=I, HAS_BIAS=C, HAS_WIDE=C,
                     HAS_EXTRA=C, SIGMOID=C, LOSS=C, SAVE_WIDE=C, UPCAST=C, BLOCK_B=C, BLOCK_M=C, BLOCK_K=C)
    for loss in (False, True):  # inference (sigmoid, nothing saved) and training (loss, max and ties saved)
        yield head._wide_max_head_forward_kernel, {**head_args, "out_ptr": "*fp32" if loss else p}, dict(
            HAS_BIAS=True, HAS_WIDE=True, HAS_EXTRA=True, SIGMOID=not loss, LOSS=loss, SAVE_WIDE=loss, UPCAST=False, **TILES)
    yield head._wide_max_head_backward_kernel, dict(
        dlogits_ptr="*fp32", scale_ptr="*fp32", table_ptr=p, codes_ptr="*i64", best_ptr="*fp32", ties_ptr="*fp32",
        grad_table_ptr="*fp32", B=I, M=I, L=I, stride_table_v=I, stride_codes_b=I, BLOCK_B=C, BLOCK_M=C),\
        dict(BLOCK_B=32, BLOCK_M=64)
    yield head._wide_max_head_backward_sorted_kernel, dict(
        dlogits_ptr="*fp32", scale_ptr="*fp32", table_ptr=p, best_ptr="*fp32", ties_ptr="*fp32", bag_of_ptr="*i64",
        segment_ptr="*i64", grad_table_ptr=p, M=I, stride_table_v=I, BLOCK_B=C, BLOCK_M=C), dict(BLOCK_B=32, BLOCK_M=64)


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    for p in ("*fp32", "*bf16"):
        for kernel, signature, constexprs in cases(p):
            fn = jit_function(kernel)
            try:
                triton.compile(ASTSource(fn, signature, constexprs), target=target)
                print(f"{fn.__name__}[{p}] ok", flush=True)
            except Exception as exc:  # report every kernel, not just the first failure
                print(f"{fn.__name__}[{p}] FAILED: {type(exc).__name__}: {str(exc)[-600:]}", flush=True)


if __name__ == "__main__":
    main()
