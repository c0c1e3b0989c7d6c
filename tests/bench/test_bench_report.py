"""The benchmark's arithmetic: each target's ratio is taken per round, then the median."""

from __future__ import annotations

import statistics

import pytest

from bench.report import Series, bracketed, evaluate, floor_layouts, floor_rows, table


def rounds(**columns) -> dict:
    """A series summary from per-round values, e.g. p50_ms=[30, 40] or throughput=[20, 22]."""
    length = len(next(iter(columns.values())))
    per_round = [{"p50_ms": None, "p99_ms": None, "throughput": None} for _ in range(length)]
    for name, values in columns.items():
        for r, value in zip(per_round, values):
            r[name] = value
    summary = {name: statistics.median(columns[name]) if name in columns else None
               for name in ("p50_ms", "p99_ms", "throughput")}
    return {"count": length, "p95_ms": 0.0, **summary, "rounds": per_round}


def results(**overrides) -> dict:
    series = {
        "floor_single_t1": rounds(p50_ms=[50.0, 48.0, 52.0]),
        "floor_single_t2": rounds(p50_ms=[40.0, 30.0, 35.0]),
        "floor_streams_2x1_b1": rounds(throughput=[38.0, 40.0, 36.0]),
        "floor_streams_2x1_b2": rounds(throughput=[40.0, 36.0, 44.0]),
        "whatcar_jpeg400_c1": rounds(p50_ms=[44.0, 30.0, 35.0]),
        "whatcar_jpeg400_c8": rounds(throughput=[36.0, 36.0, 30.0], p99_ms=[300.0, 310.0, 320.0]),
        "whatcar_jpeg12mp_c1": rounds(p50_ms=[88.0, 60.0, 140.0]),
        "classify_jpeg400": rounds(throughput=[40.0, 30.0, 22.0]),
        "fastai_jpeg400": rounds(p50_ms=[220.0, 150.0, 140.0]),
        "torchserve_jpeg400_c8": rounds(throughput=[24.0, 20.0, 30.0], p99_ms=[600.0, 300.0, 330.0]),
        "forward_compiled_t1": rounds(p50_ms=[30.0, 36.0, 26.0], cpu_ms=[30.0, 36.0, 26.0]),
        "forward_torchscript_t1": rounds(p50_ms=[55.0, 60.0, 50.0]),
        "forward_openvino_t1": rounds(p50_ms=[25.0, 30.0, 20.0], cpu_ms=[20.0, 24.0, 20.0]),
        "forward_compiled_t2": rounds(p50_ms=[20.0, 22.0, 18.0]),
        "forward_openvino_t2": rounds(p50_ms=[20.0, 20.0, 20.0]),
    }
    data = {
        "series": series, "fastai": {}, "torchserve": {}, "openvino": {"version": "2026.4.1", "precision": "f32"},
        "whatcar": {"cold_start_s": [3.0, 1.5, 1.9], "import_torch_s": [1.2, 1.1, 1.5], "rss_after_mib": 250.0,
                    "rss_warm_mib": 240.0, "requests_total": 2100, "settings": {},
                    "runtime": {"name": "compiled", "reason": "AVX2 package"}},
        "machine": {"cpu": "test", "cpus_available": 2, "date": "today", "loadavg_before": [0.1],
                    "loadavg_after": [0.2]},
        "inputs": {"jpeg400": "a photo"}, "rounds": 3,
    }
    data.update(overrides)
    return data


def by_name(targets: list[dict]) -> dict:
    return {t["target"]: t for t in targets}


C1 = "HTTP p50 at c=1 / floor single stream, best thread count (400 px JPEG)"
C8 = "HTTP throughput at c=8 / best floor throughput on all cores"
FASTAI = "learn.predict p50 per image / HTTP p50 at c=1"
TS = "HTTP throughput at c=8 / TorchServe's"
TS_P99 = "TorchServe p99 at c=8 / HTTP p99 at c=8"
PHONE = "12 MP JPEG p50 / 400 px JPEG p50 (HTTP, c=1)"
COLD = "cold start, process start to /readyz 200 (s)"
CLASSIFY = "make classify throughput / best floor throughput on all cores"


def test_ratios_are_medians_of_per_round_ratios():
    t = by_name(evaluate(results()))
    # c=1 against the best single-stream p50 of the same round: 44/40, 30/30, 35/35.
    assert t[C1]["ratio"] == 1.0 and t[C1]["range"] == [1.0, 1.1] and t[C1]["met"]
    # c=8 against the best layout of the same round: 36/40, 36/40, 30/44.
    assert t[C8]["ratio"] == 0.9 and t[C8]["met"]
    # 220/44, 150/30, 140/35 against 3.
    assert t[FASTAI]["ratio"] == 5.0 and t[FASTAI]["met"] and t[FASTAI]["limit"] == 3.0
    # 36/24, 36/20, 30/30 against 2; then 600/300, 300/310, 330/320.
    assert t[TS]["ratio"] == 1.5 and t[TS]["met"] is False and t[TS]["limit"] == 2.0
    assert round(t[TS_P99]["ratio"], 3) == 1.031 and t[TS_P99]["met"]
    assert t[PHONE]["ratio"] == 2.0 and t[PHONE]["met"]  # 2, 2, 4
    assert t[COLD]["ratio"] == 1.9 and t[COLD]["met"]
    # 40/40, 30/40, 22/44 against the same rounds' best layouts.
    assert t[CLASSIFY]["ratio"] == 0.75 and t[CLASSIFY]["range"] == [0.5, 1.0] and t[CLASSIFY]["met"] is False
    rss = [x for x in evaluate(results()) if x["target"].startswith("RSS after ")][0]
    assert round(rss["ratio"]) == 262 and rss["met"]  # 250 MiB against 350 MB


FORWARD_T1 = "compiled forward pass / OpenVINO fp32's, 1 thread (one image at the input size)"
FORWARD_T2 = "compiled forward pass / OpenVINO fp32's, 2 threads (one image at the input size)"
COLD_DELTA = "cold start beyond a bare `import torch` timed just before it (s)"


def test_compiled_forward_pass_is_held_to_openvinos_on_the_same_threads():
    t = by_name(evaluate(results()))
    # 30/25, 36/30, 26/20 -> 1.2, 1.2, 1.3; at 2 threads 1.0, 1.1, 0.9.
    assert t[FORWARD_T1]["ratio"] == 1.2 and t[FORWARD_T1]["met"] is False and t[FORWARD_T1]["limit"] == 1.15
    assert "process CPU per pass 1.50x" in t[FORWARD_T1]["detail"]  # 30/20, 36/24, 26/20
    assert t[FORWARD_T2]["ratio"] == 1.0 and t[FORWARD_T2]["met"]
    report = table({**results(), "targets": evaluate(results())})
    assert "| forward pass alone, TorchScript, 1 thread | 3 | 55.0 |" in report
    assert "whatcar runtime: compiled (AVX2 package)" in report


def test_cold_start_is_judged_against_the_import_timed_just_before_it():
    t = by_name(evaluate(results()))
    # 3.0-1.2, 1.5-1.1, 1.9-1.5 against 0.5: the slowest start alone would have missed it.
    assert t[COLD_DELTA]["ratio"] == pytest.approx(0.4) and t[COLD_DELTA]["met"] and t[COLD_DELTA]["limit"] == 0.5
    assert t[COLD_DELTA]["detail"] == "runtime compiled"


def test_a_missing_openvino_or_compiled_package_leaves_the_forward_target_unjudged():
    data = results(openvino={"skipped": "no OpenVINO virtualenv"})
    for key in ("forward_openvino_t1", "forward_openvino_t2"):
        del data["series"][key]
    t = by_name(evaluate(data))
    assert t[FORWARD_T1]["met"] is None and t[FORWARD_T1]["detail"] == "no OpenVINO virtualenv"
    assert "openvino: skipped (no OpenVINO virtualenv)" in table({**data, "targets": evaluate(data)})
    data = results(floor={"forward_missing": {"compiled": "the artifact has no compiled package"}})
    for key in ("forward_compiled_t1", "forward_compiled_t2"):
        del data["series"][key]
    assert by_name(evaluate(data))[FORWARD_T2]["detail"] == "the artifact has no compiled package"


def test_targets_not_met_are_reported_as_such():
    data = results()
    data["series"]["whatcar_jpeg400_c8"] = rounds(throughput=[20.0, 20.0, 20.0], p99_ms=[900.0, 900.0, 900.0])
    data["whatcar"].update(rss_after_mib=400.0, rss_warm_mib=300.0)
    data["whatcar"]["cold_start_s"] = [2.5, 2.1, 1.0]
    t = by_name(evaluate(data))
    assert t[C8]["met"] is False and t[TS]["met"] is False and t[TS_P99]["met"] is False
    assert t[COLD]["ratio"] == 2.1 and t[COLD]["met"] is False
    assert t[COLD_DELTA]["ratio"] == pytest.approx(1.0) and t[COLD_DELTA]["met"] is False  # 1.3, 1.0, -0.5
    rss = [x for x in evaluate(data) if x["target"].startswith("RSS after 2100")][0]
    assert rss["met"] is False and round(rss["ratio"]) == 419 and rss["limit"] == 350  # 400 MiB is 419 MB
    assert [x for x in evaluate(data) if x["target"].startswith("RSS after those")][0]["met"] is False


def test_skipped_baselines_leave_their_targets_unjudged():
    data = results(fastai={"skipped": "no training virtualenv"}, torchserve={"skipped": "java not found"})
    for name in ("fastai_jpeg400", "torchserve_jpeg400_c8"):
        del data["series"][name]
    targets = evaluate(data)
    unjudged = [t for t in targets if t["met"] is None]
    assert {t["detail"] for t in unjudged} == {"no training virtualenv", "java not found"}
    report = table({**data, "targets": targets})
    assert "fastai: skipped (no training virtualenv)" in report
    assert "| learn.predict p50 per image / HTTP p50 at c=1 | >= 3 | - | - | n/a | no training virtualenv |" in report


def test_floor_throughput_is_bracketed_by_measurements_before_and_after_each_round():
    before, after = Series(), Series()
    for b, a in [(40.0, 20.0), (30.0, 30.0), (36.0, 44.0)]:
        before.add([], b)
        after.add([], a)
    merged = bracketed(before, after).summary()
    assert [r["throughput"] for r in merged["rounds"]] == [30.0, 30.0, 40.0]
    assert merged["throughput"] == 30.0
    assert merged["rounds"][0]["before"] == 40.0 and merged["rounds"][0]["after"] == 20.0


def test_floor_layouts_keep_every_cpu_busy_on_any_machine():
    assert floor_layouts(1) == [(1, 1, 1), (1, 1, 2)]
    assert floor_layouts(2) == [(2, 1, 1), (2, 1, 2), (1, 2, 1), (1, 2, 4)]
    assert (2, 2, 1) in floor_layouts(4)
    assert {(4, 2, 1), (2, 4, 1), (8, 1, 1), (1, 8, 1)} <= set(floor_layouts(8))
    for cpus in (1, 2, 4, 8):
        for streams, threads, batch in floor_layouts(cpus):
            assert streams * threads == cpus and batch >= 1


def test_report_rows_follow_the_layouts_measured():
    assert ("floor_streams_4x2_b1", "floor, 400 px JPEG, 4 streams x 2 threads, batch 1") in floor_rows(8)
    assert ("floor_single_t1", "floor, 400 px JPEG, single stream, 1 thread") in floor_rows(1)
    assert not any(key == "floor_single_t2" for key, _ in floor_rows(1))
    data = results()
    report = table({**data, "targets": evaluate(data)})
    assert "| floor, 400 px JPEG, 2 streams x 1 thread, batch 1 | 3 | - | 0.0 | - | 38.0 |" in report
