"""Compile the Triton kernels for an sm_90 GPU without one (ptxas ships with triton).

Run by tests/test_kernels_compile.py in a subprocess without TRITON_INTERPRET, so that the code
path a GPU takes (not the interpreter's) is type-checked and lowered. Prints one line per kernel.
"""
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from glm4v_kernels import flash_attention as A, fused_rms_norm as R
TARGET = GPUTarget("cuda", 90, 32)
NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_kernel(fn, pointer_types: dict, constexprs: dict, **options) -> None:
    signature = {n: "constexpr" if n in constexprs else pointer_types.get(n, "i32") for n in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET, options=options)
    print("compiled", fn.__name__, {k: v for k, v in constexprs.items() if k != "INTERPRETED"}, options)


def attention_types(dtype: str) -> dict:
    types = {n: "*" + dtype for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
    return {**types, "key_start_ptr": "*i32", "qk_scale": "fp32", "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32"}


def main() -> None:
    for dtype, D, causal, key_mask in ((torch.bfloat16, 112, False, False), (torch.bfloat16, 128, True, True),
                                       (torch.float32, 128, True, False)):
        bm, bn, nw, ns = A._prefill_config(D, dtype, False)
        meta = dict(GROUP=16, CAUSAL=causal, HAS_KEY_MASK=key_mask, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_D=triton.next_power_of_2(D), INTERPRETED=False)
        compile_kernel(A._attn_fwd_kernel, attention_types(NAMES[dtype]), meta, num_warps=nw, num_stages=ns)
    max_bm, bn, nw, ns = A._decode_config(128, torch.bfloat16, False)
    for bm in (16, max_bm):
        meta = dict(GROUP=16, CAUSAL=True, HAS_KEY_MASK=True, SPLIT=True, HEAD_DIM=128, BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_D=128, INTERPRETED=False)
        compile_kernel(A._attn_decode_kernel, attention_types("bf16"), meta, num_warps=nw, num_stages=ns)
    compile_kernel(A._attn_combine_kernel, {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "o_ptr": "*bf16"},
                   dict(HEAD_DIM=128, BLOCK_S=64, BLOCK_D=128, INTERPRETED=False), num_warps=4)
    bn = triton.next_power_of_2(4096)
    compile_kernel(R._rms_norm_fwd_kernel,
                   dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", s_ptr="*bf16",
                        rstd_ptr="*fp32", eps="fp32"),
                   dict(HAS_RESIDUAL=True, STORE_RSTD=True, BLOCK_N=bn, INTERPRETED=False), num_warps=R._num_warps(bn))
    compile_kernel(R._rms_norm_bwd_kernel,
                   dict(dy_ptr="*bf16", x_ptr="*bf16", w_ptr="*bf16", rstd_ptr="*fp32", ds_ptr="*bf16",
                        dx_ptr="*bf16", dw_part_ptr="*fp32"),
                   dict(HAS_DS=True, BLOCK_N=bn, INTERPRETED=False), num_warps=R._num_warps(bn))
    print("all kernels compiled for", TARGET)


if __name__ == "__main__":
    main()
