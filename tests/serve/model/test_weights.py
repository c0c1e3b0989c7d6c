"""Weights stored once: the weights file, a package's constants list, and how a package's
constants are built from the version's tensors. No compiler needed: tests/cross loads real
packages that take their weights this way."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from serve.model.runtime.weights import (
    CONSTANTS,
    Constant,
    WeightsMismatch,
    WeightSource,
    read_constants_list,
    read_weights,
    tensor_sha256,
    torchscript_constants,
    write_constants_list,
    write_weights,
)


def test_the_weights_file_reads_back_what_was_written_and_files_each_tensor_by_its_sha256(tmp_path):
    tensors = [torch.randn(4, 3), torch.arange(6, dtype=torch.int64), torch.randn(2, 2).t()]  # one not C-ordered
    path = tmp_path / "weights.safetensors"
    write_weights(path, {tensor_sha256(t): t for t in tensors})
    read = read_weights(path)
    assert sorted(read) == sorted(tensor_sha256(t) for t in tensors)
    for tensor in tensors:
        assert torch.equal(read[tensor_sha256(tensor)], tensor)
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_length])
    assert header_length % 8 == 0 and all("data_offsets" in entry for entry in header.values())


def test_a_weights_file_whose_bytes_changed_is_refused_naming_it(tmp_path):
    tensor = torch.randn(16)
    path = tmp_path / "weights.safetensors"
    write_weights(path, {tensor_sha256(tensor): tensor})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsMismatch, match="weights.safetensors: the tensor filed under .* does not have"):
        read_weights(path)
    path.write_bytes(b"not a weights file")
    with pytest.raises(WeightsMismatch, match="weights.safetensors is not a readable weights file"):
        read_weights(path)


def package_zip(path, constants: list[Constant] | None):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data/aotinductor/model/x.so", b"")
    if constants is not None:
        write_constants_list(path, constants)
    return path


def constant(name: str, tensor: torch.Tensor, **kw) -> Constant:
    return Constant(name=name, sha256=tensor_sha256(tensor), dtype=tensor.dtype, shape=tuple(tensor.shape),
                    stride=kw.pop("stride", tuple(tensor.stride())), **kw)


def test_the_constants_list_travels_inside_the_package_and_an_old_package_has_none(tmp_path):
    weight = torch.randn(8, 3, 3, 3)
    listed = [constant("w", weight), constant("p", weight, pack="mkldnn._reorder_convolution_weight",
                                                   args=((1, 1), (1, 1), (1, 1), 1, (1, 3, 16, 16)))]
    package = package_zip(tmp_path / "new.pt2", listed)
    assert any(n.endswith("/" + CONSTANTS) for n in zipfile.ZipFile(package).namelist())
    assert read_constants_list(package) == [listed[0], Constant(**{**listed[1].__dict__, "args": (
        [1, 1], [1, 1], [1, 1], 1, [1, 3, 16, 16])})]
    assert read_constants_list(package_zip(tmp_path / "old.pt2", None)) is None


def test_a_constants_list_may_name_only_the_known_packing_operators(tmp_path):
    package = package_zip(tmp_path / "p.pt2", None)
    entry = {"name": "w", "sha256": "0" * 64, "dtype": "F32", "shape": [1], "stride": [1], "pack": "aten.abs"}
    with zipfile.ZipFile(package, "a") as archive:
        archive.writestr(f"model/{CONSTANTS}", json.dumps({"format": 1, "constants": [entry]}))
    with pytest.raises(WeightsMismatch, match="names packing 'aten.abs', not one of"):
        read_constants_list(package)


def test_constants_are_the_versions_tensors_shared_relaid_or_packed_as_listed(tmp_path):
    bias, weight = torch.randn(8), torch.randn(8, 3, 3, 3)
    source = WeightSource({tensor_sha256(bias): bias, tensor_sha256(weight): weight}, "model.pt")
    channels_last = tuple(weight.contiguous(memory_format=torch.channels_last).stride())
    listed = [constant("b", bias), constant("w_cl", weight, stride=channels_last),
              constant("w_packed", weight, pack="mkldnn._reorder_convolution_weight",
                       args=([1, 1], [1, 1], [1, 1], 1, [1, 3, 16, 16]))]
    built = dict(source.constants_for(tmp_path / "p.pt2", listed, ["b", "w_cl", "w_packed"]))
    assert built["b"].data_ptr() == bias.data_ptr()  # taken as it is: one copy in memory
    assert built["w_cl"].stride() == channels_last and torch.equal(built["w_cl"], weight)
    assert built["w_packed"].is_mkldnn  # packed here, by this process's oneDNN


def test_a_package_whose_constants_the_version_does_not_hold_is_refused_naming_the_files(tmp_path):
    weight = torch.randn(4, 4)
    source = WeightSource({tensor_sha256(weight): weight}, "model.pt and weights.safetensors")
    package = tmp_path / "model-b1t1.pt2"
    with pytest.raises(WeightsMismatch, match="model-b1t1.pt2: constant w .* is in neither model.pt and weights"):
        source.constants_for(package, [constant("w", torch.randn(4, 4))], ["w"])
    wrong_shape = Constant("w", tensor_sha256(weight), torch.float32, (16,), (1,))
    with pytest.raises(WeightsMismatch, match=r"constant w is torch.float32 \[16\] but .* hold torch.float32 \[4, 4\]"):
        source.constants_for(package, [wrong_shape], ["w"])
    with pytest.raises(WeightsMismatch, match="does not match its code .*missing v"):
        source.constants_for(package, [constant("w", weight)], ["w", "v"])


def test_a_frozen_torchscript_modules_constants_are_found_by_their_values():
    conv = torch.nn.Conv2d(3, 4, 3).eval()
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(conv, torch.zeros(1, 3, 8, 8)))
    found = torchscript_constants(frozen)
    assert tensor_sha256(conv.weight) in found and tensor_sha256(conv.bias) in found


def test_weights_are_packed_under_the_thread_count_the_package_was_compiled_for(tmp_path, monkeypatch):
    """oneDNN's kernel, and so its weight layout, follows the threads it runs with: packed under
    another count, a pass reorders the weights every time."""
    from serve.model.runtime import weights as weights_module

    seen = []

    def record(weight, *args):
        seen.append(torch.get_num_threads())
        return weight

    monkeypatch.setitem(weights_module.PACKING, "mkldnn._reorder_convolution_weight", record)
    weight = torch.randn(8, 3, 3, 3)
    source = WeightSource({tensor_sha256(weight): weight}, "model.pt")
    packed = constant("w", weight, pack="mkldnn._reorder_convolution_weight", args=((1, 1),))
    before = torch.get_num_threads()
    for threads in (1, 2):
        source.constants_for(tmp_path / "p.pt2", [packed], ["w"], threads=threads)
    assert seen == [1, 2] and torch.get_num_threads() == before
