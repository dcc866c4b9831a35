"""What the GPU compiler makes of each Triton kernel, read without a GPU (no device time needed).

    python benchmarks/kernel_resources.py            # table; exit 1 if a check fails
    python benchmarks/kernel_resources.py --json     # also write benchmarks/results/kernel_resources_sm<arch>.json
    python benchmarks/kernel_resources.py --arch 80  # another target (default 90: H100/H200)

Every kernel is compiled at the config its launcher picks for the GLM-4V-9B shapes, all the way to a
cubin with the ptxas and cuobjdump that ship with triton. Arguments get the specialization the JIT
gives aligned tensors (pointers and strides divisible by 16), so this is the code a GPU would run.
From the cubin's resource usage and SASS we check, per kernel:
  - no register spills (stack frame 0, no LDL/STL): a spill puts local-memory traffic in the loop;
  - shared memory within the target's per-block limit (227 KB on sm_90, 163 KB on sm_80);
  - attention K/V loads pipelined (LDGSTS, i.e. cp.async, num_stages deep);
  - bf16 attention tiles of 64+ rows on tensor cores: HGMMA (wgmma) on sm_90, HMMA before;
  - RMSNorm rows moved in 16-byte accesses (LDG.E.128).
These are compile facts, not timings: benchmarks/kernels.py measures on a GPU.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler; must precede `import triton`
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from glm4v_kernels import flash_attention as A  # noqa: E402
from glm4v_kernels import flash_attention_backward as AB
from glm4v_kernels import fused_rms_norm as R

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes per block (opt-in maximum): H100, A100
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
SASS_OPS = ("HGMMA", "HMMA", "LDGSTS", "LDG.E.128", "LDL", "STL")


@dataclass
class Case:
    name: str
    fn: object                     # the @triton.jit kernel
    types: dict                    # argument name -> triton type, for pointers and floats (others i32)
    constexprs: dict
    num_warps: int
    num_stages: int = 1
    expect: set = field(default_factory=set)  # among "tensor_cores", "pipelined", "wide_loads"
    aligned: tuple = ()            # integer arguments that are multiples of 16 at these shapes


def attention_types(dtype: torch.dtype) -> dict:
    name = DTYPE_NAMES[dtype]
    return {"q_ptr": f"*{name}", "k_ptr": f"*{name}", "v_ptr": f"*{name}", "o_ptr": f"*{name}",
            "key_start_ptr": "*i32", "key_end_ptr": "*i32", "lse_ptr": "*fp32", "part_o_ptr": "*fp32",
            "part_lse_ptr": "*fp32", "qk_scale": "fp32", "sm_scale": "fp32", "delta_ptr": "*fp32",
            "do_ptr": f"*{name}", "dq_ptr": f"*{name}", "dk_ptr": f"*{name}", "dv_ptr": f"*{name}"}


def prefill_case(dtype, D, causal, key_start, group=16) -> Case:
    bm, bn, nw, ns = A._prefill_config(D, dtype, False, key_start)
    expect = {"pipelined"} | ({"tensor_cores"} if dtype != torch.float32 else set())
    return Case(f"prefill {DTYPE_NAMES[dtype]} D{D}{' causal' if causal else ''}{' key_start' if key_start else ''}",
                A._attn_fwd_kernel, attention_types(dtype),
                dict(GROUP=group, CAUSAL=causal, HAS_KEY_START=key_start, HAS_KEY_END=False, HEAD_DIM=D,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(D))), nw, ns, expect)


def decode_case(dtype, D, rows, group=16) -> Case:
    """rows = group * Lq: the decode tile's height follows it (16 .. the config's largest)."""
    max_bm, bn, nw, ns = A._decode_config(D, dtype, False)
    bm = min(max_bm, max(16, triton.next_power_of_2(rows)))
    expect = {"pipelined"} | ({"tensor_cores"} if dtype != torch.float32 and bm >= 64 else set())
    return Case(f"decode {DTYPE_NAMES[dtype]} D{D} rows {rows}", A._attn_decode_kernel, attention_types(dtype),
                dict(GROUP=group, CAUSAL=True, HAS_KEY_START=True, HAS_KEY_END=True, SPLIT=True, HEAD_DIM=D,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(D))), nw, ns, expect)


def backward_case(kernel, dtype, D, causal, key_range, group=16, group_split=1) -> Case:
    """kernel: "dkdv" or "dq"; key_range: key_start and key_end given (a padded batch);
    group_split > 1: dk / dv are fp32 partials of a split group (short sequences)."""
    bm, bn, nw, ns = AB._backward_config(D, dtype, False)
    rows = bn if kernel == "dkdv" else bm  # the tile height of the kernel's dots (wgmma needs 64)
    expect = {"tensor_cores"} if dtype != torch.float32 and rows >= 64 else set()
    fn, split = AB._attn_bwd_dq_kernel, {}
    types = attention_types(dtype)
    if kernel == "dkdv":
        fn, split = AB._attn_bwd_dkdv_kernel, dict(GROUP_SPLIT=group_split)
        if group_split > 1:
            types |= {"dk_ptr": "*fp32", "dv_ptr": "*fp32"}
    name = (f"bwd {kernel} {DTYPE_NAMES[dtype]} D{D}{' causal' if causal else ''}{' range' if key_range else ''}"
            f"{f' split {group_split}' if group_split > 1 else ''}")
    return Case(name, fn, types,
                dict(GROUP=group, CAUSAL=causal, HAS_KEY_START=key_range, HAS_KEY_END=key_range, HEAD_DIM=D,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(D)), **split), nw, ns, expect)


def rms_case(dtype, N, residual, backward=False) -> Case:
    t = DTYPE_NAMES[dtype]
    block_n = triton.next_power_of_2(N)
    if backward:
        return Case(f"rms_norm bwd {t} N{N}", R._rms_norm_bwd_kernel,
                    {"dy_ptr": f"*{t}", "x_ptr": f"*{t}", "w_ptr": f"*{t}", "rstd_ptr": "*fp32",
                     "ds_ptr": f"*{t}", "dx_ptr": f"*{t}", "dw_part_ptr": "*fp32"},
                    dict(HAS_DS=residual, BLOCK_N=block_n), R._num_warps(block_n), expect={"wide_loads"},
                    aligned=("N",))
    return Case(f"rms_norm fwd {t} N{N}{' +residual' if residual else ''}", R._rms_norm_fwd_kernel,
                {"x_ptr": f"*{t}", "res_ptr": f"*{t}", "w_ptr": f"*{t}", "y_ptr": f"*{t}", "s_ptr": f"*{t}",
                 "rstd_ptr": "*fp32", "eps": "fp32"},
                dict(HAS_RESIDUAL=residual, BLOCK_N=block_n), R._num_warps(block_n),
                expect={"wide_loads"}, aligned=("N",))


def cases() -> list[Case]:
    bf16, fp32 = torch.bfloat16, torch.float32
    return [
        prefill_case(bf16, 112, False, False),            # ViT: (1, 16, 6401, 112) bidirectional
        prefill_case(bf16, 128, True, False, group=16),   # decoder prefill: 32 q / 2 kv heads
        prefill_case(bf16, 128, True, True, group=16),    # left-padded batch
        prefill_case(torch.float16, 64, True, False, group=4),
        prefill_case(bf16, 64, True, True, group=4),
        prefill_case(bf16, 80, False, True, group=1),
        prefill_case(bf16, 256, True, False, group=1),
        prefill_case(fp32, 112, False, False),            # fp32: the parity path
        prefill_case(fp32, 128, True, True),
        prefill_case(fp32, 256, True, False, group=1),
        decode_case(bf16, 128, 16),                       # batch decode: 16 query heads x 1 query
        decode_case(bf16, 128, 256),                      # 16 heads x 16 queries (chunked / speculative)
        decode_case(bf16, 256, 64, group=4),
        decode_case(fp32, 64, 16),
        decode_case(fp32, 128, 16),
        decode_case(fp32, 256, 64, group=4),
        *(backward_case(kernel, bf16, 112, False, False, group=1) for kernel in ("dkdv", "dq")),  # ViT
        *(backward_case(kernel, bf16, 128, True, True) for kernel in ("dkdv", "dq")),  # decoder, padded
        backward_case("dkdv", bf16, 128, True, False, group_split=4),  # decoder at 2k, batch 1
        *(backward_case(kernel, bf16, 256, True, False, group=1) for kernel in ("dkdv", "dq")),
        *(backward_case(kernel, fp32, 128, True, False) for kernel in ("dkdv", "dq")),
        Case("decode combine bf16 D128", A._attn_combine_kernel,
             {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "o_ptr": "*bf16", "lse_ptr": "*fp32"},
             dict(HEAD_DIM=128, BLOCK_S=A.MAX_SPLITS, BLOCK_D=128), num_warps=4),
        rms_case(bf16, 4096, True),
        rms_case(bf16, 1792, False),
        rms_case(bf16, 16384, True),
        rms_case(fp32, 4096, False),
        rms_case(bf16, 4096, True, backward=True),
    ]


def compile_case(case: Case, arch: int):
    names = case.fn.arg_names
    constexprs = {**case.constexprs, "INTERPRETED": False}
    signature = {n: "constexpr" if n in constexprs else case.types.get(n, "i32") for n in names}
    # what the JIT infers for 16-byte-aligned tensors and integers that are multiples of 16
    # (strides at these head dims; sequence lengths are left unaligned, the worst case)
    aligned = [i for i, n in enumerate(names) if n not in constexprs
               and (signature[n].startswith("*") or "stride" in n or n in case.aligned)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(fn=case.fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=case.num_warps, num_stages=case.num_stages))


def cuda_tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this triton wheel ships no {name}")
    return str(path)


def inspect(case: Case, arch: int) -> dict:
    kernel = compile_case(case, arch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([cuda_tool("cuobjdump"), "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuda_tool("cuobjdump"), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    regs, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    ops = Counter(op for op in re.findall(r"\b([A-Z][A-Z0-9]*(?:\.E\.128)?)\b", sass) if op in SASS_OPS)
    row = {"kernel": case.name, "config": {k: v for k, v in case.constexprs.items() if k.startswith("BLOCK_")}
           | {"num_warps": case.num_warps, "num_stages": case.num_stages},
           "registers": regs, "stack_bytes": stack, "shared_bytes": kernel.metadata.shared,
           "sass": {op: ops.get(op, 0) for op in SASS_OPS}}
    row["problems"] = problems(row, case.expect, arch)
    return row


def problems(row: dict, expect: set, arch: int) -> list[str]:
    sass, found = row["sass"], []
    if row["stack_bytes"] or sass["LDL"] or sass["STL"]:
        found.append(f"register spills: {row['stack_bytes']} B stack, {sass['LDL']} LDL / {sass['STL']} STL")
    if row["shared_bytes"] > SHARED_LIMIT.get(arch, SHARED_LIMIT[80]):
        found.append(f"shared memory {row['shared_bytes']} B > the sm_{arch} limit")
    if "pipelined" in expect and not sass["LDGSTS"]:
        found.append("K/V loads not pipelined (no LDGSTS)")
    if "tensor_cores" in expect and not sass["HGMMA" if arch >= 90 else "HMMA"]:
        found.append("dots not on " + ("wgmma (no HGMMA)" if arch >= 90 else "tensor cores (no HMMA)"))
    if "wide_loads" in expect and not sass["LDG.E.128"]:
        found.append("no 16-byte loads (LDG.E.128)")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90)")
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/kernel_resources_sm<arch>.json")
    args = parser.parse_args(argv)
    rows = [inspect(case, args.arch) for case in cases()]
    print(f"{'kernel':34} {'config (BLOCK_*, warps, stages)':36} {'regs':>4} {'stack':>5} {'smem KB':>7}  "
          + " ".join(f"{op:>9}" for op in SASS_OPS))
    for r in rows:
        config = ",".join(str(v) for v in r["config"].values())
        print(f"{r['kernel']:34} {config:36} {r['registers']:4d} {r['stack_bytes']:5d} "
              f"{r['shared_bytes'] / 1024:7.0f}  " + " ".join(f"{r['sass'][op]:9d}" for op in SASS_OPS))
    failed = [f"{r['kernel']}: {p}" for r in rows for p in r["problems"]]
    for line in failed:
        print("PROBLEM", line)
    print(f"{len(rows)} kernels compiled for sm_{args.arch} with triton {triton.__version__}: "
          + (f"{len(failed)} problem(s)" if failed else "no problems"))
    if args.json:
        write_result(f"kernel_resources_sm{args.arch}", {
            "what": "static compile facts (no GPU run): registers, spills, shared memory, SASS op counts",
            "target": f"sm_{args.arch}", "triton": triton.__version__, "kernels": rows})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
