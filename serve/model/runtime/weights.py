"""One copy of the weights per version: compiled packages that carry code only take their
constants here, at load.

A package `make export` builds holds no tensor. Inside its zip, `CONSTANTS` lists every constant
its code reads, by the name the code knows it by: the sha256 of the tensor's bytes (C order),
its dtype, shape and strides and, for the convolution and linear weights that AOTInductor's
freezing packs for oneDNN, the packing operator and its arguments. The tensors themselves are
the version's model.pt's: the frozen TorchScript module's constants are the very tensors the
package was compiled from (108 of the default model's 111, 19.0 of 20.7 MB). The few that
Inductor folds differently from TorchScript (the head's BatchNorm folded into its linear layer,
1.7 MB) are kept in the version's `weights.safetensors`.

Packing happens in this process, by the oneDNN that runs the passes, so the weights are in the
layout this CPU's own kernels read: no instruction-set cap is needed for them (serve/model/onednn.py).

Nothing here unpickles: model.pt is read by TorchScript's loader, the weights file is a JSON
header and raw little-endian bytes (the safetensors layout), and a packing operator is only
ever one of PACKING's.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ArtifactError, first_line
from .torchscript import read_torchscript

# Where a package keeps its list of constants: a member of its zip, beside AOTInductor's own files.
CONSTANTS = "whatcar/constants.json"
WEIGHTS_FILE = "weights.safetensors"
RECIPE_FORMAT = 1

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _pack_convolution(weight, padding, stride, dilation, groups, input_size):
    return torch.ops.mkldnn._reorder_convolution_weight(weight, padding, stride, dilation, groups, input_size)


def _pack_linear(weight, *args):
    return torch.ops.mkldnn._reorder_linear_weight(weight, *args)


def _pack_mkl_linear(weight, *args):
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, *args)


# The operators freezing packs weights with (torch/_inductor/fx_passes/mkldnn_fusion.py), and
# the only code a constants list can name.
PACKING = {
    "mkldnn._reorder_convolution_weight": _pack_convolution,
    "mkldnn._reorder_linear_weight": _pack_linear,
    "mkl._mkl_reorder_linear_weight": _pack_mkl_linear,
}


class WeightsMismatch(ArtifactError):
    """The weights a package needs are not the ones the version holds: a mismatched or damaged
    version, which is refused whole rather than served with some packages."""


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A dense tensor's values in C order, whatever its strides (no numpy on the serve side)."""
    flat = tensor.detach().reshape(-1).contiguous()
    return ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size())


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


@dataclass(frozen=True)
class Constant:
    """One constant a package's code reads, as its constants list describes it."""

    name: str
    sha256: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    pack: str | None = None
    args: tuple = ()

    def as_dict(self) -> dict:
        entry = {"name": self.name, "sha256": self.sha256, "dtype": DTYPE_NAMES[self.dtype],
                 "shape": list(self.shape), "stride": list(self.stride)}
        if self.pack:
            entry.update(pack=self.pack, args=[list(a) if isinstance(a, tuple | list) else a for a in self.args])
        return entry

    @classmethod
    def parse(cls, entry: dict, source: str) -> Constant:
        try:
            constant = cls(name=entry["name"], sha256=entry["sha256"], dtype=DTYPES[entry["dtype"]],
                           shape=tuple(entry["shape"]), stride=tuple(entry["stride"]), pack=entry.get("pack"),
                           args=tuple(entry.get("args", ())))
        except (KeyError, TypeError):
            raise WeightsMismatch(f"{source}: a constant needs name, sha256, dtype, shape and stride") from None
        if constant.pack is not None and constant.pack not in PACKING:
            raise WeightsMismatch(f"{source}: constant {constant.name} names packing {constant.pack!r}, "
                                  f"not one of {', '.join(sorted(PACKING))}")
        if len(constant.shape) != len(constant.stride):
            raise WeightsMismatch(f"{source}: constant {constant.name} has {len(constant.shape)} sizes and "
                                  f"{len(constant.stride)} strides")
        return constant


def write_constants_list(package: Path, constants: list[Constant]) -> None:
    """Add the constants list to a package's zip (export side)."""
    with zipfile.ZipFile(package, "a") as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        archive.writestr(f"{root}/{CONSTANTS}",
                         json.dumps({"format": RECIPE_FORMAT, "constants": [c.as_dict() for c in constants]}))


def read_constants_list(package: Path) -> list[Constant] | None:
    """The package's constants list, or None for a package that carries its own weights (one
    exported before weights were stored once, or an int8 one)."""
    try:
        with zipfile.ZipFile(package) as archive:
            names = [n for n in archive.namelist() if n.endswith("/" + CONSTANTS)]
            raw = archive.read(names[0]) if names else None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        # A broken package, like one whose library does not load: its passes go to the next runtime.
        raise ArtifactError(f"{package} is not a readable package: {first_line(exc)}") from None
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise WeightsMismatch(f"{package}: its constants list cannot be read: {first_line(exc)}") from None
    if not isinstance(data, dict) or data.get("format") != RECIPE_FORMAT or not isinstance(data.get("constants"), list):
        raise WeightsMismatch(f"{package}: its constants list is not format {RECIPE_FORMAT}")
    return [Constant.parse(entry, str(package)) for entry in data["constants"]]


def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Tensors by their sha256 in the safetensors layout: an 8-byte little-endian header length,
    a JSON header, then each tensor's bytes in C order."""
    header, offset, blobs = {}, 0, []
    for key in sorted(tensors):
        data = tensor_bytes(tensors[key])
        header[key] = {"dtype": DTYPE_NAMES[tensors[key].dtype], "shape": list(tensors[key].shape),
                       "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the tensors' bytes start 8-aligned, as safetensors readers expect
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(head)) + head)
        for data in blobs:
            out.write(data)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, each checked against the sha256 it is filed under."""
    try:
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + length])
        body = memoryview(raw)[8 + length:]
        tensors = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            dtype = DTYPES[entry["dtype"]]
            tensor = torch.frombuffer(bytearray(body[start:end]), dtype=dtype).reshape(entry["shape"])
            tensors[key] = tensor
    except (OSError, struct.error, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise WeightsMismatch(f"{path} is not a readable weights file: {first_line(exc)}") from None
    for key, tensor in tensors.items():
        if tensor_sha256(tensor) != key:
            raise WeightsMismatch(f"{path}: the tensor filed under {key[:12]}... does not have that sha256")
    return tensors


def torchscript_constants(module: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """A frozen TorchScript module's tensor constants, by the sha256 of their values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapping = module.code_with_constants[1].const_mapping
    return {tensor_sha256(t): t for t in mapping.values() if isinstance(t, torch.Tensor) and t.layout == torch.strided}


@contextlib.contextmanager
def intra_op_threads(threads: int | None):
    """torch's intra-op thread count set to `threads` (unchanged for None) for this thread's calls."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(before)


class WeightSource:
    """The tensors of one version that packages take their constants from: model.pt's constants
    and the weights file's, by sha256. `files` says where each came from, for error lines."""

    def __init__(self, tensors: dict[str, torch.Tensor], files: str):
        self.tensors, self.files = tensors, files

    @classmethod
    def open(cls, model_path: Path, weights_path: Path | None) -> WeightSource:
        module = read_torchscript(model_path)
        tensors = torchscript_constants(module)
        names = model_path.name
        if weights_path is not None:
            tensors.update(read_weights(weights_path))
            names += f" and {weights_path.name}"
        return cls(tensors, names)

    @classmethod
    def of_version(cls, folder: Path) -> WeightSource:
        """The tensors of the version in `folder`, the files its manifest names (unchecked: the
        artifact loader checks them; this serves tools that open one package)."""
        from ..manifest import Manifest

        manifest = Manifest.read(folder)
        extra = folder / manifest.weights_file if manifest.weights_file else None
        return cls.open(folder / manifest.entry("model")[0], extra)

    def constants_for(self, package: Path, wanted: list[Constant], names: list[str],
                      threads: int | None = None) -> list[tuple[str, torch.Tensor]]:
        """The tensors for a package whose code reads constants `names`, built as its list says:
        taken as they are (no copy) when their strides match, laid out again when not, packed for
        this process's oneDNN when the list says so. Raises WeightsMismatch naming the file.

        `threads`: the intra-op thread count the package was compiled for. oneDNN's choice of
        kernel, and so the weight layout it packs for, depends on the threads it runs with:
        packed under 2 threads, the batch-1 package built for 1 thread ran its pass in 101 ms
        instead of 20 on the AMD EPYC host, oneDNN reordering the weights on every pass."""
        listed = {c.name: c for c in wanted}
        if set(listed) != set(names):
            missing, unknown = sorted(set(names) - set(listed)), sorted(set(listed) - set(names))
            raise WeightsMismatch(f"{package}: its constants list does not match its code (missing "
                                  f"{', '.join(missing[:3]) or 'none'}; unknown {', '.join(unknown[:3]) or 'none'})")
        out = []
        for name in names:
            constant = listed[name]
            tensor = self.tensors.get(constant.sha256)
            if tensor is None:
                raise WeightsMismatch(f"{package}: constant {name} (sha256 {constant.sha256[:12]}...) is in neither "
                                      f"{self.files}")
            if tensor.dtype != constant.dtype or tuple(tensor.shape) != constant.shape:
                raise WeightsMismatch(f"{package}: constant {name} is {constant.dtype} {list(constant.shape)} but "
                                      f"{self.files} hold {tensor.dtype} {list(tensor.shape)}")
            if tensor.stride() != constant.stride:
                tensor = torch.empty_strided(constant.shape, constant.stride, dtype=constant.dtype).copy_(tensor)
            if constant.pack is not None:
                try:
                    with torch.no_grad(), intra_op_threads(threads):
                        tensor = PACKING[constant.pack](tensor, *constant.args)
                except (RuntimeError, TypeError) as exc:
                    raise WeightsMismatch(f"{package}: constant {name} cannot be packed: {first_line(exc)}") from None
            out.append((name, tensor))
        return out
