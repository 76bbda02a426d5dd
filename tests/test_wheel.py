"""machaon as a hospital installs it: a wheel built by `pip wheel .`, installed into a fresh
virtual environment, carries its default configuration, its migrations and its converters,
builds a model and serves on the embedded default from any folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness import ENVS, REPO, copy_model, free_port


def run(*cmd, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with machaon[build] installed from its wheel; its bin folder."""
    folder = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
        "-w", folder / "dist", REPO, cwd=folder)
    wheel = next((folder / "dist").glob("machaon-*.whl"))
    run(sys.executable, "-m", "venv", folder / "venv", cwd=folder)
    run(folder / "venv" / "bin" / "pip", "install", "-q", "--disable-pip-version-check", f"{wheel}[build]",
        cwd=folder)
    return folder / "venv" / "bin"


def test_the_package_and_its_data_come_from_the_wheel(installed, tmp_path):
    probe = ("import machaon, machaon.config, machaon.tools.build as b; "
             "print(machaon.__file__); print(machaon.config.embedded_config_path()); print(b.converters_dir())")
    lines = run(installed / "python", "-c", probe, cwd=tmp_path).stdout.split()
    site = installed.parent / "lib"
    for path in map(Path, lines):
        assert path.exists() and site in path.parents, f"{path} is not inside the installed package"
    assert (Path(lines[2]) / "keras_to_onnx.py").exists()
    assert (Path(lines[2]) / "requirements-mxnet.txt").exists()


def test_the_installed_wheel_builds_a_model_and_serves_on_the_embedded_default(installed, tmp_path):
    machaon = installed / "machaon"
    sources = copy_model(tmp_path / "sources", "lv-segmentation", **{"source.variants": []})
    # From an empty folder, as a service would start: build/models and var/ are made there.
    built = run(machaon, "models", "build", "lv-segmentation", "--source", sources, "--envs", ENVS,
                cwd=tmp_path)
    assert (tmp_path / "build" / "models" / "lv-segmentation" / "model.onnx").exists(), built.stdout
    run(machaon, "db", "upgrade", cwd=tmp_path)
    port = free_port()
    api = free_port()
    env = {**os.environ, "MACHAON_DICOM_HOST": "127.0.0.1", "MACHAON_DICOM_PORT": str(port),
           "MACHAON_API_PORT": str(api)}
    env.pop("MACHAON_CONFIG", None)
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([machaon, "serve"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "listening as" not in (tmp_path / "serve.log").read_text():
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        echo = subprocess.run(["/usr/bin/echoscu", "-aec", "MACHAON", "127.0.0.1", str(port)], capture_output=True,
                              text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        # The web page's templates and static files are in the wheel: its sign-in page renders.
        with urllib.request.urlopen(f"http://127.0.0.1:{api}/signin", timeout=10) as page:
            assert "Sign in" in page.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{api}/static/machaon.css", timeout=10) as css:
            assert css.status == 200
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()
    assert (tmp_path / "var" / "machaon.db").exists()
