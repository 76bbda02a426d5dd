"""`machaon doctor`: everything the service depends on, checked now, in one table.

Each check gives OK, WARN or FAIL with a one-line detail and, where something is wrong, what to
do about it. The checks reuse what the service itself uses (start-up's store and config-file
checks, the senders' clients, ONNX Runtime sessions), so a check passes here exactly when the
service would get on with it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import ssl
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .config import ConfigError, Settings, Unavailable, embedded_config_path, load_settings
from .display import Column, print_table, step
from .senders.dicom import DicomDestination, TlsSettings
from .senders.dicomweb import DicomWebDestination
from .senders.folder import FolderDestination

OK, WARN, FAIL = "OK", "WARN", "FAIL"
# A certificate that runs out within this many days is warned about.
EXPIRY_WARNING_DAYS = 30
VERIFICATION = "1.2.840.10008.1.1"  # the Verification SOP Class (C-ECHO)


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # OK, WARN or FAIL
    detail: str
    fix: str | None = None  # what to do, for WARN and FAIL


def doctor(config: str | None, as_json: bool, wide: bool, console: Console) -> int:
    """Run every check on the configuration at `config` and print the findings; 1 if any failed."""
    # The findings say what went wrong; the libraries' own log lines would say it again, worse.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    show_progress = console.is_interactive and not as_json
    findings = list(run_checks(config, console if show_progress else None))
    if as_json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        _print(findings, wide, console)
    return 1 if any(f.status == FAIL for f in findings) else 0


def run_checks(config: str | None, console: Console | None = None) -> Iterator[Finding]:
    """The findings, in order; `console` shows progress through the long checks."""
    path = Path(config or os.environ.get("MACHAON_CONFIG") or embedded_config_path())
    try:
        settings = load_settings(config)
    except ConfigError as exc:  # nothing else can be checked without a configuration
        fix = (f"correct it in {path} (or the environment variable it names)" if path.is_file()
               else "give the configuration file: --config FILE, or MACHAON_CONFIG")
        yield Finding("config", FAIL, str(exc), fix)
        return
    yield Finding("config", OK, f"{path} is valid")
    yield config_file(settings)
    with _progress(console, "checking the job store"):
        yield from store(settings)
    yield from spool(settings)
    yield from tls_files(settings)
    yield from models(settings, console)
    yield from destinations(settings, console)


def _progress(console: Console | None, text: str) -> AbstractContextManager[None]:
    return step(console, text) if console else nullcontext()


# --- configuration, store, spool ---------------------------------------------------------------

def config_file(settings: Settings) -> Finding:
    from .startup import check_config_file
    try:
        check_config_file(settings)
    except ConfigError as exc:  # "...: run `chmod 600 FILE`": the detail, then the fix
        detail, _, fix = str(exc).rpartition(": run ")
        return Finding("config file", FAIL, detail or str(exc), f"run {fix}" if detail else None)
    return Finding("config file", OK, "no password in a file other users can read")


def store(settings: Settings) -> Iterator[Finding]:
    """Reachable, then migrated: start-up's own check (open_store), without its waiting."""
    from sqlalchemy import make_url

    from .startup import open_store
    from .store import current_revision
    where = make_url(settings.database.url).render_as_string(hide_password=True)
    try:
        opened = open_store(settings)
    except Unavailable as exc:
        yield Finding("store", FAIL, str(exc), "start the database, or correct database.url")
        return
    except ConfigError as exc:
        message = str(exc)
        if "there is no job store" in message:
            yield Finding("store", FAIL, message, "create it: run `machaon db upgrade`")
        elif "machaon db upgrade" in message:  # reached, but its tables are missing or older
            yield Finding("store", OK, f"{where} reachable")
            yield Finding("store schema", FAIL, message, "run `machaon db upgrade` (with this --config)")
        else:
            yield Finding("store", FAIL, message, "correct database.url")
        return
    try:
        revision = current_revision(opened.engine)
    finally:
        opened.dispose()
    yield Finding("store", OK, f"{where} reachable")
    yield Finding("store schema", OK, f"current (revision {revision})")


def spool(settings: Settings) -> Iterator[Finding]:
    root = settings.spool.path.absolute()
    existing = _nearest_existing(root)
    if existing != root:
        if os.access(existing, os.W_OK | os.X_OK):
            yield Finding("spool", WARN, f"{root} does not exist yet (`machaon serve` creates it)",
                          f"run `mkdir -m 700 -p {root}`")
        else:
            yield Finding("spool", FAIL, f"{root} does not exist, and {existing} is not writable",
                          f"create it for the service's user: `mkdir -m 700 -p {root}` and `chown` it")
    else:
        yield _writable("spool", root)
    yield _free_space(settings, existing)
    if existing == root:
        yield _private("spool permissions", root)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(check: str, folder: Path) -> Finding:
    """A file written and removed in `folder`: what the service will do there."""
    if not folder.is_dir():
        return Finding(check, FAIL, f"{folder} is not a folder", "point the setting at a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".machaon-doctor-") as probe:
            probe.write(b"machaon")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return Finding(check, FAIL, f"{folder} is not writable: {exc.strerror or exc}",
                       f"make it writable by this user: `chown {_user()} {folder}`")
    return Finding(check, OK, f"{folder} is writable")


def _free_space(settings: Settings, folder: Path) -> Finding:
    free_mb = shutil.disk_usage(folder).free // (1024 * 1024)
    minimum = settings.spool.min_free_mb
    detail = f"{free_mb} MB free on {folder} (spool.min_free_mb = {minimum})"
    fix = "free space on that file system, or move spool.path to a larger one"
    if free_mb < minimum:
        return Finding("spool space", FAIL, detail + ": studies are refused", fix)
    if free_mb < 2 * minimum:
        return Finding("spool space", WARN, detail + ": less than twice the minimum", fix)
    return Finding("spool space", OK, detail)


def _private(check: str, folder: Path) -> Finding:
    """The spool holds patient data: no one but the service's user should read it."""
    mode = stat.S_IMODE(folder.stat().st_mode)
    if mode & 0o077:
        return Finding(check, WARN, f"{folder} can be read by other users (mode {mode:04o})",
                       f"run `chmod -R go= {folder}`")
    return Finding(check, OK, f"{folder} is private (mode {mode:04o})")


def _user() -> str:
    import pwd
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


# --- TLS files -------------------------------------------------------------------------------

def tls_files(settings: Settings) -> Iterator[Finding]:
    """[dicom.tls] and each destination's tls table: files readable, certificates in date, the
    private key the certificate's."""
    listener = settings.dicom.tls
    if listener:
        yield from _tls_pair("listener", listener.certificate, listener.private_key)
        if listener.ca_certificates:
            yield _ca_file("tls listener CA", listener.ca_certificates)
    for name, destination in settings.destinations.items():
        tls: TlsSettings | None = getattr(destination, "tls", None)
        if tls is None:
            continue
        yield _ca_file(f"tls {name} CA", tls.ca_certificates)
        if tls.certificate and tls.private_key:
            yield from _tls_pair(name, tls.certificate, tls.private_key)


def _tls_pair(owner: str, certificate: Path, private_key: Path) -> Iterator[Finding]:
    yield _certificate_file(f"tls {owner} cert", certificate)
    yield _private_key_file(f"tls {owner} key", certificate, private_key)


def _certificate_file(check: str, path: Path) -> Finding:
    """Every certificate in the file (the certificate and its chain) must be in date."""
    try:
        expiries = _expiries(path)
    except (OSError, ValueError) as exc:
        return _unreadable(check, path, exc)
    soonest = min(expiries)
    days = (soonest - time.time()) / 86400
    when = time.strftime("%Y-%m-%d", time.gmtime(soonest))
    renew = f"renew the certificate in {path}, then restart the service"
    if days < 0:
        return Finding(check, FAIL, f"{path} expired on {when}", renew)
    if days < EXPIRY_WARNING_DAYS:
        return Finding(check, WARN, f"{path} expires on {when}, in {days:.0f} days", renew)
    return Finding(check, OK, f"{path} valid until {when}")


def _ca_file(check: str, path: Path) -> Finding:
    """A CA bundle: it may hold expired certificates beside the ones in use, so only a bundle
    with none in date fails."""
    try:
        expiries = _expiries(path)
        ssl.create_default_context(cafile=str(path))
    except (OSError, ValueError, ssl.SSLError) as exc:
        return _unreadable(check, path, exc)
    now = time.time()
    expired = sum(1 for t in expiries if t < now)
    soon = sum(1 for t in expiries if now <= t < now + EXPIRY_WARNING_DAYS * 86400)
    renew = f"replace the expired CA certificates in {path}"
    if expired == len(expiries):
        return Finding(check, FAIL, f"{path}: every certificate in it has expired", renew)
    if expired or soon:
        return Finding(check, WARN, f"{path}: {expired} of {len(expiries)} certificates expired, {soon} "
                       f"expire within {EXPIRY_WARNING_DAYS} days", renew)
    return Finding(check, OK, f"{path}: {len(expiries)} certificate(s), all in date")


def _private_key_file(check: str, certificate: Path, private_key: Path) -> Finding:
    """The key is readable, without a pass phrase, is the certificate's, and is private."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(str(certificate), str(private_key), password=_no_pass_phrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return Finding(check, FAIL, f"{private_key} is not the private key of {certificate}",
                           "give the key the certificate was issued for (or the certificate of this key)")
        return _unreadable(check, private_key, exc)
    except (OSError, ValueError) as exc:
        return _unreadable(check, private_key, exc)
    mode = stat.S_IMODE(private_key.stat().st_mode)
    if mode & 0o077:
        return Finding(check, WARN, f"{private_key} can be read by other users (mode {mode:04o})",
                       f"run `chmod 600 {private_key}`")
    return Finding(check, OK, f"{private_key} matches {certificate.name}")


def _no_pass_phrase() -> str:
    raise ValueError("the private key is protected by a pass phrase (the service starts unattended)")


def _unreadable(check: str, path: Path, exc: Exception) -> Finding:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return Finding(check, FAIL, f"cannot use {path}: {reason}",
                   "check the path, that it is PEM, and that the service's user can read it")


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _expiries(path: Path) -> list[float]:
    """When each certificate in a PEM file runs out (seconds since the epoch)."""
    blocks = _PEM_CERTIFICATE.findall(path.read_bytes())
    if not blocks:
        raise ValueError("no PEM certificate in it")
    # The standard library decodes a certificate's dates only from a file of its own.
    decode = ssl._ssl._test_decode_cert  # type: ignore[attr-defined]
    expiries: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        one = Path(folder) / "certificate.pem"
        for block in blocks:
            one.write_bytes(block + b"\n")
            try:
                expiries.append(ssl.cert_time_to_seconds(decode(str(one))["notAfter"]))
            except ssl.SSLError as exc:
                raise ValueError(f"a certificate in it cannot be read ({exc.reason or exc})") from None
    return expiries


# --- models ------------------------------------------------------------------------------------

def models(settings: Settings, console: Console | None) -> Iterator[Finding]:
    """Each model a rule names: its package loads and ONNX Runtime makes a session, on the
    providers it actually got."""
    from .inference import PROVIDER_NAMES, OrtSessions, unusable_reason
    from .manifest import PackageError, load_package
    names = list(dict.fromkeys(model for rule in settings.rules for model in rule.models))
    if not names:
        yield Finding("models", WARN, "no rule names a model: nothing received will be processed",
                      "add [[rules]] to the configuration")
        return
    sessions = OrtSessions(settings.inference.runtime_options())
    preferred = settings.inference.providers[0]
    for name in names:
        check = f"model {name}"
        try:
            with _progress(console, f"loading model {name}"):
                package = load_package(settings.models.path, name)
                model = sessions.get(package, settings.inference.precision)
        except PackageError as exc:
            yield Finding(check, FAIL, str(exc), f"build it (`machaon models build {name}`) or correct "
                          "models.path or the rule")
            continue
        got = ", ".join(p.removesuffix("ExecutionProvider") for p in model.providers)
        version = f"version {package.manifest.version} ({settings.inference.precision})"
        if PROVIDER_NAMES[preferred] in model.providers:
            yield Finding(check, OK, f"{version} runs on {got}")
            continue
        runs = "running on CPU" if model.providers == [PROVIDER_NAMES["cpu"]] else f"runs on {got}"
        why = (unusable_reason(preferred) or "").strip().splitlines()
        yield Finding(check, WARN, f"{version} {runs}: {preferred} is not available here"
                      + (f" ({why[0]})" if why else ""),
                      f"install what {preferred} needs (the GPU's driver and CUDA libraries), or list "
                      "the providers this machine has in inference.providers")


# --- destinations ------------------------------------------------------------------------------

def destinations(settings: Settings, console: Console | None) -> Iterator[Finding]:
    for name, destination in settings.destinations.items():
        with _progress(console, f"trying destination {name}"):
            if isinstance(destination, DicomDestination):
                yield _c_echo(name, destination, settings.dicom.ae_title)
            elif isinstance(destination, DicomWebDestination):
                yield _qido_ping(name, destination)
            elif isinstance(destination, FolderDestination):
                yield _folder(name, destination)


def _c_echo(name: str, destination: DicomDestination, calling_ae: str) -> Finding:
    """A C-ECHO as `machaon echo NAME` sends it: the dispatcher's client, TLS included."""
    from .senders import SendError
    from .senders.dicom import DicomClient
    client = DicomClient.of(destination, calling_ae)
    check = f"destination {name}"
    fix = (f"check destinations.{name} (ae_title, host, port) and that the PACS knows the AE title "
           f"{calling_ae}; `machaon echo {name}` tries again")
    started = time.monotonic()
    try:
        with client.association([(VERIFICATION, None)]) as assoc:
            status = assoc.send_c_echo()
    except SendError as exc:
        return Finding(check, FAIL, str(exc), fix)
    ms = (time.monotonic() - started) * 1000
    if status and status.Status == 0:
        return Finding(check, OK, f"C-ECHO to {client.where}: success ({ms:.0f} ms)")
    answer = f"status 0x{status.Status:04X}" if status else "no answer"
    return Finding(check, FAIL, f"C-ECHO to {client.where} failed: {answer}", fix)


def _qido_ping(name: str, destination: DicomWebDestination) -> Finding:
    """GET {url}/studies?limit=1 (QIDO-RS) as the sender's session would make it: its
    authentication and timeouts, tried once."""
    import requests

    from .senders.dicomweb import StowRsSender, session_without_retries
    check = f"destination {name}"
    url = f"{destination.url.rstrip('/')}/studies"
    started = time.monotonic()
    with session_without_retries() as session:
        if destination.username:
            session.auth = (destination.username, destination.password or "")
        try:
            response = session.get(url, params={"limit": 1}, headers={"Accept": "application/dicom+json"},
                                   timeout=(destination.connect_timeout, destination.timeout))
        except requests.RequestException as exc:
            why = StowRsSender(destination, calling_ae="").why(exc)
            return Finding(check, FAIL, f"QIDO-RS {url}: {why}",
                           f"check destinations.{name}.url and that the server is running")
    ms = (time.monotonic() - started) * 1000
    if response.status_code in (200, 204):
        return Finding(check, OK, f"QIDO-RS {url}: HTTP {response.status_code} ({ms:.0f} ms)")
    fix = {401: f"check destinations.{name}.username and password",
           403: f"give the user of destinations.{name} access to the DICOMweb service",
           404: f"destinations.{name}.url must be the DICOMweb root (e.g. http://pacs:8042/dicom-web)"}
    return Finding(check, FAIL, f"QIDO-RS {url}: HTTP {response.status_code} {response.reason}",
                   fix.get(response.status_code, "see the server's log for why it refused"))


def _folder(name: str, destination: FolderDestination) -> Finding:
    check = f"destination {name}"
    folder = destination.path.absolute()
    if folder.exists():
        return _writable(check, folder)
    existing = _nearest_existing(folder)
    if os.access(existing, os.W_OK | os.X_OK):
        return Finding(check, OK, f"{folder} will be created at the first delivery")
    return Finding(check, FAIL, f"{folder} does not exist, and {existing} is not writable",
                   f"create it for the service's user (`mkdir -p {folder}`), or correct "
                   f"destinations.{name}.path")


# --- output ------------------------------------------------------------------------------------

_STYLE = {OK: "[green]OK[/]", WARN: "[yellow]WARN[/]", FAIL: "[bold red]FAIL[/]"}


def _print(findings: list[Finding], wide: bool, console: Console) -> None:
    columns = [Column("Check"), Column("Status"), Column("Detail", cut=True), Column("Fix", cut=True)]
    rows = [[escape(f.check), _STYLE[f.status], escape(f.detail), escape(f.fix or "")] for f in findings]
    cut = print_table(console, columns, rows, wide)
    problems = [f for f in findings if f.status != OK]
    if cut and problems:  # what is wrong and what to do, whole, on as many lines as it takes
        console.print()
        for f in problems:
            console.print(f"{_STYLE[f.status]} {escape(f.check)}: {escape(f.detail)}", soft_wrap=True)
            console.print(f"  fix: {escape(f.fix or '')}", soft_wrap=True)
    failed, warned = (sum(f.status == s for f in findings) for s in (FAIL, WARN))
    console.print(f"\n{failed} failed, {warned} warning(s), {len(findings) - failed - warned} OK")
