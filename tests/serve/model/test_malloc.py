"""The malloc arena limit: applied on glibc, and never over an operator's own setting."""

import subprocess
import sys

import pytest

from serve.model.malloc import limit_arenas


@pytest.mark.parametrize("environ", [{"MALLOC_ARENA_MAX": "4"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}])
def test_operator_setting_wins(environ):
    assert limit_arenas(1, environ=environ) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_applied_on_glibc():
    # In a child process, so this test run keeps its own allocator settings.
    code = "from serve.model.malloc import limit_arenas; print(limit_arenas(1, environ={}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_arena_cap_is_a_setting_off_by_default():
    from serve.process.config import ConfigError, load_config
    from tests.support.paths import ARTIFACTS

    assert load_config(["--model-dir", str(ARTIFACTS)], environ={}).malloc_arenas == 0
    config = load_config(["--model-dir", str(ARTIFACTS)], environ={"WHATCAR_MALLOC_ARENAS": "1"})
    assert config.malloc_arenas == 1
    with pytest.raises(ConfigError, match="malloc_arenas"):
        load_config(["--model-dir", str(ARTIFACTS), "--malloc-arenas", "-1"], environ={})


def test_freed_memory_is_kept_unless_the_operator_set_glibcs_thresholds():
    from serve.model.malloc import keep_freed_memory

    for chosen in ({"MALLOC_TRIM_THRESHOLD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"}):
        assert keep_freed_memory(chosen) is False
    assert keep_freed_memory({}) is True  # glibc accepted both settings
