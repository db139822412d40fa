"""Benchmark the kernels: Triton vs torch eager (the reference) vs torch.compile(reference).

    python benchmarks/bench_kernels.py            # CUDA: B in {256, 4096, 65536}, all providers
    python benchmarks/bench_kernels.py --smoke    # CPU: tiny shapes, torch providers, checks it runs

Sizes are the student's: V = 3000 codes, D = 64 embedding, bags of L = 32 slots (~60% filled),
head hidden 128 -> M = 200 medications. Each row: median time of repeats (triton.testing.do_bench
on CUDA, perf_counter on CPU), achieved GB/s from the bytes an ideal fused kernel must move, that
as a fraction of the device's measured copy bandwidth, and the speedup over torch eager measured
in the same run. "student" is the forward's kernel path: 3 bags -> concat -> Linear(192, 128) + GELU
-> head probabilities.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from leader_edge import kernels
from leader_edge.kernels import reference

V, D, L, FILL, HIDDEN, M = 3000, 64, 32, 0.6, 128, 200
PROVIDERS = ("triton", "torch", "torch.compile")


@dataclass
class Case:
    op: str  # embedding_bag | linear_sigmoid | linear_bce_with_logits | student
    backward: bool
    fns: dict[str, Callable[[], object]]  # provider -> closure running one step
    nbytes: int  # ideal bytes moved by one step


def timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of one call."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=max(repeats, 20), return_mode="median")

    def cpu(fn: Callable[[], object]) -> float:
        fn(), fn()  # warm-up (and torch.compile's compile)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    return cpu


def copy_bandwidth(device: torch.device, time_ms: Callable, numel: int) -> float:
    """GB/s of dst.copy_(src) on `numel` fp32 (read + write counted)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (time_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def make_codes(b: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    codes = torch.randint(0, V, (b, L), generator=gen)
    codes[torch.rand(b, L, generator=gen) > FILL] = -1
    return codes.to(device)


def step(forward: Callable[[], torch.Tensor], backward: bool, inputs: list[torch.Tensor]) -> Callable[[], object]:
    """One forward (under no_grad, as at serving), or forward + backward to `inputs` (upstream ones)."""
    if not backward:
        def run_forward():
            with torch.no_grad():
                return forward()

        return run_forward

    def run():
        out = forward()
        return torch.autograd.grad(out, inputs, torch.ones_like(out))

    return run


def cases(b: int, device: torch.device, providers: tuple[str, ...], dtype: torch.dtype) -> list[Case]:
    gen = torch.Generator().manual_seed(b)
    esize = torch.finfo(dtype).bits // 8
    table = torch.randn(V, D, generator=gen).to(device, dtype).requires_grad_()
    codes = [make_codes(b, device, gen) for _ in range(3)]
    x = torch.randn(b, HIDDEN, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(M, HIDDEN, generator=gen) * HIDDEN**-0.5).to(device, dtype).requires_grad_()
    bias = torch.zeros(M, device=device, dtype=dtype, requires_grad=True)
    target = (torch.rand(b, M, generator=gen) < 0.1).float().to(device)
    mlp_w = (torch.randn(HIDDEN, 3 * D, generator=gen) * (3 * D) ** -0.5).to(device, dtype)
    compiled = {name: torch.compile(getattr(reference, name)) for name in
                ("embedding_bag", "linear_sigmoid", "linear_bce_with_logits")} if "torch.compile" in providers else {}

    def impl(provider: str, name: str) -> Callable:
        if provider == "triton":
            return lambda *a: getattr(kernels, name)(*a, backend="triton")
        return compiled[name] if provider == "torch.compile" else getattr(reference, name)

    def student(provider: str) -> Callable[[], torch.Tensor]:
        bag, head = impl(provider, "embedding_bag"), impl(provider, "linear_sigmoid")

        def forward():
            v = torch.cat([bag(table, c, "mean") for c in codes], dim=-1)  # 3 x [B, D] -> [B, 3D]
            return head(F.gelu(F.linear(v, mlp_w)), w, bias)  # [B, 3D] -> [B, HIDDEN] -> [B, M]

        return forward

    def bag_forward(p: str) -> Callable[[], torch.Tensor]:
        f = impl(p, "embedding_bag")
        return lambda: f(table, codes[0], "mean")

    def sigmoid_forward(p: str) -> Callable[[], torch.Tensor]:
        f = impl(p, "linear_sigmoid")
        return lambda: f(x, w, bias)

    def bce_forward(p: str) -> Callable[[], torch.Tensor]:
        f = impl(p, "linear_bce_with_logits")
        return lambda: f(x, w, bias, target)

    filled = int((codes[0] >= 0).sum())
    bag_bytes = b * L * 8 + filled * D * esize + b * D * esize  # codes + gathered rows + out
    lin_bytes = (b * HIDDEN + M * HIDDEN) * esize + b * M * esize  # x + weight + probabilities
    bce_bytes = (b * HIDDEN + M * HIDDEN) * esize + b * M * 4  # x + weight + target (no logits)
    # Backward extras: bag reads grad_out and adds rows into grad_weight; the linears read/write
    # dlogits [B, M] and write dx, dweight.
    bag_bwd = b * D * 4 + filled * D * 4 + V * D * 4
    lin_bwd = 2 * b * M * 4 + (b * HIDDEN + M * HIDDEN) * esize
    out = []
    for backward in (False, True):
        def per(build: Callable[[str], Callable[[], torch.Tensor]], inputs: list[torch.Tensor]) -> dict:
            return {p: step(build(p), backward, inputs) for p in providers}

        out += [
            Case("embedding_bag", backward, per(bag_forward, [table]), bag_bytes + (bag_bwd if backward else 0)),
            Case("linear_sigmoid", backward, per(sigmoid_forward, [x, w, bias]), lin_bytes + (lin_bwd if backward else 0)),
            Case("linear_bce_with_logits", backward, per(bce_forward, [x, w, bias]), bce_bytes + (lin_bwd if backward else 0)),
            Case("student", backward, per(student, [table, w, bias]),
                 3 * bag_bytes + lin_bytes + ((3 * bag_bwd + lin_bwd) if backward else 0)),
        ]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, torch providers only")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 256 4096 65536)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=None,
                        help="CPU: timed calls (default 5); CUDA: do_bench's rep budget in ms (default 100)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke (CPU, torch providers) or on a GPU")
    # On CPU the Triton provider would time the interpreter (~1 s a call): only on request.
    default_providers = PROVIDERS if device.type == "cuda" else ("torch", "torch.compile")
    if "triton" in (args.providers or ()) and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--providers triton on CPU needs TRITON_INTERPRET=1")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU is shared: one thread per process keeps medians stable
    providers = tuple(args.providers or default_providers)
    batches = args.batch or ([256, 4096, 65536] if device.type == "cuda" else [64, 256])
    repeats = args.repeats or (100 if device.type == "cuda" else 5)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    time_ms = timer(device, repeats)

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    load = f", load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    bandwidth = copy_bandwidth(device, time_ms, 1 << 28 if device.type == "cuda" else 1 << 22)
    print(f"# {name}, torch {torch.__version__}, {args.dtype}, copy bandwidth {bandwidth:.0f} GB/s{load}")
    print(f"# V={V} D={D} L={L} (fill {FILL}) hidden={HIDDEN} M={M}; median of {repeats} repeats\n")
    print("| op | pass | B | provider | ms | GB/s | % copy BW | speedup vs torch |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for b in batches:
        for case in cases(b, device, providers, dtype):
            times = {}
            for provider, fn in case.fns.items():
                try:
                    times[provider] = time_ms(fn)
                except Exception as exc:  # e.g. torch.compile without a C++ compiler: report, go on
                    print(f"| {case.op} | {'fwd+bwd' if case.backward else 'fwd'} | {b} | {provider} | "
                          f"error: {type(exc).__name__} | | | |")
            for provider, ms in times.items():
                gbs = case.nbytes / (ms * 1e-3) / 1e9
                speedup = f"{times['torch'] / ms:.2f}x" if "torch" in times else "n/a"
                print(f"| {case.op} | {'fwd+bwd' if case.backward else 'fwd'} | {b} | {provider} | {ms:.4f} | "
                      f"{gbs:.3g} | {100 * gbs / bandwidth:.0f}% | {speedup} |", flush=True)


if __name__ == "__main__":
    main()
