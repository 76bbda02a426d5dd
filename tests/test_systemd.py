"""The systemd units as systemd itself reads them: `systemd-analyze verify` finds nothing to say,
`systemd-analyze security` rates both at most 2.0, and every path the shipped configurations
write to lies where the units let machaon write."""

import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
from machaon.config import load_settings
from sqlalchemy.engine import make_url

ROOT = Path(__file__).parents[1]
UNITS = ["machaon.service", "machaon-worker@.service"]
CONFIGS = [ROOT / "config" / "machaon.toml", *sorted((ROOT / "config" / "examples").glob("*.toml"))]
MAX_EXPOSURE = 2.0
# Paths machaon only reads: they may lie outside ReadWritePaths (models are built by an operator,
# TLS files are put in place by one), but not where the units hide them.
READ_ONLY = re.compile(r"^models\.path$|\.(certificate|private_key|ca_certificates)$")
HIDDEN = {"ProtectHome": ["/home", "/root", "/run/user"], "PrivateTmp": ["/tmp", "/var/tmp"]}


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is not installed: install Debian's systemd package "
                    "(apt-get install systemd), which provides it")
    return found


def unit_settings(unit: str) -> dict[str, list[str]]:
    """The [Service] settings of `unit`, each key with its values in order."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in (ROOT / "systemd" / unit).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def offline_root(tmp_path: Path) -> Path:
    """A file-system root for `verify --root`: the units installed, the system's own units they
    refer to (multi-user.target, ...) and an executable where ExecStart expects machaon."""
    root = tmp_path / "root"
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(ROOT / "systemd" / unit, units / unit)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for unit in UNITS:
        command = unit_settings(unit)["ExecStart"][0].split()[0]
        program = root / command.lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    return root


def test_units_verify_clean(tmp_path):
    root = offline_root(tmp_path)
    run = subprocess.run([systemd_analyze(), "verify", f"--root={root}", *UNITS],
                         capture_output=True, text=True, timeout=120)
    # verify exits 0 after some warnings (an unknown key is "ignored"): nothing may be said at all.
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_at_most_2(unit):
    run = subprocess.run([systemd_analyze(), "security", "--offline=true", str(ROOT / "systemd" / unit)],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout)
    assert found, f"no overall exposure level in:\n{run.stdout}{run.stderr}"
    assert float(found.group(1)) <= MAX_EXPOSURE, run.stdout


def test_units_have_limits_and_no_privilege_by_default():
    """The limits the issue asks for are set, port 104's capability is not granted, a config error
    (78) is not restarted while a temporary failure (75) is, and stopping outlasts shutdown_grace."""
    grace = load_settings(ROOT / "config" / "machaon.toml", environ={}).dicom.shutdown_grace
    for unit in UNITS:
        settings = unit_settings(unit)
        for key in ("MemoryHigh", "MemoryMax", "TasksMax", "LimitNOFILE"):
            assert settings.get(key), f"{unit}: {key} not set"
        assert settings["AmbientCapabilities"] == [""] and settings["CapabilityBoundingSet"] == [""], unit
        assert settings["UMask"] == ["0077"], unit
        assert settings["Restart"] == ["on-failure"] and settings["RestartPreventExitStatus"] == ["78"], unit
        assert float(settings["TimeoutStopSec"][0]) > grace, unit


def config_paths(config: Path) -> list[tuple[str, str]]:
    """(key, path) of every file-system path in `config` once loaded (embedded defaults included)."""
    settings = load_settings(config, environ={})
    found = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(f"{prefix}.{i}", item)
        elif isinstance(value, Path):
            found.append((prefix, str(value)))

    walk("", settings.model_dump())
    url = make_url(settings.database.url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        found.append(("database.url", url.database))
    return found


def inside(path: PurePosixPath, folder: str) -> bool:
    return path == PurePosixPath(folder) or PurePosixPath(folder) in path.parents


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("unit", UNITS)
def test_config_paths_inside_read_write_paths(unit, config):
    settings = unit_settings(unit)
    workdir = settings["WorkingDirectory"][0]
    writable = [p.lstrip("-+") for line in settings["ReadWritePaths"] for p in line.split()]
    hidden = [folder for key, folders in HIDDEN.items() if settings.get(key) == ["yes"] for folder in folders]
    paths = config_paths(config)
    assert paths
    wrong = []
    for key, value in paths:
        path = PurePosixPath(os.path.normpath(PurePosixPath(workdir) / value))
        if READ_ONLY.search(key):
            if any(inside(path, folder) for folder in hidden):
                wrong.append(f"{key} = {value!r} ({path}: hidden from the service)")
        elif not any(inside(path, folder) for folder in writable):
            wrong.append(f"{key} = {value!r} ({path}: outside ReadWritePaths {' '.join(writable)})")
    assert not wrong, f"{config.name} under {unit}:\n" + "\n".join(wrong)
