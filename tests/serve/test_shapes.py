"""Which compiled shape runs each pass: the pure choice, the passes a server plans, the oneDNN cap
the packages need, and the fallbacks when a shape is missing, built for other threads or fails
its check photos. Real packages are exercised in tests/cross, with the ones tests/export compiled."""

import json
import logging

import pytest
import torch

from serve.artifact import ArtifactError
from serve.manifest import CompiledPackage, Manifest
from serve.onednn import cap_isa, effective_isa, packed_isa
from serve.runtime.choice import PACKED_AT_LOAD, Host, package_problem
from serve.runtime.loading import check_shapes, compiled_choice, warm_up_rounds
from serve.runtime.shapes import ShapedRunner, choose_shape, describe_passes
from serve.scheduler import PassPlan
from tests.support.paths import ARTIFACT


def package(batch, threads, max_batch=None, isa="AVX2"):
    high = max_batch or batch
    return CompiledPackage(file=f"p-{batch}-{high}-{threads}.pt2", sha256="ab" * 32, bytes=1, torch="2.13.0",
                           cpu_capability="AVX2", arch="x86_64", min_batch=batch, max_batch=high, threads=threads,
                           onednn_isa=isa if threads else None)


B1T1, B1T2, B2T1, DYNAMIC = package(1, 1), package(1, 2), package(2, 1), package(1, None, 64)
SHIPPED = [B1T1, B1T2, DYNAMIC]


@pytest.mark.parametrize("batch, threads, expected", [
    (1, 1, B1T1), (1, 2, B1T2),      # each thread count gets its own static package
    (2, 1, DYNAMIC), (7, 2, DYNAMIC),  # other batches: the dynamic package
    (1, 8, DYNAMIC),                 # a bigger machine's solo pass: never a package built for 2 threads
    (65, 1, None),                   # beyond every package: TorchScript
])
def test_each_pass_gets_the_package_built_for_it_or_the_next_runtime(batch, threads, expected):
    assert choose_shape(batch, threads, SHIPPED) is expected


def test_without_a_dynamic_package_other_shapes_fall_to_torchscript():
    assert choose_shape(1, 1, [B1T2, B2T1]) is None and choose_shape(2, 1, [B1T2, B2T1]) is B2T1
    # The narrowest of several dynamic packages that cover the batch.
    narrow = package(1, None, 8)
    assert choose_shape(4, 1, [DYNAMIC, narrow]) is narrow and choose_shape(9, 1, [DYNAMIC, narrow]) is DYNAMIC


def test_shape_names_say_batch_and_threads():
    assert [p.shape for p in SHIPPED + [B2T1]] == ["b1t1", "b1t2", "b1-64", "b2t1"]
    assert B1T1.static and not DYNAMIC.static
    assert describe_passes([(1, 1), (2, 1), (1, 2)], [B1T1, B1T2]) == \
        "b1t1 on b1t1, b2t1 on torchscript, b1t2 on b1t2"


@pytest.mark.parametrize("plan, passes", [
    (PassPlan(workers=2, torch_threads=1, micro_batch=1, solo_threads=2), [(1, 1), (1, 2)]),
    (PassPlan(workers=2, torch_threads=1, micro_batch=4, solo_threads=0), [(1, 1), (2, 1), (4, 1)]),
    (PassPlan(workers=1, torch_threads=2, micro_batch=2, solo_threads=4), [(1, 2), (2, 2), (1, 4)]),
])
def test_a_plan_lists_the_passes_its_threads_warm_up(plan, passes):
    assert plan.passes() == passes


def test_a_package_gets_an_instance_for_each_thread_that_may_run_it():
    plan = PassPlan(workers=3, torch_threads=1, micro_batch=1, solo_threads=2)
    assert (plan.callers(1), plan.callers(2), plan.callers(None), plan.callers(5)) == (3, 1, 4, 1)


# ---------------------------------------------------------------------- oneDNN's cap


def test_the_cap_is_set_unless_the_operator_chose_one():
    environ = {}
    assert cap_isa(environ) and environ == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    chosen = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    assert not cap_isa(chosen) and chosen == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}


def test_packages_built_for_the_cpus_own_kernels_leave_onednn_uncapped():
    environ = {}
    assert not cap_isa(environ, packed_for="AVX512") and environ == {}
    assert not cap_isa(environ, packed_for=PACKED_AT_LOAD) and environ == {}
    assert cap_isa(environ, packed_for="AVX2") and environ == {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def write_version(root, entries):
    (root / "1").mkdir(parents=True)
    (root / "1" / "manifest.json").write_text(json.dumps(manifest_with(entries).data))
    (root / "current").symlink_to("1")


def test_the_cap_follows_what_the_current_versions_packages_are_packed_for(tmp_path):
    host = {**entry(B1T1), "onednn_isa": "AVX512"}
    write_version(tmp_path / "host", [host, {**host, "file": "b1t2.pt2", "threads": 2}, entry(DYNAMIC)])
    assert packed_isa(tmp_path / "host") == "AVX512"
    assert packed_isa(tmp_path / "host" / "1") == "AVX512"  # an artifact folder itself
    write_version(tmp_path / "portable", [entry(p) for p in SHIPPED])
    assert packed_isa(tmp_path / "portable") == "AVX2"
    # Unreadable, missing, mixed or no packed packages: the portable cap; the loader says what is wrong.
    write_version(tmp_path / "mixed", [entry(B1T1), {**host, "file": "b1t2.pt2", "threads": 2}])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{")
    for folder in ("mixed", "broken", "absent"):
        assert packed_isa(tmp_path / folder) == "AVX2"
    assert packed_isa(None) == "AVX2"


def test_a_package_built_by_make_compile_runs_only_on_the_cpu_it_was_built_on():
    built = {**B1T1.requirements(), "cpu_capability": "AVX512", "onednn_isa": "AVX512", "built_for": "AMD EPYC"}
    here = Host("AVX512", "x86_64", "2.13.0+cpu", onednn_isa="AVX512", cpu_model="AMD EPYC")
    assert package_problem(built, here) is None
    elsewhere = Host("AVX512", "x86_64", "2.13.0+cpu", onednn_isa="AVX512", cpu_model="Intel(R) Xeon(R) Processor")
    assert "built by make compile for a AMD EPYC CPU" in package_problem(built, elsewhere)
    # The portable packages name no CPU model.
    assert package_problem(B1T1.requirements(), Host("AVX2", "x86_64", "2.13.0+cpu", cpu_model="x")) is None


@pytest.mark.parametrize("cap, cpu, effective", [
    ("AVX2", "AVX512", "AVX2"), ("avx2", "AVX2", "AVX2"), (None, "AVX512", "AVX512"), ("ALL", "AVX2", "AVX2"),
    ("AVX512_CORE", "AVX2", "AVX2"), ("AVX512_CORE", "AVX512", "AVX512_CORE"),
])
def test_the_effective_isa_is_the_cap_below_what_the_cpu_offers(cap, cpu, effective):
    assert effective_isa(cpu, {} if cap is None else {"ONEDNN_MAX_CPU_ISA": cap}) == effective


def test_packed_weights_are_refused_where_onednn_would_repack_them_every_pass():
    requirements = B1T1.requirements()
    capped = Host("AVX512", "x86_64", "2.13.0+cpu", onednn_isa="AVX2")
    uncapped = Host("AVX512", "x86_64", "2.13.0+cpu", onednn_isa="AVX512")
    assert package_problem(requirements, capped) is None
    assert "packed for oneDNN's AVX2 kernels and oneDNN runs AVX512" in package_problem(requirements, uncapped)
    # The dynamic package packs nothing, so it runs under any cap.
    assert package_problem(DYNAMIC.requirements(), uncapped) is None
    # An AVX2-only CPU without a cap runs AVX2 kernels anyway.
    assert package_problem(requirements, Host("AVX2", "x86_64", "2.13.0+cpu")) is None


# ---------------------------------------------------------------------- the manifest


def manifest_with(entries) -> Manifest:
    data = json.loads((ARTIFACT / "manifest.json").read_text())
    data["files"]["compiled"] = entries
    return Manifest(data)


def entry(shape: CompiledPackage) -> dict:
    return {"file": shape.file, "sha256": shape.sha256, "bytes": 1, "torch": "2.13.0", "cpu_capability": "AVX2",
            "arch": "x86_64", "batch": {"min": shape.min_batch, "max": shape.max_batch}, "threads": shape.threads,
            "onednn_isa": shape.onednn_isa}


def test_the_manifest_lists_one_package_per_shape():
    assert manifest_with([entry(p) for p in SHIPPED]).compiled == SHIPPED
    with pytest.raises(ArtifactError, match="lists a shape or a file twice"):
        _ = manifest_with([entry(B1T1), {**entry(B1T1), "file": "other.pt2"}]).compiled
    assert manifest_with([{**entry(B1T1), "built_for": "AMD EPYC"}]).compiled[0].built_for == "AMD EPYC"
    for bad in ({"threads": 0}, {"threads": "two"}, {"onednn_isa": ""}, {"built_for": ""}, {"built_for": 3}):
        with pytest.raises(ArtifactError, match="files.compiled"):
            _ = manifest_with([{**entry(B1T1), **bad}]).compiled


def test_adding_a_package_appends_and_replaces_one_of_the_same_file(tmp_path):
    manifest = manifest_with([entry(DYNAMIC)])
    (tmp_path / B1T1.file).write_bytes(b"package")
    facts = dict(torch="2.13.0", cpu_capability="AVX2", arch="x86_64", min_batch=1, max_batch=1, threads=1,
                 onednn_isa="AVX2")
    manifest.add_compiled(tmp_path, B1T1.file, **facts)
    manifest.add_compiled(tmp_path, B1T1.file, **facts)
    assert [p.shape for p in manifest.compiled] == ["b1-64", "b1t1"]


# ---------------------------------------------------------------------- the runner


class Fake:
    """Stands in for one package's CompiledRunner: answers its own number in every column."""

    def __init__(self, number: float, classes: int = 3):
        self.number, self.classes, self.calls, self.closed = number, classes, [], False

    def __call__(self, images):
        self.calls.append((images.shape[0], torch.get_num_threads()))
        return torch.full((images.shape[0], self.classes), self.number)

    def close(self):
        self.closed = True


def test_the_runner_picks_by_batch_and_the_calling_threads_count():
    fakes = {B1T1: Fake(1), B1T2: Fake(2)}
    loads = []
    runner = ShapedRunner(fakes, lambda: loads.append(1) or Fake(9))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert runner(torch.zeros(1, 3, 4, 4))[0, 0] == 1 and runner.ran(1) == "b1t1"
        torch.set_num_threads(2)
        assert runner(torch.zeros(1, 3, 4, 4))[0, 0] == 2 and runner.ran(1) == "b1t2"
        assert runner(torch.zeros(3, 3, 4, 4))[0, 0] == 9 and runner.ran(3) == "torchscript"
        runner(torch.zeros(2, 3, 4, 4))
    finally:
        torch.set_num_threads(before)
    assert loads == [1], "TorchScript is loaded once, when a pass first needs it"
    assert warm_up_rounds(runner, [(1, 1), (1, 2)]) == 1 and warm_up_rounds(runner, [(1, 1), (2, 1)]) == 2


class Names(Fake):
    """A package whose every row names class `index` first."""

    def __init__(self, index: int):
        super().__init__(0.0)
        self.index = index

    def __call__(self, images):
        rows = super().__call__(images)
        rows[:, self.index] = 1.0
        return rows


PASSES = [(1, 1), (1, 2)]


def test_a_shape_that_names_a_check_photo_differently_is_dropped_with_one_warning(caplog):
    runner = ShapedRunner({B1T1: Names(0), B1T2: Names(1)}, lambda: Fake(9))
    dropped = runner.runners[B1T2]
    pixels = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="whatcar"):
        assert check_shapes(runner, pixels, [0, 0], classes=3, requested="auto", passes=PASSES) == ["b1t2"]
    assert runner.packages == [B1T1] and dropped.closed
    assert compiled_choice(runner, [(1, 1), (1, 2)]).reason.startswith("b1t1 on b1t1, b1t2 on torchscript; ")
    runner.drop(B1T1)
    assert compiled_choice(runner, [(1, 1)]).name == "torchscript"
    assert [r.getMessage() for r in caplog.records] == [
        "compiled b1t2 not used, its passes go to the next runtime: it named 2 of 2 check photos differently "
        "from the export"]
    # A static batch of 2 is given an odd number of photos padded with copies of the last one.
    pair = Names(2)
    runner = ShapedRunner({B2T1: pair}, lambda: Fake(9))
    with pytest.raises(ArtifactError, match="^--runtime compiled cannot be served: compiled b2t1 not used"):
        check_shapes(runner, pixels[:1], [0], classes=3, requested="compiled", passes=[(2, 1)])
    assert [size for size, _ in pair.calls] == [2] and runner.packages == []



def test_only_the_shapes_planned_passes_use_are_given_check_photos():
    unused = Names(1)  # would disagree, but no planned pass runs it
    runner = ShapedRunner({B1T1: Names(0), DYNAMIC: unused}, lambda: Fake(9))
    pixels = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    assert check_shapes(runner, pixels, [0, 0, 0], classes=3, requested="compiled", passes=[(1, 1)]) == []
    assert unused.calls == [] and [size for size, _ in runner.runners[B1T1].calls] == [1, 1]  # SHAPE_CHECKS


def test_a_package_no_planned_pass_uses_loads_when_a_pass_first_needs_it(caplog):
    loads = []

    def later():
        loads.append(1)
        return Fake(5)

    runner = ShapedRunner({B1T1: Fake(1)}, lambda: Fake(9), later={DYNAMIC: later})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        runner(torch.zeros(1, 3, 4, 4))
        assert loads == [] and runner.ran(3) == "b1-64"
        assert runner(torch.zeros(3, 3, 4, 4))[0, 0] == 5 and runner(torch.zeros(2, 3, 4, 4))[0, 0] == 5
        assert loads == [1]
        # One that fails to load leaves its passes to the next choice, with one line.
        broken = ShapedRunner({}, lambda: Fake(9), later={DYNAMIC: lambda: 1 / 0})
        with caplog.at_level(logging.WARNING, logger="whatcar"):
            assert broken(torch.zeros(2, 3, 4, 4))[0, 0] == 9 and broken(torch.zeros(2, 3, 4, 4))[0, 0] == 9
        assert [r.getMessage() for r in caplog.records] == [
            "compiled b1-64 not used, its passes go to the next runtime: it failed to load: division by zero"]
    finally:
        torch.set_num_threads(before)
