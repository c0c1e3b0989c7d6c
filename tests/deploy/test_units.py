"""The systemd units as shipped: systemd-analyze verify finds nothing to say about them, and they
hold the settings docs/operations.md promises."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.support.paths import ROOT

UNITS = ROOT / "deploy"


def settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


def verify(folder: Path, *names: str) -> subprocess.CompletedProcess:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: make test-deploy installs it (apt-get install systemd)"
    return subprocess.run([analyze, "verify", *(str(folder / name) for name in names)],
                          capture_output=True, text=True, timeout=60)


def test_units_verify_cleanly(tmp_path):
    for name in ("whatcar.socket", "whatcar.service"):
        shutil.copy(UNITS / name, tmp_path / name)
    done = verify(tmp_path, "whatcar.socket", "whatcar.service")
    # verify exits 0 on unknown keys and bad values alike; only silence is clean.
    assert done.returncode == 0 and done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


def test_verify_would_notice_a_mistake(tmp_path):
    text = (UNITS / "whatcar.service").read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    (tmp_path / "whatcar.service").write_text(text)
    shutil.copy(UNITS / "whatcar.socket", tmp_path / "whatcar.socket")
    done = verify(tmp_path, "whatcar.socket", "whatcar.service")
    assert "Unknown key" in done.stderr and "NoNewPrivilege" in done.stderr


def test_service_runs_the_current_release_hardened():
    service = settings((UNITS / "whatcar.service").read_text())
    assert service["WorkingDirectory"] == ["/opt/whatcar/current"]
    assert service["ExecStart"] == ["/bin/sh -c 'exec \"$$(pwd -P)/.venv/serve/bin/python\" -m serve'"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["EnvironmentFile"] == ["-/etc/whatcar/whatcar.env"]
    assert service["Requires"] == ["whatcar.socket"]
    for key, value in [("DynamicUser", "yes"), ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ReadOnlyPaths", "/opt/whatcar"), ("PrivateTmp", "yes"), ("ProtectHome", "yes")]:
        assert service[key] == [value], key
    socket_unit = settings((UNITS / "whatcar.socket").read_text())
    assert len(socket_unit["ListenStream"]) == 1, "the server answers on one socket"


def test_security_exposure_is_low(tmp_path):
    shutil.copy(UNITS / "whatcar.service", tmp_path / "whatcar.service")
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", str(tmp_path / "whatcar.service")],
                          capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for whatcar.service: ([\d.]+)", done.stdout + done.stderr)
    assert score, done.stdout + done.stderr
    # 0 is fully confined, 10 unconfined; systemd calls up to 1.9 "OK" and up to 0.9 "SAFE".
    assert float(score.group(1)) <= 1.9, done.stdout
