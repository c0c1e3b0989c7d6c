"""The module paths earlier releases documented keep working after serve/ was split into layers."""

import subprocess
import sys

from tests.support.paths import ROOT


def test_the_old_wsgi_entry_point_is_the_new_one():
    import serve.app
    import serve.process.startup

    assert serve.app.get_app is serve.process.startup.get_app


def test_python_m_serve_control_still_runs_the_control_client():
    done = subprocess.run([sys.executable, "-m", "serve.control", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    new = subprocess.run([sys.executable, "-m", "serve.process.control", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert done.returncode == new.returncode == 0
    assert "reload" in done.stdout and done.stdout.split("\n", 1)[1] == new.stdout.split("\n", 1)[1]
