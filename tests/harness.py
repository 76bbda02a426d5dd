"""What the tests drive and look at: `machaon` as a process, DCMTK's storescu, a real Orthanc,
throwaway certificates, and a few helpers. The fixtures that use them are in conftest.py."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import tomli_w
from filelock import FileLock
from machaon.store import DeliveryStatus, JobStatus

MACHAON = str(Path(sys.executable).with_name("machaon"))
REPO = Path(__file__).resolve().parents[1]
# The build environments (TensorFlow, MXNet) the model tests use; created on first use.
ENVS = Path(os.environ.get("MACHAON_TEST_ENVS", REPO / "build" / "envs"))

def copy_model(sources: Path, name: str, **changes) -> Path:
    """models/<name> copied under `sources`, with manifest fields changed ("input.size" = [64, 64])."""
    folder = sources / name
    shutil.copytree(REPO / "models" / name, folder, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = tomllib.loads((folder / "manifest.toml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        manifest[section][key] = value
    (folder / "manifest.toml").write_text(tomli_w.dumps(manifest))
    return sources


def build_environments(frameworks: list[str]) -> None:
    """Make sure the build environments for `frameworks` are ready in ENVS, creating those that are
    not. Tests run in parallel (pytest-xdist workers): one worker creates an environment while the
    others wait for it, since two pip installs into one environment at once would corrupt it."""
    from machaon.tools.build import Environments
    from rich.console import Console

    ENVS.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(ENVS.with_name(f"{ENVS.name}.lock")):
        environments = Environments(ENVS, Console(quiet=True))
        for framework in frameworks:
            environments.python(framework)  # quick when the environment is up to date


# The servers the tests start listen on ports below Linux's ephemeral range (32768-60999), where
# no outgoing connection (an HTTP poll, a PostgreSQL session, an association) can take a port
# between the moment it is picked here and the moment the server binds it. Each pytest-xdist
# worker picks from a block of its own, so that two workers never pick the same port; the random
# start keeps another test run on this machine from walking the same ports in step.
_PORT_BLOCK = 1000
_PORT_BLOCKS = range(20000, 32000, _PORT_BLOCK)
_next_port = itertools.count(random.randrange(_PORT_BLOCK))


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, for a server a test is about to start."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1"...; unset without workers
    block = _PORT_BLOCKS[(int(worker[2:]) + 1 if worker else 0) % len(_PORT_BLOCKS)]
    for _ in range(_PORT_BLOCK):
        port = block + next(_next_port) % _PORT_BLOCK  # never one this process handed out lately
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use: by a server still running, or by another program
        return port
    raise AssertionError(f"no free port on 127.0.0.1 in {block}-{block + _PORT_BLOCK - 1}")


def run_machaon(*args: str, env: dict | None = None, check: bool = False,
                config: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [MACHAON, *args] + (["--config", str(config)] if config else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


class Server:
    """`machaon serve` running as its own process, as an operator would run it."""

    def __init__(self, workdir: Path, db_url: str, settings: dict[str, dict], extra: str = ""):
        self.workdir = workdir
        self.port = free_port()
        self.db_url = db_url
        self.log_path = workdir / "serve.log"
        sections = {
            "dicom": {"host": "127.0.0.1", "port": self.port, "shutdown_grace": 10},
            "spool": {"path": str(workdir / "spool"), "min_free_mb": 0},
            "database": {"url": db_url},
            "completion": {"complete_after": 1, "check_every": 0.2},
            "api": {"host": "127.0.0.1", "port": free_port()},  # the REST API and page: a port of its own
        }
        for section, values in settings.items():
            sections.setdefault(section, {}).update(values)
        self.spool = Path(sections["spool"]["path"])
        self.api_port = sections["api"]["port"]
        self.api_enabled = sections["api"].get("enabled", True)
        self._token: str | None = None
        self.config = workdir / "machaon.toml"
        self.config.write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
            for name, values in sections.items()) + extra)  # extra: TOML tables such as [[rules]]
        self.proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> Server:
        self._log = self.log_path.open("a")
        earlier = len(self.log())  # a server restarted in the same folder appends to its log
        self.proc = subprocess.Popen([MACHAON, "serve", "--config", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir)
        # Generous: with the tests running in parallel workers on two cores, start-up (imports,
        # checks, migrations) can take tens of seconds; a server that starts returns at once.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"machaon serve exited {self.proc.returncode}:\n{self.log()}")
            log = self.log()[earlier:]
            # The API starts last: once it answers, everything it drives is running.
            if "listening as" in log and (not self.api_enabled or "API and web page on" in log):
                return self
            time.sleep(0.05)
        raise AssertionError(f"machaon serve did not start:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"machaon serve did not stop on {sig}:\n{self.log()}") from None
        if self.proc:
            self._log.close()
        return self.proc.returncode if self.proc else 0

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def machaon(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_machaon(*args, config=self.config, check=check)

    def study(self, study_uid: str) -> dict | None:
        """`studies show --json`, asked of the server's API where it has one: tests poll this, and a
        `machaon` process per poll would take the CPU the server under test needs."""
        if not self.api_enabled:
            proc = self.machaon("studies", "show", study_uid, "--json", check=False)
            return json.loads(proc.stdout) if proc.returncode == 0 else None
        request = urllib.request.Request(f"{self.api_url}/api/v1/studies/{study_uid}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    @property
    def token(self) -> str:
        """A viewer's token for the server's API, made on first use."""
        if self._token is None:
            from machaon import operations
            from machaon.store import Store
            store = Store(self.db_url)
            try:
                self._token = operations.create_token(store, f"tests-{self.port}", "viewer", "tests")
            finally:
                store.dispose()
        return self._token

    def wait_for(self, predicate, timeout: float = 20, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; server log:\n{self.log()}")


def _toml(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def storescu(port: int, *files: Path | str, aet: str = "SCANNER", aec: str = "MACHAON",
             extra: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    """DCMTK's storescu, the independent sender. -v logs each response."""
    cmd = ["/usr/bin/storescu", "-v", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TCP_NODELAY": "1"})


def acknowledged(storescu_output: str) -> int:
    """How many C-STOREs storescu -v saw succeed."""
    return storescu_output.count("Received Store Response (Success)")


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information (which a receiver rewrites)."""
    data = Path(path).read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a DICOM file"
    # (0002,0000) UL group length, explicit VR: tag 4 + VR 2 + length 2 + value 4.
    assert data[132:138] == b"\x02\x00\x00\x00UL", f"{path} has no File Meta group length"
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    return data[meta_end:]


class Orthanc:
    """A real Orthanc PACS (Debian's orthanc + orthanc-dicomweb) on free 127.0.0.1 ports."""

    PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

    def __init__(self, folder: Path, **settings):
        self.folder, self.dicom_port, self.http_port = folder, free_port(), free_port()
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(settings | {
            "Name": "machaon-test", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"), "DicomAet": "ORTHANC",
            "DicomPort": self.dicom_port, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "Plugins": [self.PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StableAge": 1,
        }))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        log = (self.folder / "orthanc.log").open("a")
        self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60  # after a stop, Orthanc waits for its SQLite lock
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited {self.proc.returncode}: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/system", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def get(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            return json.loads(response.read())


def make_certificates(folder: Path) -> Path:
    """A throwaway CA and two certificates it signs with openssl: `pacs` (for 127.0.0.1) and
    `machaon` (a client), each as NAME.crt and NAME.key; also `other-ca.crt`, a CA that signed nothing."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)
    folder.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                "-days", "2", "-subj", f"/CN=machaon test {ca}")
    for name, san in (("pacs", "IP:127.0.0.1,DNS:localhost"), ("machaon", "DNS:machaon")):
        (folder / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return folder


# One rule: the LV segmenter for short-axis MR series, its results to {destination}.
RULES = '''
[[rules]]
name = "lv"
models = ["lv-segmentation"]
destinations = ["{destination}"]
match = {{ modality = ["MR"], series_description = "sax", min_slices = 3 }}
'''


def folder_setup(tmp_path) -> str:
    """The LV rule with a folder destination, tmp_path/out."""
    return RULES.format(destination="out") + f'[destinations.out]\ntype = "folder"\npath = "{tmp_path / "out"}"\n'


def jobs_of(server, study_uid: str) -> list[dict]:
    study = server.study(study_uid)
    return study["jobs"] if study else []


def finished(server, study_uid: str, count: int = 1):
    def check():
        jobs = jobs_of(server, study_uid)
        done = [j for j in jobs if j["status"] in (JobStatus.SUCCEEDED, JobStatus.FAILED)]
        return done if len(done) >= count else None
    return server.wait_for(check, timeout=60, what=f"{count} finished job(s) for {study_uid}")


def delivered(server, study_uid: str):
    def check():
        results = [r for j in jobs_of(server, study_uid) for r in j["results"]]
        ok = results and all(d["status"] == DeliveryStatus.SENT for r in results for d in r["deliveries"])
        return results if ok else None
    return server.wait_for(check, timeout=60, what=f"results of {study_uid} delivered")
