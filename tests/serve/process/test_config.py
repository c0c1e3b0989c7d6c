"""Settings: flags beat WHATCAR_* variables beat defaults; bad values stop start-up."""

import pytest

from serve.model import cpus
from serve.process.config import Config, ConfigError, build_parser, load_config
from tests.support.paths import ARTIFACTS, ROOT


def test_defaults_fit_the_cpus_the_process_has(monkeypatch):
    monkeypatch.setattr("serve.process.config.available_cpus", lambda: 3)
    config = load_config(["--model-dir", str(ARTIFACTS)], environ={})
    assert config.host == "127.0.0.1" and config.port == 8080
    assert config.torch_threads * config.inference_workers == 3
    assert config.threads >= config.inference_workers


def test_environment_then_flags(tmp_path):
    env = {"WHATCAR_MODEL_DIR": str(ARTIFACTS), "WHATCAR_PORT": "9000", "WHATCAR_TOP_K": "3"}
    assert load_config([], environ=env).port == 9000
    config = load_config(["--port", "9100"], environ=env)
    assert config.port == 9100 and config.top_k == 3


@pytest.mark.parametrize("argv, message", [
    (["--port", "http"], "--port='http' is not a valid int"),
    (["--port", "70000"], "port must be 0-65535"),
    (["--threads", "0"], "threads must be at least 1"),
    (["--log-level", "LOUD"], "log_level"),
    (["--model-dir", "/nonexistent/whatcar"], "does not exist"),
    (["--ready-file", "/nonexistent/whatcar/ready.json"], "ready file folder /nonexistent/whatcar does not exist"),
    (["--ready-file", "/"], "ready file / is a folder"),
])
def test_bad_settings_are_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["--model-dir", str(ARTIFACTS), *argv] if "--model-dir" not in argv else argv, environ={})


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="WHATCAR_MAX_UPLOAD_BYTES='lots'"):
        load_config(["--model-dir", str(ARTIFACTS)], environ={"WHATCAR_MAX_UPLOAD_BYTES": "lots"})


def test_the_request_image_limit_keeps_its_flag_and_variable():
    """--max-batch and WHATCAR_MAX_BATCH set the most images one /v2 request may carry; the code
    calls it max_request_images, and what users type and read must not change with that."""
    base = ["--model-dir", str(ARTIFACTS)]
    assert load_config(base, environ={}).max_request_images == 32
    assert load_config(base, environ={"WHATCAR_MAX_BATCH": "8"}).max_request_images == 8
    assert load_config([*base, "--max-batch", "4"], environ={"WHATCAR_MAX_BATCH": "8"}).max_request_images == 4
    message = r"^max_batch must be at least 1 \(got 0\); set --max-batch or WHATCAR_MAX_BATCH$"
    with pytest.raises(ConfigError, match=message):
        load_config([*base, "--max-batch", "0"], environ={})
    with pytest.raises(ConfigError, match="WHATCAR_MAX_BATCH='many' is not a valid int"):
        load_config(base, environ={"WHATCAR_MAX_BATCH": "many"})
    text = build_parser({**Config().__dict__}).format_help()
    assert "--max-batch MAX_BATCH" in text and "WHATCAR_MAX_BATCH" in text and "REQUEST_IMAGES" not in text


def test_cgroup_quota_is_read(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_cpu_limit(tmp_path) is None
    assert cpus.cgroup_cpu_limit(tmp_path / "missing") is None


def test_quota_caps_the_cpu_count(monkeypatch):
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 1.5)
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpus.available_cpus() == 2


def test_openmp_waits_passively_unless_the_operator_chose_otherwise():
    from serve.model.openmp import passive_waits

    environ = {}
    assert passive_waits(environ) and environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "100000"}):
        environ = dict(chosen)
        assert not passive_waits(environ) and environ == chosen


def test_the_server_sets_the_wait_policy_before_torch_loads():
    """libgomp reads the policy once, when torch loads it: serve/__main__.py must set it first."""
    import ast

    tree = ast.parse((ROOT / "serve" / "__main__.py").read_text())
    calls = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "passive_waits"]
    server_import = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.module == "process.server"]
    assert calls and server_import and calls[0] < server_import[0]


def test_the_core_gets_its_settings_from_the_config_once(tmp_path):
    from serve.model.settings import InferenceSettings

    config = load_config(["--model-dir", str(tmp_path), "--runtime", "torchscript", "--micro-batch", "4",
                          "--max-image-pixels", "1000", "--batch-wait-ms", "2.5"], {})
    settings = config.inference
    assert settings is config.inference and type(settings) is InferenceSettings
    assert settings == InferenceSettings(model_dir=tmp_path, runtime="torchscript", torch_threads=config.torch_threads,
                                         inference_workers=config.inference_workers, micro_batch=4,
                                         solo_threads=config.solo_threads, batch_wait_ms=2.5, max_image_pixels=1000)
    # Host, port and the admin token stay with the server.
    assert not {"host", "port", "admin_token"} & set(vars(settings))


def imports_of(path) -> set[str]:
    """The absolute module names `path` imports, relative imports resolved."""
    import ast

    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text())
    # Imports for type checkers only never run.
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            # `from serve.model import onednn` imports a module too: count each name under its base.
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("layer, above", [("model", ("serve.http", "serve.process")),
                                          ("classify", ("serve.http", "serve.process")),
                                          ("http", ("serve.process",))])
def test_each_layer_imports_nothing_from_the_layers_above_it(layer, above):
    offending = {f"{path.relative_to(ROOT)}: {name}" for path in (ROOT / "serve" / layer).rglob("*.py")
                 for name in imports_of(path) if name.startswith(above)}
    assert offending == set()


def test_the_import_check_resolves_relative_imports():
    assert {"serve.model.settings", "serve.model.settings.InferenceSettings"} <= \
        imports_of(ROOT / "serve" / "model" / "handler.py")
    assert "serve.model.handler.load_handler" in imports_of(ROOT / "serve" / "classify" / "local.py")
    assert "serve.http.app.create_app" in imports_of(ROOT / "serve" / "process" / "server.py")
    assert "serve.process.config.Config" not in imports_of(ROOT / "serve" / "http" / "app.py")
