"""Running a compiled package (AOTInductor .pt2) with torch alone: no compiler, no torch._inductor.

The package is a zip holding one shared library with the model's code, and either its weights
too (versions exported before weights were stored once, and int8 packages) or a list of the
constants it takes at load from the version's one copy of the weights (weights.py). It is run
through that library's own C entry points (AOTInductorModelContainerCreateWithDevice, ...Run,
...Delete: torch/csrc/inductor/aoti_runtime/interface.h) called with ctypes, which releases
the GIL for the whole pass. torch's own loaders do not suit a server: the pybind
AOTIModelPackageLoader.run holds the GIL for the whole pass (measured: two inference threads
then never overlap, and no HTTP thread runs meanwhile), and torch._inductor.aoti_load_package
imports torch._dynamo and compiles CPU probe programs with g++ on first use (2-3 s per load,
15 s on a fresh machine).

The compiled code checks nothing about its input: given a float tensor it reads its bytes as
pixels, given more images than it was exported for it runs anyway. `CompiledRunner` checks
every batch first. Nor does anything check the package's instruction set against the CPU: that
is serve/model/runtime/choice.py's decision, made before loading.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

import torch

from ..errors import ArtifactError
from ..manifest import CompiledPackage, Manifest, sha256_file
from .outputs import output_rows, probe
from .weights import WeightSource, read_constants_list

MODEL_FOLDER = "/data/aotinductor/model/"


class PackageError(Exception):
    """The package cannot be loaded or run; the message says why in one line."""


# torch hands AtenTensorHandles over as nameless PyCapsules; ctypes passes raw pointers.
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.argtypes, _capsule_pointer.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_void_p
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.argtypes, _capsule_new.restype = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p], ctypes.py_object

_handle = ctypes.c_void_p
_ENTRY_POINTS = {
    # (container handle out, models, device, cubin/weights folder)
    "AOTInductorModelContainerCreateWithDevice": [ctypes.POINTER(_handle), ctypes.c_size_t, ctypes.c_char_p,
                                                  ctypes.c_char_p],
    # (container, inputs, count, outputs, count, stream, proxy executor)
    "AOTInductorModelContainerRun": [_handle, ctypes.POINTER(_handle), ctypes.c_size_t, ctypes.POINTER(_handle),
                                     ctypes.c_size_t, _handle, _handle],
    "AOTInductorModelContainerGetNumOutputs": [_handle, ctypes.POINTER(ctypes.c_size_t)],
    "AOTInductorModelContainerDelete": [_handle],
}


class _ConstantEntry(ctypes.Structure):
    """AOTInductorConstantMapEntry (interface.h): a constant's name and its tensor handle."""

    _fields_ = [("name", ctypes.c_char_p), ("handle", _handle)]


# Needed only by a package that takes its constants at load.
_CONSTANT_ENTRY_POINTS = {
    "AOTInductorModelContainerGetNumConstants": [_handle, ctypes.POINTER(ctypes.c_size_t)],
    "AOTInductorModelContainerGetConstantName": [_handle, ctypes.c_size_t, ctypes.POINTER(ctypes.c_char_p)],
    "AOTInductorModelContainerGetConstantFromFolded": [_handle, ctypes.c_size_t, ctypes.POINTER(ctypes.c_bool)],
    # (container, entries, count, use_inactive, validate_full_update)
    "AOTInductorModelContainerUpdateUserManagedConstantBufferPairs": [_handle, ctypes.POINTER(_ConstantEntry),
                                                                      ctypes.c_size_t, ctypes.c_bool, ctypes.c_bool],
}
_torch_shim = None


def _delete_tensor_handle(handle: int) -> None:
    """Free a tensor handle made by torch._C._aoti (the tensor itself lives on while Python holds it)."""
    global _torch_shim
    if _torch_shim is None:
        library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
        shim = ctypes.CDLL(str(library), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        shim.aoti_torch_delete_tensor_object.argtypes, shim.aoti_torch_delete_tensor_object.restype = \
            [_handle], ctypes.c_int32
        _torch_shim = shim
    _torch_shim.aoti_torch_delete_tensor_object(handle)


def extract_library(package: Path, folder: Path) -> Path:
    """The package's compiled model library, copied out of the zip into `folder` (zipfile checks
    its CRC while copying: a flipped bit is an error here, where torch's own loader would not see it)."""
    try:
        with zipfile.ZipFile(package) as archive:
            names = [n for n in archive.namelist() if MODEL_FOLDER in "/" + n and n.endswith(".so")]
            if len(names) != 1:
                raise PackageError(f"{package} holds {len(names)} compiled model libraries, not one "
                                   "(a package of sources alone would need a C++ compiler to build)")
            target = folder / "model.so"
            with archive.open(names[0]) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            return target
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PackageError(f"{package} is not a readable package: {exc}") from None


# Loaded libraries by the sha256 of their package. glibc never unloads these: their C++ inline
# statics are STB_GNU_UNIQUE symbols (54 in the default model's), which make a library NODELETE,
# so dlclose does nothing. Loading the same package again would map another copy, and as a pass
# reads the weights inside it, about 19 MB more resident memory stayed with every reload
# (measured: 210 MB, then 250, 311, 330, 349 ... over eight loads). Reusing the library keeps a
# process at one copy per distinct package it has served; each container (the model instances
# and their working memory) is still created and deleted per load.
_LIBRARIES: dict[str, ctypes.CDLL] = {}
_LIBRARIES_LOCK = threading.Lock()


def open_library(package: Path, sha256: str | None = None) -> ctypes.CDLL:
    """The package's compiled model library, loaded once per process and package contents.
    `sha256` is the package's when the caller has already checked it (the artifact loader does,
    against the manifest); without it the file is hashed here."""
    try:
        key = sha256 or sha256_file(package)
    except OSError as exc:
        raise PackageError(f"{package} is not a readable package: {exc}") from None
    with _LIBRARIES_LOCK:
        if key not in _LIBRARIES:
            _LIBRARIES[key] = load_library(package)
        return _LIBRARIES[key]


def load_library(package: Path) -> ctypes.CDLL:
    scratch = Path(tempfile.mkdtemp(prefix="whatcar-compiled-"))
    try:
        library = extract_library(package, scratch)
        try:
            # Every symbol resolved now: a torch without one of the C shim functions the package
            # calls fails here, not in the middle of a pass. RTLD_LOCAL keeps its symbols private;
            # libtorch and libgomp, which it needs, are the ones `import torch` already loaded.
            lib = ctypes.CDLL(str(library), mode=os.RTLD_NOW | os.RTLD_LOCAL)
        except OSError as exc:
            raise PackageError(f"{package}: its compiled model does not load here: {exc}") from None
    finally:
        # The mapping outlives the file, so nothing is left on disk.
        shutil.rmtree(scratch, ignore_errors=True)
    for name, argtypes in {**_ENTRY_POINTS, **_CONSTANT_ENTRY_POINTS}.items():
        function = getattr(lib, name, None)
        if function is None:
            if name in _CONSTANT_ENTRY_POINTS:
                continue  # asked for only when the package takes its constants at load
            raise PackageError(f"{package}: its compiled model has no {name}")
        function.argtypes, function.restype = argtypes, ctypes.c_int32  # 0 = success
    return lib


class CompiledLibrary:
    """One loaded package: `runners` model instances sharing one copy of the weights.

    A pass takes a free instance (and waits for one if none is free), so make `runners` the
    number of threads that run passes at once. Calls return the module's outputs as a list.

    `constants` is None for a package that holds its weights, and otherwise a callable that
    is given the names of the constants the package's code reads and returns (name, tensor)
    pairs for them (weights.WeightSource.constants_for). The container reads those tensors in
    place, so they are kept here for as long as it lives.
    """

    def __init__(self, package: str | Path, runners: int = 1, sha256: str | None = None, constants=None):
        package = Path(package)
        self._lib, self._container = None, _handle()
        self._constants: list[torch.Tensor] = []
        self._handles: list[int] = []
        self._lib = open_library(package, sha256)
        # No folder to pass: the weights are inside the library or handed over below. Failures
        # are printed by the library to stderr; the return code is all that comes back.
        if self._lib.AOTInductorModelContainerCreateWithDevice(ctypes.byref(self._container), max(1, runners), b"cpu",
                                                               None):
            raise PackageError(f"{package}: the compiled model failed to start (its reason is on stderr)")
        count = ctypes.c_size_t()
        self._lib.AOTInductorModelContainerGetNumOutputs(self._container, ctypes.byref(count))
        self.outputs = count.value
        try:
            if constants is not None:
                self._hand_over(package, constants)
            elif read_constants_list(package) is not None:
                # Its code would read constants that were never set: a crash, not an exception.
                raise PackageError(f"{package} takes its weights at load and none were given")
        except BaseException:
            self.close()
            raise

    def constant_names(self) -> list[str]:
        """The constants the package's code reads and that must be handed over (those folded
        from others at load are not)."""
        count = ctypes.c_size_t()
        if self._lib.AOTInductorModelContainerGetNumConstants(self._container, ctypes.byref(count)):
            raise PackageError("the compiled model does not list its constants")
        names = []
        for index in range(count.value):
            name, folded = ctypes.c_char_p(), ctypes.c_bool()
            self._lib.AOTInductorModelContainerGetConstantFromFolded(self._container, index, ctypes.byref(folded))
            if not folded.value:
                self._lib.AOTInductorModelContainerGetConstantName(self._container, index, ctypes.byref(name))
                names.append(name.value.decode())
        return names

    def _hand_over(self, package: Path, constants) -> None:
        if not all(hasattr(self._lib, name) for name in _CONSTANT_ENTRY_POINTS):
            raise PackageError(f"{package}: its compiled model cannot take its constants at load")
        pairs = constants(self.constant_names())
        self._constants = [tensor for _, tensor in pairs]
        self._handles = [_capsule_pointer(h, None) for h in
                         torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(self._constants)]
        entries = (_ConstantEntry * len(pairs))(*[_ConstantEntry(name.encode(), handle)
                                                  for (name, _), handle in zip(pairs, self._handles)])
        # User-managed: the container reads these tensors where they are instead of copying them;
        # validate_full_update: a constant left out is an error here, not garbage in a pass.
        if self._lib.AOTInductorModelContainerUpdateUserManagedConstantBufferPairs(self._container, entries,
                                                                                 len(pairs), False, True):
            raise PackageError(f"{package}: the compiled model refused its constants (its reason is on stderr)")

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        # The container takes over the input handles (new references to the same tensor) and hands
        # back output handles that become ours.
        handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors([images])
        inputs = (_handle * 1)(*[_capsule_pointer(h, None) for h in handles])
        outputs = (_handle * self.outputs)()
        if self._lib.AOTInductorModelContainerRun(self._container, inputs, 1, outputs, self.outputs, None, None):
            raise PackageError("the compiled model failed on this batch (its reason is on stderr)")
        return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs([_capsule_new(p, None, None) for p in outputs])

    def close(self) -> None:
        if self._lib is not None and self._container:
            self._lib.AOTInductorModelContainerDelete(self._container)
            self._container = _handle()
        for handle in self._handles:
            _delete_tensor_handle(handle)
        self._handles, self._constants = [], []

    def __del__(self):
        self.close()


class CompiledRunner:
    """What the inference threads call: uint8 [N, 3, H, W] in, one float tensor [N, width] out.

    Checks each batch against what the package was exported for, since its code does not. A
    batch larger than the package's largest is run in slices of that size: rows do not depend
    on each other, and one runtime per process keeps TorchScript from loading at all.
    """

    def __init__(self, model: CompiledLibrary, height: int, width: int, min_batch: int, max_batch: int):
        self.model = model
        self.height, self.width = height, width
        self.min_batch, self.max_batch = min_batch, max_batch

    def check(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.device.type != "cpu":
            raise ValueError(f"the compiled model takes a uint8 CPU tensor, got "
                             f"{getattr(images, 'dtype', type(images).__name__)}")
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, self.height, self.width):
            raise ValueError(f"the compiled model takes [N, 3, {self.height}, {self.width}], "
                             f"got {list(images.shape)}")
        if images.shape[0] < self.min_batch:
            raise ValueError(f"the compiled model takes at least {self.min_batch} images, got {images.shape[0]}")
        # Its kernels assume the dense strides of the example it was exported with.
        return images.contiguous()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = self.check(images)
        if images.shape[0] <= self.max_batch:
            return output_rows(self.model(images))
        return torch.cat([output_rows(self.model(part)) for part in images.split(self.max_batch)])

    def close(self) -> None:
        self.model.close()


def package_library(path: Path, runners: int, weights, threads: int | None,
                    sha256: str | None = None) -> CompiledLibrary:
    """A package ready to run: one that takes its constants at load gets them from `weights()`,
    a callable giving the version's WeightSource (called only then), packed for `threads`, the
    thread count the package was built for. The server, the exporter's checks and the profiler
    all load packages through here, so what they run is the same."""
    wanted = read_constants_list(path)
    if wanted is None:
        return CompiledLibrary(path, runners, sha256=sha256)
    if weights is None:
        raise PackageError(f"{path} takes its weights at load and none were given")
    return CompiledLibrary(path, runners, sha256=sha256,
                           constants=lambda names: weights().constants_for(path, wanted, names, threads))


def open_package(path: Path, runners: int = 1) -> CompiledLibrary:
    """One package of a version folder, with its weights from that folder when it takes them at
    load: for tools that run a single package (bench/profile.py)."""
    threads = next((p.threads for p in Manifest.read(path.parent).compiled if p.file == path.name), None)
    return package_library(path, runners, lambda: WeightSource.of_version(path.parent), threads)


def load_compiled(path: Path, package: CompiledPackage, manifest: Manifest, classes: int,
                  runners: int, weights=None) -> CompiledRunner:
    """`weights`: a callable giving the version's WeightSource, opened on first need, for a
    package that takes its constants at load."""
    height, width = manifest.input_size
    try:
        # load_artifact has checked the file against this sha256.
        model = package_library(path, runners, weights, package.threads, sha256=package.sha256)
    except PackageError as exc:
        raise ArtifactError(str(exc)) from None
    runner = CompiledRunner(model, height, width, package.min_batch, package.max_batch)
    try:
        probe(runner, path, manifest, classes)
    except ArtifactError:
        runner.close()
        raise
    return runner
