"""The tensor-core product + rotation kernels (road_cuda.h) against cuBLAS, per projection, without onnxruntime.

Compiles the kernel source that road_cuda.h embeds with NVRTC, as the library does at its first CUDA use, from the
working tree and, with `--base REV`, from a git revision too; loads it with the CUDA driver API into torch's context
and times, for each projection of a Llama with TinyLlama-1.1B widths (packed qkv 2048 -> 2560, o 2048 -> 2048,
gate/up 2048 -> 5632, down 5632 -> 2048) at 1 and 8 rows, fp16 and 4-bit (MatMulNBits blocks of 32, symmetric):

    cublas     torch.matmul(X, W) with W [k, n] fp16: the cuBLAS product onnxruntime's MatMul runs (fp16 only)
    <form>     R launches of one kernel form: `mma` (the default: one tile of 8 rotation pairs a block, 8 warps
               splitting k), `mma16` (16 warps: ROAD_EXPORT_MMA_WARPS=16), `mixed` (the default form with per-row
               adapter ids over 8 banks), `t<TM>w<W>[u<U>]` (TM tiles a block, W warps, U k steps a round: the
               template instantiated for this benchmark only); each from the working tree and, for `mma` and
               `mixed` with --base, from the other source as `base:<form>`

R = 22 products of one input, each with its own weights (nothing stays in L2 between them), are captured in one
CUDA graph per form and replayed `--inner` times a sample; forms are timed in turn, `--rounds` times (the pairing
of tools/benchlib.py), and each form's median per-product time is printed with its median ratio to the first
form timed in the same round (cuBLAS for fp16, else the first kernel form). Every form's output is first checked
against torch's float32 rotate(X @ W^T).

    python tools/bench_kernels.py [--base HEAD|FILE] [--rounds 20] [--inner 20]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "road_export/graph/native/road_cuda.h"
SHAPES = {"qkv": (2048, 2560), "o": (2048, 2048), "gate/up": (2048, 5632), "down": (5632, 2048)}
R = 22
G = 64
BLOCK = 32
BANKS = 8


class Params(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("c1", ctypes.c_void_p), ("c2", ctypes.c_void_p), ("y", ctypes.c_void_p),
                ("d", ctypes.c_longlong), ("half", ctypes.c_longlong), ("pairs", ctypes.c_longlong),
                ("rows", ctypes.c_longlong), ("lead_dims", ctypes.c_longlong * 8),
                ("c1_stride", ctypes.c_longlong * 8), ("c2_stride", ctypes.c_longlong * 8), ("lead", ctypes.c_int),
                ("ids", ctypes.c_void_p), ("rows_per_id", ctypes.c_longlong), ("banks", ctypes.c_longlong)]


class LinParams(ctypes.Structure):
    _fields_ = [("p", Params), ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("k", ctypes.c_longlong),
                ("blocks_per_col", ctypes.c_longlong), ("block_size", ctypes.c_int), ("bits", ctypes.c_int)]


def kernel_source(revision: str | None) -> str:
    """The CUDA source road_cuda.h embeds (between R"CUDA( and )CUDA"): the working tree's (None), a copy of
    road_cuda.h at a file path, or the one at a git revision."""
    if revision is None:
        text = (ROOT / HEADER).read_text()
    elif Path(revision).is_file():
        text = Path(revision).read_text()
    else:
        text = subprocess.run(["git", "show", f"{revision}:{HEADER}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
    return text[text.index('R"CUDA(') + 7:text.index(')CUDA"')]


def compile_cubin(source: str, arch: int) -> bytes:
    """NVRTC's cubin of `source` for sm_<arch>, with the options road_cuda.h's `cubin_for` passes."""
    from road_export.graph.native import nvrtc_path

    found = nvrtc_path()
    nv = ctypes.CDLL(str(found) if found else "libnvrtc.so")
    program = ctypes.c_void_p()
    assert nv.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"road_cuda.cu", 0, None, None) == 0
    options = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17", b"-default-device"]
    if nv.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options)) != 0:
        size = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nv.nvrtcGetProgramLog(program, log)
        raise SystemExit(f"NVRTC: {log.value.decode()[:2000]}")
    size = ctypes.c_size_t()
    nv.nvrtcGetCUBINSize(program, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    nv.nvrtcGetCUBIN(program, cubin)
    return cubin.raw


class Module:
    """A cubin loaded into torch's current CUDA context; `launch(name, grid, threads, params)` on torch's current
    stream (so that torch.cuda.graph captures it)."""

    def __init__(self, cubin: bytes):
        import torch

        torch.cuda.init()
        torch.zeros(1, device="cuda")  # makes the primary context current on this thread
        self.cu = ctypes.CDLL("libcuda.so.1")
        self.module = ctypes.c_void_p()
        self._check(self.cu.cuModuleLoadData(ctypes.byref(self.module), cubin), "cuModuleLoadData")
        self.functions: dict[str, ctypes.c_void_p] = {}

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"{what}: CUDA error {result}")

    def launch(self, name: str, grid: tuple[int, int], threads: int, params: LinParams) -> None:
        import torch

        if name not in self.functions:
            function = ctypes.c_void_p()
            self._check(self.cu.cuModuleGetFunction(ctypes.byref(function), self.module, name.encode()), name)
            self.functions[name] = function
        args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(params), ctypes.c_void_p))
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._check(self.cu.cuLaunchKernel(self.functions[name], grid[0], grid[1], 1, threads, 1, 1, 0, stream, args,
                                           None), f"cuLaunchKernel {name}")


def quantize(w, torch):
    """W [n, k] float32 as MatMulNBits' symmetric 4-bit blocks [n, k / 32, 16] uint8 (low nibble first), scales
    [n, k / 32] fp16, and the dequantized W (what the kernels multiply by)."""
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    scales = (blocks.abs().amax(-1) / 7).clamp_min(1e-8).half()
    q = torch.clamp(torch.round(blocks / scales.float()[..., None]) + 8, 0, 15).to(torch.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()
    return packed, scales.contiguous(), ((q.float() - 8) * scales.float()[..., None]).reshape(n, k)


class Case:
    """R products of one shape: weights, coefficients (one adapter, or BANKS banks and per-row ids) and outputs."""

    def __init__(self, torch, precision: str, k: int, n: int, rows: int, seed: int = 0):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.torch, self.precision, self.k, self.n, self.rows = torch, precision, k, n, rows
        self.x = torch.randn(rows, k, device="cuda", generator=gen).half()
        self.w, self.wt, self.scales, self.dense = [], [], [], []
        for _ in range(R):
            w = torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5
            if precision == "int4":
                packed, scales, dense = quantize(w, torch)
                self.w.append(packed)
                self.scales.append(scales)
                self.dense.append(dense)
            else:
                self.w.append(w.half().contiguous())
                self.wt.append(w.half().t().contiguous())
                self.scales.append(None)
                self.dense.append(w.half().float())
        theta = torch.rand(BANKS, n, device="cuda", generator=gen) * 6.28
        alpha = 1 + 0.1 * torch.randn(BANKS, n, device="cuda", generator=gen)
        self.c1 = (alpha * torch.cos(theta)).half().contiguous()
        self.c2 = (alpha * torch.sin(theta)).half().contiguous()
        self.ids = torch.arange(rows, device="cuda", dtype=torch.int64) % BANKS
        self.y = [torch.empty(rows, n, device="cuda", dtype=torch.float16) for _ in range(R)]
        self.params: list[LinParams] = []

    def expected(self, i: int, mixed: bool):
        """torch's float32 rotate(X @ W_i^T) (peft's layout: pairs (j, j + g/2) inside each group of g)."""
        torch = self.torch
        h = self.x.float() @ self.dense[i].t()
        c1 = (self.c1[self.ids] if mixed else self.c1[:1].expand(self.rows, -1)).float()
        c2 = (self.c2[self.ids] if mixed else self.c2[:1].expand(self.rows, -1)).float()
        hg = h.reshape(self.rows, -1, 2, G // 2)
        a, b = c1.reshape(hg.shape), c2.reshape(hg.shape)
        y1 = a[:, :, 0] * hg[:, :, 0] - b[:, :, 0] * hg[:, :, 1]
        y2 = b[:, :, 1] * hg[:, :, 0] + a[:, :, 1] * hg[:, :, 1]
        return torch.stack([y1, y2], 2).reshape(self.rows, self.n)

    def launcher(self, module: Module, form: str):
        """A function launching the R products of `form` (see the module's docstring) on torch's current stream."""
        mixed = form == "mixed"
        suffix = ("nb4_" if self.precision == "int4" else "") + "f16"
        tm, warps, _ = (1, 16, 2) if form == "mma16" else (1, 8, 2) if form in ("mma", "mixed") else variant(form)
        name = (f"road_mma1w16_{suffix}" if form == "mma16" else f"road_mma1_{suffix}" if tm == 1 and warps == 8
                and form in ("mma", "mixed") else f"bench_{form}_{suffix}")
        threads = 32 * warps
        params = []
        for i in range(R):
            p = Params(x=self.x.data_ptr(), c1=self.c1.data_ptr(), c2=self.c2.data_ptr(), y=self.y[i].data_ptr(),
                       d=self.n, half=G // 2, pairs=self.n // 2, rows=self.rows, lead=0,
                       ids=self.ids.data_ptr() if mixed else None, rows_per_id=1, banks=BANKS)
            params.append(LinParams(p=p, w=self.w[i].data_ptr(),
                                    scales=self.scales[i].data_ptr() if self.scales[i] is not None else None,
                                    k=self.k, blocks_per_col=self.k // BLOCK, block_size=BLOCK,
                                    bits=4 if self.precision == "int4" else 0))
        self.params.extend(params)  # kept alive: the graph holds their values, the launches their addresses
        grid = ((self.n // 16 + tm - 1) // tm, (self.rows + 7) // 8)

        def run():
            for p in params:
                module.launch(name, grid, threads, p)

        run()
        self.torch.cuda.synchronize()
        for i in range(R):
            got, want = self.y[i].float(), self.expected(i, mixed)
            err = ((got - want).abs().max() / want.abs().max()).item()
            if not err < 5e-3:
                raise SystemExit(f"{form} {self.precision} k={self.k} n={self.n} rows={self.rows}: product {i} "
                                 f"off by {err:.2e} of its largest value")
        return run

    def cublas(self):
        torch = self.torch

        def run():
            for i in range(R):
                torch.matmul(self.x, self.wt[i], out=self.y[i])
        return run


def variant(form: str) -> tuple[int, int, int]:
    """(tiles a block, warps, k steps a round) of a `t<TM>w<W>[u<U>]` form (U 2 when left out)."""
    tm, rest = form[1:].split("w")
    warps, _, unroll = rest.partition("u")
    return int(tm), int(warps), int(unroll or 2)


def with_variants(source: str, forms: list[str]) -> str:
    """`source` with a kernel `bench_t<TM>w<W>_<type>` per `t<TM>w<W>` form, for float16 and 4-bit weights."""
    extra = []
    for form in forms:
        if form.startswith("t"):
            tm, warps, unroll = variant(form)
            for bits, name in ((0, "f16"), (4, "nb4_f16")):
                extra.append(f'extern "C" __global__ void __launch_bounds__({32 * warps}) bench_{form}_{name}'
                             f"(LinParams p) {{ mma_tile<h16, {bits}, {tm}, {warps}, {unroll}>(p); }}")
    return source + "\n".join(extra) + "\n"


def graphed(torch, run, inner: int):
    """`run` captured in a CUDA graph; returns a function timing `inner` replays (ms per replay)."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed() -> float:
        start.record()
        for _ in range(inner):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner

    timed()
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="also time the kernels of this git revision or road_cuda.h copy (base:<form>)")
    parser.add_argument("--forms", default="mma,mma16,mixed,t1w8u2,t1w16u2,t1w8u4,t2w8,t2w16")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--inner", type=int, default=20)
    args = parser.parse_args()
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    forms = args.forms.split(",")
    modules = {"": (Module(compile_cubin(with_variants(kernel_source(None), forms), arch)), forms)}
    if args.base:
        modules["base:"] = (Module(compile_cubin(kernel_source(args.base), arch)),
                            [f for f in forms if f in ("mma", "mixed")])
    print(f"{torch.cuda.get_device_name()}; R = {R} products a graph, medians over {args.rounds} rounds; "
          "us per product, and / the first column")
    for precision in ("fp16", "int4"):
        for proj, (k, n) in SHAPES.items():
            for rows in (1, 8):
                case = Case(torch, precision, k, n, rows)
                timers = {}
                if precision == "fp16":
                    timers["cublas"] = graphed(torch, case.cublas(), args.inner)
                for prefix, (module, module_forms) in modules.items():
                    for form in module_forms:
                        timers[prefix + form] = graphed(torch, case.launcher(module, form), args.inner)
                samples: dict[str, list[float]] = {name: [] for name in timers}
                for _ in range(args.rounds):
                    for name, timed in timers.items():
                        samples[name].append(timed())
                first = next(iter(samples))
                cells = []
                for name, values in samples.items():
                    us = statistics.median(values) * 1000 / R
                    ratio = statistics.median(v / f for v, f in zip(values, samples[first]))
                    cells.append(f"{name} {us:6.2f} us {ratio:5.3f}")
                print(f"{precision:>5} {proj:>8} {rows} rows | " + " | ".join(cells), flush=True)
                del case, timers


if __name__ == "__main__":
    main()
