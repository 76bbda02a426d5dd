"""Typed settings from a TOML file, overridable by MACHAON_* environment variables.

Every mistake becomes one ConfigError whose message names the key and where
the value came from (the file, or the environment variable), so an operator
can fix it without reading a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.uid import AllTransferSyntaxes, ExplicitVRBigEndian

from .rules import Rule
from .senders import Destination
from .senders.base import Table
from .senders.dicom import AETitle

ENV_PREFIX = "MACHAON_"
# Variables with the prefix that are not settings.
ENV_NOT_SETTINGS = {"MACHAON_CONFIG"}


# The password of a URL in a message (postgresql+psycopg://user:PASSWORD@host/db).
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/:@\s]*:)[^@\s]+@", re.IGNORECASE)
# A key whose value is never printed: its last part holds one of these words (private_key, api_token).
SECRET_WORDS = frozenset({"password", "passphrase", "secret", "key", "token"})


def redact(text: str) -> str:
    """`text` without the passwords of the URLs in it."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def is_secret(key: str) -> bool:
    """Whether the value of `key` ("destinations.pacs.password") must never be printed."""
    return bool(SECRET_WORDS & set(key.rpartition(".")[2].lower().split("_")))


class ConfigError(Exception):
    """A configuration mistake that stops start-up; the message says what to fix."""

    def __init__(self, message: str):
        super().__init__(redact(message))


class Unavailable(Exception):
    """Something start-up needs is not there yet (the database, a port still held by a process on
    its way out): tried again for service.startup_wait seconds, then the process exits 75
    (EX_TEMPFAIL), which systemd restarts. The message says what is missing and what to check."""

    def __init__(self, message: str):
        super().__init__(redact(message))


# The transfer syntaxes the listener accepts: every one pydicom knows, each kept as received
# (nothing is decoded at ingest), but the retired Explicit VR Big Endian.
TRANSFER_SYNTAXES = tuple(ts for ts in AllTransferSyntaxes if ts != ExplicitVRBigEndian)
_TRANSFER_SYNTAX_KEYWORDS = {ts.keyword: ts for ts in TRANSFER_SYNTAXES}


def _check_transfer_syntax(value: str) -> str:
    uid = _TRANSFER_SYNTAX_KEYWORDS.get(value, value)
    if uid not in TRANSFER_SYNTAXES:
        raise ValueError(f"{value!r} is not a transfer syntax machaon accepts: use a pydicom keyword "
                         "(ExplicitVRLittleEndian, JPEG2000Lossless, ...) or its UID")
    return str(uid)


TransferSyntax = Annotated[str, AfterValidator(_check_transfer_syntax)]


def _check_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or network (10.1.2.3, 10.1.2.0/24, ::1)") from None
    return value


Network = Annotated[str, AfterValidator(_check_network)]


class SenderSettings(Table):
    """What machaon expects of one sender (by calling AE title): the addresses it may call from
    (as Orthanc's DicomCheckModalityHost), and machaon's order of transfer syntaxes where the
    sender's own order is not to be trusted (it proposes a syntax it cannot always deliver)."""

    hosts: list[Network] = []  # empty: any address
    transfer_syntaxes: list[TransferSyntax] = []  # machaon's order, as UIDs; empty: the sender's

    def allows(self, address: str) -> bool:
        if not self.hosts:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:  # a dual-stack listener's IPv4 peer
            ip = ip.ipv4_mapped
        return any(ip in ipaddress.ip_network(host, strict=False) for host in self.hosts)


class DicomTlsSettings(Table):
    """DICOM TLS on a port of its own (PS3.15 B.1: TLS 1.2 or later)."""

    port: int = Field(2762, ge=1, le=65535)
    certificate: Path  # PEM, with any intermediate certificates after it
    private_key: Path  # PEM, unencrypted: the service starts unattended
    ca_certificates: Path | None = None  # PEM bundle that client certificates must chain to
    require_client_certificate: bool = True
    plain: bool = True  # also listen without TLS on dicom.port

    @model_validator(mode="after")
    def _ca_for_clients(self):
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates (the CA that signs "
                             "the senders' certificates), or set it to false")
        return self


class DicomSettings(Table):
    ae_title: AETitle = "MACHAON"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_aets: list[AETitle] = []
    max_associations: int = Field(10, ge=1)  # established at once
    max_connections: int = Field(64, ge=1)  # open at once, in any state
    max_connections_per_host: int = Field(10, ge=1)
    max_pdu_size: int = Field(262144, ge=4096, le=16 * 1024 * 1024)
    max_inflated_mb: int = Field(1024, ge=1)
    acse_timeout: float = Field(5, gt=0)
    network_timeout: float = Field(60, gt=0)
    shutdown_grace: float = Field(30, ge=0)
    senders: dict[AETitle, SenderSettings] = {}  # [dicom.senders.<calling AE title>]
    tls: DicomTlsSettings | None = None  # [dicom.tls]

    @model_validator(mode="after")
    def _connections_hold_associations(self):
        if self.max_connections < self.max_associations:
            raise ValueError(f"max_connections ({self.max_connections}) must be at least "
                             f"max_associations ({self.max_associations})")
        return self


class SpoolSettings(Table):
    path: Path = Path("var/spool")
    min_free_mb: int = Field(1024, ge=0)
    # Retention (retention.py): the files of a study whose jobs all finished and whose results were
    # all delivered are removed this many days after its last activity; 0 keeps them for ever.
    keep_days: int = Field(14, ge=0)
    # Below this much free space (MiB) such studies are removed oldest first, whatever their age,
    # until it is free again; 0: never. About 2 x min_free_mb makes room before C-STOREs are refused.
    emergency_free_mb: int = Field(0, ge=0)


class DatabaseSettings(Table):
    url: str = "sqlite:///var/machaon.db"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^(sqlite|postgresql(\+psycopg)?)://", value):
            raise ValueError(
                "use sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB"
            )
        return value


class CompletionSettings(Table):
    complete_after: float = Field(5, gt=0)
    force_complete_after: float = Field(3600, gt=0)
    check_every: float = Field(1, gt=0)


class ModelSettings(Table):
    path: Path = Path("build/models")  # built packages; `machaon models build` writes here


class InferenceSettings(Table):
    providers: list[Literal["tensorrt", "cuda", "cpu"]] = Field(["tensorrt", "cuda", "cpu"], min_length=1)
    intra_op_threads: int = Field(0, ge=0)
    inter_op_threads: int = Field(0, ge=0)
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    tensorrt_cache: Path = Path("var/tensorrt-cache")

    @field_validator("providers")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each provider once")
        return value

    def runtime_options(self):
        from .inference import RuntimeOptions
        return RuntimeOptions(tuple(self.providers), self.intra_op_threads, self.inter_op_threads,
                              self.tensorrt_cache)


class WorkerSettings(Table):
    threads: int = Field(1, ge=0)  # jobs run at once in this process; 0 runs none
    batch_size: int = Field(8, ge=1)  # slices per ONNX Runtime call
    lease: float = Field(300, gt=0)  # seconds a job is ours without renewal
    # Copies of one image in a series (the same position and time under two SOP Instance UIDs):
    # "newest" keeps the copy received last and names the others; "fail" fails the job.
    duplicates: Literal["newest", "fail"] = "newest"
    # A job that fails for a reason that may pass (the spool or the store briefly unavailable, an
    # ONNX Runtime error), or whose worker stopped while running it, runs at most this many times;
    # the backoff between attempts doubles from retry_initial up to retry_max seconds.
    max_attempts: int = Field(3, ge=1)
    retry_initial: float = Field(30, gt=0)
    retry_max: float = Field(600, gt=0)


class DispatchSettings(Table):
    check_every: float = Field(2, gt=0)
    retry_initial: float = Field(10, gt=0)  # seconds before the first retry; doubles each time
    retry_max: float = Field(600, gt=0)


class ApiSettings(Table):
    """The REST API, web page and metrics that `machaon serve` (or `machaon api`) serves."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # false: reading (lists, the page, not actions) needs no token, e.g. behind a proxy that signs in.
    read_requires_token: bool = True


class ServiceSettings(Table):
    """`machaon serve`, `machaon worker` and `machaon api` as long-running services."""

    # Seconds start-up waits for what may come by itself (the database starting up, a port still
    # held by a process on its way out) before it exits 75, which systemd restarts.
    startup_wait: float = Field(60, ge=0)


class LogSettings(Table):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Patient names and IDs in log lines (Phi values); false logs UIDs, AE titles and counts only.
    phi: bool = False


class Settings(Table):
    dicom: DicomSettings = DicomSettings()
    spool: SpoolSettings = SpoolSettings()
    database: DatabaseSettings = DatabaseSettings()
    completion: CompletionSettings = CompletionSettings()
    models: ModelSettings = ModelSettings()
    inference: InferenceSettings = InferenceSettings()
    rules: list[Rule] = []
    destinations: dict[str, Destination] = {}  # [destinations.NAME]: a type in senders.TYPES
    worker: WorkerSettings = WorkerSettings()
    dispatch: DispatchSettings = DispatchSettings()
    api: ApiSettings = ApiSettings()
    service: ServiceSettings = ServiceSettings()
    log: LogSettings = LogSettings()

    # Where each key's value came from ("dicom.port" -> "/etc/machaon.toml"),
    # for error messages raised after validation (port in use, ...).
    sources: dict[str, str] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="after")
    def _rules_name_known_destinations(self):
        for i, rule in enumerate(self.rules):
            unknown = [d for d in rule.destinations if d not in self.destinations]
            if unknown:
                known = ", ".join(sorted(self.destinations)) or "none"
                raise ValueError(f"rules.{i}.destinations: {', '.join(unknown)} is not a configured "
                                 f"destination ([destinations.NAME]; configured: {known})")
        return self

    def source_of(self, key: str) -> str:
        """Where `key` was set; for a key inside a table (destinations.pacs.tls), where its table was."""
        return _source(self.sources, key) or "the built-in default"

    def error(self, key: str, problem: str) -> ConfigError:
        """A ConfigError about `key` (e.g. "dicom.port"), naming where it was set."""
        return ConfigError(f"{key} (set in {self.source_of(key)}): {problem}")

    def unavailable(self, key: str, problem: str) -> Unavailable:
        """An Unavailable about what `key` names (the database, a port), naming where it was set."""
        return Unavailable(f"{key} (set in {self.source_of(key)}): {problem}")


def embedded_config_path() -> Path:
    return Path(str(resources.files("machaon.defaults") / "machaon.toml"))


def load_settings(path: Path | str | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read `path` (default: $MACHAON_CONFIG, else the embedded default), apply
    MACHAON_<SECTION>_<KEY> overrides, and validate."""
    environ = dict(os.environ if environ is None else environ)
    path = Path(path or environ.get("MACHAON_CONFIG") or embedded_config_path())
    data = _read_toml(path)
    sources = {f"{section}.{key}": str(path)
               for section, values in data.items() if isinstance(values, dict)
               for key in values}
    # [[rules]]: each table of an array of tables, by its index.
    sources.update((f"{section}.{i}", str(path))
                   for section, values in data.items() if isinstance(values, list)
                   for i in range(len(values)))
    for var, raw in sorted(environ.items()):
        if var.startswith(ENV_PREFIX) and var not in ENV_NOT_SETTINGS:
            section, key = _env_key(var, path)
            data.setdefault(section, {})[key] = _env_value(raw)
            sources[f"{section}.{key}"] = f"environment variable {var}"
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, data, sources, path)) from None
    settings.sources = sources
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None


def _env_key(var: str, path: Path) -> tuple[str, str]:
    """MACHAON_DICOM_MAX_ASSOCIATIONS -> ("dicom", "max_associations")."""
    section, _, key = var[len(ENV_PREFIX):].lower().partition("_")
    sections = Settings.model_fields.keys() - {"sources"}
    if section not in sections or not key:
        raise ConfigError(
            f"environment variable {var} is not a setting: use MACHAON_<SECTION>_<KEY> "
            f"with a section among {', '.join(sorted(sections))} (as in {path})"
        )
    return section, key


def _env_value(raw: str) -> Any:
    """Numbers, booleans and lists are written in TOML syntax; anything else is a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _source(sources: dict[str, str], key: str) -> str | None:
    """Where `key` or the table holding it was set; None where neither was."""
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return None


def _describe(exc: ValidationError, data: dict[str, Any], sources: dict[str, str], path: Path) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(_key_parts(err["loc"], data))
        problem = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        across = re.fullmatch(r"Value error, ([\w.-]+): (.*)", problem, re.DOTALL)
        if not key and across:  # a check across tables (Settings' validators) names its key first
            key, problem = across.groups()
        lines.append(f"{key} (set in {_source(sources, key) or path}): {problem}{_input_shown(key, err)}")
    return "; ".join(lines)


def _key_parts(loc: tuple, data: Any) -> list[str]:
    """The error's location as the file spells it: pydantic puts the tag of a tagged union (the
    `type` of a [destinations.NAME] table) in the location, where the file has no such key."""
    parts, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue
        parts.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return parts


def _input_shown(key: str, err) -> str:
    """The wrong value, where it helps and is no secret: never a secret key's value, nor a whole
    table (its keys are named; its values may hold a password)."""
    value = err.get("input")
    if err["type"] in ("extra_forbidden", "missing") or is_secret(key):
        return ""
    if isinstance(value, dict) or isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return ""
    return f" (got {value!r})"
