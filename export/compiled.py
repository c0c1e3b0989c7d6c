"""The compiled package: the wrapped module that model.pt holds, exported with torch.export and
compiled ahead of time by AOTInductor into one .pt2 file that the server runs with torch alone
(serve/model/runtime/compiled.py). No compiler is needed where it is served; one is needed here.

Compiled at export rather than on each server: compiling takes 25-80 s and g++, and code for
the serving machine's own CPU gained at most ~10 % over this portable build, because nearly all
of a pass is oneDNN, which picks its kernels for the CPU it runs on.

The package must run on any x86-64 CPU with AVX2 (AMD EPYC servers without AVX-512 included),
whatever CPU exports it, so the compiling process is told so three ways:
  * cpp.simdlen=256: Inductor's own kernels use AVX2 vectors, not the widest the host has;
  * cpp.march=x86-64-v3: gcc gets that target instead of -march=native, which alone still
    emitted 91 AVX-512 instructions on an AVX-512 host;
  * ONEDNN_MAX_CPU_ISA=AVX2: the weights freezing prepacks for oneDNN come out in AVX2 layouts.
    That matters only for a package that keeps its weights (int8); the others record what was
    packed and how, and the server packs it again at load for its own kernels. oneDNN reads the
    variable once, when it starts, so the compile runs in a child process of its own:
    `python -m export.compiled SOURCE OUT` (this module's main).
Freezing (BatchNorm folded into the convolutions, oneDNN fusions) happens only when grad mode
is off while compiling, silently otherwise: hence torch.no_grad().

One package per shape the server runs (SHAPES): a static batch on a fixed thread count is the
only case where freezing packs the convolution weights for oneDNN ahead of time (pytorch#121400)
and the kernels' thread count matches the caller's. Measured against OpenVINO fp32 in the same
run (serve/model/runtime/shapes.py): 1.15x on 1 thread and 1.12x on 2 with the static batch-1
packages, 1.23x and 1.43x with the dynamic one. The dynamic-batch package, whose kernels follow
the caller's thread count (cpp.dynamic_threads), takes every other pass: larger batches, and
thread counts of bigger machines. A float package holds no weights: it is compiled from model.pt
and takes that file's tensors at load (export/constant_capture.py, serve/model/runtime/weights.py),
so a shape costs about 2 MB of code, not another copy of the weights.

The child compiles with the torch that serves (the serve virtualenv's, WHATCAR_COMPILE_PYTHON,
which `make export` sets): torch.export's program, saved by the training torch, loads there,
and PyTorch promises a package only to the torch that built it and newer ones. Without it,
the training torch compiles, and serve/model/runtime/choice.py accepts its packages one release back.

`check_library` then proves the result runs where it should: no AVX-512 (EVEX-encoded)
instruction in its code, and no call that would need torch's proxy executor, which the
server's loader does not provide.

`host=True` (make compile, export/host.py) builds for the compiling machine instead: gcc's
-march=native, Inductor's widest vectors, and oneDNN as this machine's server runs it (its own
choice of kernels, or the operator's ONEDNN_MAX_CPU_ISA), so the weights are packed for those
kernels. Such a package runs only on CPUs like this one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from serve.model.onednn import PACKED_FOR as ONEDNN_PACKED_FOR
from serve.model.onednn import VARIABLE as ONEDNN_VARIABLE
from serve.model.onednn import effective_isa
from serve.model.runtime.choice import AT_LOAD, PACKED_AT_LOAD
from serve.model.runtime.compiled import CompiledRunner, extract_library, package_library
from serve.model.runtime.weights import (
    WeightSource,
    read_weights,
    torchscript_constants,
    write_constants_list,
    write_weights,
)

ROOT = Path(__file__).resolve().parent.parent
FILE = "model.pt2"
# The capability the package targets, as torch.backends.cpu.get_cpu_capability() names it.
CPU_CAPABILITY = "AVX2"
# The dynamic package's largest batch: a pass holds up to --micro-batch images, or one /v2
# request's (at most --max-batch, 32 by default); larger batches are split by
# serve/model/runtime/compiled.py, so the bound only needs to cover the common case.
MAX_BATCH = 64
INDUCTOR_CONFIGS = {
    "freezing": True,
    "cpp.simdlen": 256,
    "cpp.march": "x86-64-v3",
}
COMPILE_ENV = {"ONEDNN_MAX_CPU_ISA": ONEDNN_PACKED_FOR}
# For the compiling machine's own CPU: Inductor's defaults (-march=native, the widest vectors).
HOST_INDUCTOR_CONFIGS = {"freezing": True}
COMPILE_PYTHON = "WHATCAR_COMPILE_PYTHON"


@dataclass(frozen=True)
class Shape:
    """What one package is compiled for: `batch` images (None: any from 1 to MAX_BATCH) on
    `threads` intra-op threads (None: the caller's)."""

    batch: int | None
    threads: int | None

    @property
    def file(self) -> str:
        return FILE if self.batch is None else f"model-b{self.batch}t{self.threads}.pt2"

    @property
    def name(self) -> str:
        return f"b1-{MAX_BATCH}" if self.batch is None else f"b{self.batch}t{self.threads}"


# The passes the server runs with its defaults on two cores: each shared worker one image on
# one thread, a request alone on both; the dynamic package takes every other pass.
SHAPES = (Shape(1, 1), Shape(1, 2), Shape(None, None))
COMPILE_TIMEOUT = 1800
# The C shim function a package calls for operators outside it; the server passes no executor.
PROXY_CALL = b"aoti_torch_proxy_executor_call_function"


class CompileError(Exception):
    """No compiled package can be made or kept; the message says why in one line."""


class NoCompilerError(CompileError):
    """No C++ compiler on this machine: no shape can be compiled, so trying the next is pointless."""


@dataclass
class Compiled:
    """A compiled package in a scratch folder, with the facts the manifest records."""

    path: Path
    torch: str
    cpu_capability: str
    arch: str
    min_batch: int
    max_batch: int
    compile_seconds: float
    isa_check: str
    threads: int | None = None
    onednn_isa: str | None = None
    # The dense tensors the package takes its constants from at load (a weights file, by sha256);
    # None for a package that holds its weights.
    weights: Path | None = None

    @property
    def static(self) -> bool:
        return self.min_batch == self.max_batch and self.threads is not None

    @property
    def weights_at_load(self) -> str | None:
        """The manifest's `weights` for this package."""
        return AT_LOAD if self.weights is not None else None


def export_program(module: torch.nn.Module, height: int, width: int, max_batch: int = MAX_BATCH,
                   batch: int | None = None):
    """torch.export of `module` (uint8 [N, 3, H, W] in, already in eval mode): N is `batch`, or
    free from 1 to `max_batch` when None."""
    from torch.export import Dim

    # An example batch of 1 would specialise the batch dimension to 1.
    example = torch.zeros((batch or 2, 3, height, width), dtype=torch.uint8)
    dynamic = None if batch else ({0: Dim("batch", min=1, max=max_batch)},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, (example,), dynamic_shapes=dynamic)


def torchscript_program(module: torch.jit.ScriptModule, height: int, width: int, batch: int | None):
    """A torch.export program of the traced `module`, for `batch` images (None: any from 1 to
    compiled.MAX_BATCH).

    The trace computes the "same" padding of each strided convolution from the input's size, and
    the converter turns those sizes into values read back from tensors, which AOTInductor cannot
    reason about. With the height and width fixed they are constants: one run records each, and
    the program is exported again with them in place. A value that changes with the batch size
    (none does in whatcar's modules) is refused rather than fixed."""
    from torch._export.converter import TS2EPConverter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A sample batch of 1 would fix the batch size at 1 (torch.export treats 0 and 1 as constants).
        graph = TS2EPConverter(module, (torch.zeros((2, 3, height, width), dtype=torch.uint8),)).convert().module()
    read_back = torch.ops.aten._local_scalar_dense.default
    runs = []
    for size in (2, 3):
        values = {}

        class Record(torch.fx.Interpreter):
            def run_node(self, node):
                out = super().run_node(node)
                if node.op == "call_function" and node.target is read_back:
                    values[node] = int(out)  # noqa: B023 - the class runs within this iteration
                return out

        with torch.no_grad():
            Record(graph).run(torch.zeros((size, 3, height, width), dtype=torch.uint8))
        runs.append(values)
    if runs[0] != runs[1]:
        raise ValueError("the traced module reads a size that depends on the batch")
    for node, value in runs[0].items():
        node.replace_all_uses_with(value)
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_scalar.default:
            graph.graph.erase_node(node)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return export_program(graph, height, width, batch=batch)


def compile_package(program, out_dir: Path, shape: Shape = Shape(None, None), quantized: bool = False,
                    max_batch: int = MAX_BATCH, host: bool = False,
                    torchscript: tuple[Path, int, int] | None = None) -> Compiled:
    """Compile an exported program into `out_dir`/`shape.file` in a child process set up for AVX2
    (for this machine's own CPU with `host`), then check the library; raises CompileError.
    `quantized`: the program holds torchao's quantisation operators (PT2E int8), which only the
    training virtualenv has, so its torch compiles it and the child must register them before
    loading it.

    With `torchscript` (model.pt's path, the input height and width) and no program, the child
    converts model.pt itself and writes a package without weights: its constants are listed in
    it and taken at load from model.pt, the rest of them from the dense tensors the child saves
    beside it (Compiled.weights; serve/model/runtime/weights.py)."""
    if not cxx_compiler():
        raise NoCompilerError("no C++ compiler (g++, or $CXX) on PATH: AOTInductor needs one to build the package; "
                           "serving it needs none")
    if (program is None) == (torchscript is None):
        raise ValueError("compile a program or a TorchScript file, one of the two")
    out_dir.mkdir(parents=True, exist_ok=True)
    program_path, package = out_dir / f"program-{shape.name}.pt2", out_dir / shape.file
    weights = out_dir / f"{shape.file}.weights" if torchscript else None
    if program is not None:
        with warnings.catch_warnings():
            # "No complete tensor found in the group": channels-last weights are saved as they are.
            warnings.simplefilter("ignore", UserWarning)
            torch.export.save(program, str(program_path))
    python = sys.executable if quantized or host else os.environ.get(COMPILE_PYTHON) or sys.executable
    env = dict(os.environ) if host else {**os.environ, **COMPILE_ENV}
    started = time.perf_counter()
    try:
        source = str(torchscript[0].resolve()) if torchscript else str(program_path)
        command = [python, "-m", "export.compiled", source, str(package)]
        command += ["--threads", str(shape.threads)] if shape.threads else []
        command += ["--quantized"] if quantized else []
        if torchscript:
            command += ["--torchscript", str(torchscript[1]), str(torchscript[2]), "--weights", str(weights)]
            command += ["--batch", str(shape.batch)] if shape.batch else []
        done = subprocess.run(command + (["--host"] if host else []), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CompileError(f"compiling {shape.name} took more than {COMPILE_TIMEOUT} s") from None
    finally:
        program_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or not package.is_file():
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or [f"exit {done.returncode}"]
        raise CompileError(f"AOTInductor failed on {shape.name}: {tail[0]}")
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    low, high = (shape.batch, shape.batch) if shape.batch else (1, max_batch)
    if host:
        # The weights are packed for the kernels oneDNN ran in the child, as it runs in this host's server.
        capability, packed = facts["cpu_capability"], facts["onednn_isa"]
        isa_check = check_library(package, allow_avx512=True) + f"; built for this host's {capability} CPU"
    else:
        capability, packed, isa_check = CPU_CAPABILITY, ONEDNN_PACKED_FOR, check_library(package)
    if torchscript:
        packed = PACKED_AT_LOAD  # by the serving process's oneDNN, for its own kernels
    return Compiled(path=package, torch=facts["torch"], cpu_capability=capability, arch=platform.machine(),
                    min_batch=low, max_batch=high, compile_seconds=round(seconds, 1),
                    isa_check=isa_check, threads=shape.threads, onednn_isa=packed if shape.batch else None,
                    weights=weights)


def cxx_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def check_library(package: Path, allow_avx512: bool = False) -> str:
    """Raise CompileError if the package's code needs a proxy executor or (unless `allow_avx512`)
    holds an AVX-512 instruction; returns what was checked, for the export's output and the
    manifest."""
    with tempfile.TemporaryDirectory(prefix="whatcar-check-") as scratch:
        library = extract_library(package, Path(scratch))
        if PROXY_CALL in library.read_bytes():
            raise CompileError("the package calls operators outside torch's C shim (through a proxy executor), "
                               "which the server's loader does not provide")
        if allow_avx512:
            return "runs no operator outside torch's C shim"
        evex = evex_instructions(library)
    if evex is None:
        return "AVX-512 instructions not counted: objdump (binutils) is not installed"
    if evex:
        raise CompileError(f"the package holds {evex} AVX-512 (EVEX-encoded) instructions: it would crash AVX2-only "
                           "CPUs with SIGILL")
    return "no AVX-512 (EVEX-encoded) instruction in its code (objdump)"


def evex_instructions(library: Path) -> int | None:
    """How many EVEX-encoded (AVX-512) instructions `objdump -d` finds, or None without objdump.

    In 64-bit code an instruction whose first byte is 0x62 (after an optional 0x67 address-size
    prefix) is EVEX: that byte was BOUND, which 64-bit mode dropped. Only the first line of an
    instruction carries its mnemonic, so continuation lines of long encodings are not counted.
    """
    objdump = shutil.which("objdump")
    if objdump is None:
        return None
    count = 0
    with subprocess.Popen([objdump, "-d", str(library)], stdout=subprocess.PIPE, text=True,
                          errors="replace") as proc:
        for line in proc.stdout:
            fields = line.split("\t")
            if len(fields) >= 3 and fields[2].strip() and fields[1].startswith(("62 ", "67 62 ")):
                count += 1
    if proc.returncode != 0:
        raise CompileError(f"objdump -d failed on the package's library (exit {proc.returncode})")
    return count


def load_runner(compiled: Compiled, height: int, width: int, model_path: Path | None = None) -> CompiledRunner:
    """The package loaded exactly as the server loads it (serve/model/runtime/compiled.py); one that
    takes its weights at load takes them from `model_path` (model.pt) and compiled.weights."""
    def weights():
        extra = compiled.weights if compiled.weights is not None and compiled.weights.is_file() else None
        return WeightSource.open(model_path, extra)

    model = package_library(compiled.path, 1, weights if model_path is not None else None, compiled.threads)
    return CompiledRunner(model, height, width, compiled.min_batch, compiled.max_batch)


def version_weights(model_path: Path, packages: list[Compiled], out: Path) -> int:
    """Write to `out` the dense tensors the packages take at load that model.pt does not hold
    (each once, whichever packages share it); returns how many, 0 when none is needed (nothing
    is written then)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        held = set(torchscript_constants(torch.jit.load(str(model_path), map_location="cpu")))
    extra = {}
    for package in packages:
        if package.weights is not None:
            extra.update({key: t for key, t in read_weights(package.weights).items() if key not in held})
    if extra:
        write_weights(out, extra)
    return len(extra)


def one_at_a_time(runner: CompiledRunner):
    """`runner` as the parity check calls a module, one image at a time: a static batch is filled
    with copies of the image and the first row kept."""
    def run(images: torch.Tensor) -> torch.Tensor:
        if runner.min_batch == images.shape[0]:
            return runner(images)
        return runner(images.expand(runner.min_batch, *images.shape[1:]).contiguous())[:images.shape[0]]
    return run


def main(argv: list[str] | None = None) -> int:
    """The child process: compile SOURCE (torch.export.save's file, or model.pt with --torchscript)
    into OUT (.pt2)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m export.compiled")
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quantized", action="store_true")
    p.add_argument("--host", action="store_true")
    p.add_argument("--torchscript", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                   help="SOURCE is model.pt: convert it, and write the package without its weights")
    p.add_argument("--batch", type=int, default=None, help="with --torchscript: a static batch (default: any)")
    p.add_argument("--weights", type=Path, default=None, help="with --torchscript: where the dense tensors go")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.host and os.environ.get(ONEDNN_VARIABLE) != COMPILE_ENV[ONEDNN_VARIABLE]:
        print("export.compiled: run through compile_package(), which sets ONEDNN_MAX_CPU_ISA", file=sys.stderr)
        return 2
    if args.quantized:
        # Its operators must be registered before the program that names them loads (an import of
        # 8 s under load, so only when needed).
        import torchao.quantization.pt2e  # noqa: F401 - registers the operators the program names
    if args.torchscript:
        from . import constant_capture

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(args.source), map_location="cpu").eval()
        program = torchscript_program(module, *args.torchscript, args.batch)
        constant_capture.install()
    else:
        program = torch.export.load(str(args.source))
    configs = dict(HOST_INDUCTOR_CONFIGS if args.host else INDUCTOR_CONFIGS)
    if args.torchscript:
        configs["aot_inductor.package_constants_in_so"] = False
    if args.threads is None:
        configs["cpp.dynamic_threads"] = True  # the kernels follow the calling thread's count
    else:
        # Kernels built for `threads`, and weights packed by a oneDNN running that many.
        configs["cpp.threads"] = args.threads
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._inductor.aoti_compile_and_package(program, package_path=str(args.out), inductor_configs=configs)
    if args.torchscript:
        listed, tensors = constant_capture.constants_list()
        write_constants_list(args.out, listed)
        write_weights(args.weights, tensors)
    capability = torch.backends.cpu.get_cpu_capability()
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
                      "cpu_capability": capability, "onednn_isa": effective_isa(capability)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
