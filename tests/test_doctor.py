"""`machaon doctor` against real peers: a migrated store, a built model, a real Orthanc over DICOM
and DICOMweb, a folder, and TLS files made with openssl."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import tomli_w

from tests.harness import free_port, run_machaon


def doctor(config: Path) -> tuple[int, dict[str, dict]]:
    """Exit status and the findings by check name, from `machaon doctor --json`."""
    proc = run_machaon("doctor", "--json", config=config)
    return proc.returncode, {row["check"]: row for row in json.loads(proc.stdout)}


def statuses(findings: dict[str, dict]) -> dict[str, str]:
    return {check: row["status"] for check, row in findings.items()}


def configuration(tmp_path: Path, migrate: bool = True, **sections) -> Path:
    """A configuration with a private spool and a SQLite store (migrated unless told not to)."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700, exist_ok=True)
    database = f"sqlite:///{tmp_path}/machaon.db"
    if migrate:
        run_machaon("db", "upgrade", env={"MACHAON_DATABASE_URL": database}, check=True)
    settings = {"spool": {"path": str(spool), "min_free_mb": 1}, "database": {"url": database},
                "inference": {"providers": ["cpu"]}, **sections}
    config = tmp_path / "machaon.toml"
    config.write_text(tomli_w.dumps(settings))
    return config


def openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


def certificate(folder: Path, name: str, days: int = 365) -> tuple[Path, Path]:
    """A self-signed certificate and its key, valid from now for `days`."""
    openssl(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.crt", "-days", str(days), "-subj", f"/CN={name}")
    (folder / f"{name}.key").chmod(0o600)
    return folder / f"{name}.crt", folder / f"{name}.key"


def expired_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate that ran out on 2 January 2020 (`openssl req -x509` cannot date
    one in the past; `openssl ca` can)."""
    (folder / "db").mkdir()
    (folder / "db" / "index.txt").touch()
    (folder / "db" / "serial").write_text("01\n")
    (folder / "ca.cnf").write_text("[ca]\ndefault_ca = test\n[test]\ndatabase = db/index.txt\n"
                                   "new_certs_dir = db\nserial = db/serial\ndefault_md = sha256\n"
                                   "policy = any\n[any]\ncommonName = supplied\n")
    openssl(folder, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
    openssl(folder, "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", f"{name}.key", "-in",
            f"{name}.csr", "-out", f"{name}.crt", "-startdate", "20200101000000Z", "-enddate", "20200102000000Z")
    (folder / f"{name}.key").chmod(0o600)
    return folder / f"{name}.crt", folder / f"{name}.key"


def test_a_working_setup_is_all_ok_and_a_pacs_gone_away_fails_with_a_fix(tmp_path, built_models, orthanc):
    orthanc.start()
    tls = tmp_path / "tls"
    tls.mkdir()
    cert, key = certificate(tls, "machaon")
    config = configuration(
        tmp_path,
        dicom={"tls": {"certificate": str(cert), "private_key": str(key), "require_client_certificate": False}},
        models={"path": str(built_models)},
        destinations={
            "pacs": {"type": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
            "web": {"type": "dicomweb", "url": f"{orthanc.url}/dicom-web"},
            "out": {"type": "folder", "path": str(tmp_path / "out")},
        },
        rules=[{"name": "lv", "models": ["lv-segmentation"], "destinations": ["pacs", "web", "out"],
                "match": {"modality": ["MR"]}}])

    code, findings = doctor(config)
    assert statuses(findings) == {
        "config": "OK", "config file": "OK", "store": "OK", "store schema": "OK", "spool": "OK",
        "spool space": "OK", "spool permissions": "OK", "tls listener cert": "OK", "tls listener key": "OK",
        "model lv-segmentation": "OK", "destination pacs": "OK", "destination web": "OK",
        "destination out": "OK"}, findings
    assert code == 0
    assert "CPU" in findings["model lv-segmentation"]["detail"]  # the provider it actually got

    orthanc.stop()
    code, findings = doctor(config)
    assert code == 1
    for name in ("pacs", "web"):
        row = findings[f"destination {name}"]
        assert row["status"] == "FAIL" and "refused" in row["detail"].lower(), row
        assert row["fix"], row
    assert findings["destination out"]["status"] == "OK"


def test_an_expired_certificate_and_a_key_that_is_not_its_own_fail(tmp_path):
    tls = tmp_path / "tls"
    tls.mkdir()
    expired, expired_key = expired_certificate(tls, "listener")
    client, _ = certificate(tls, "client")
    _, other_key = certificate(tls, "other")
    ca, _ = certificate(tls, "ca")
    config = configuration(
        tmp_path,
        dicom={"tls": {"certificate": str(expired), "private_key": str(expired_key),
                       "require_client_certificate": False}},
        destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port(),
                               "tls": {"ca_certificates": str(ca), "certificate": str(client),
                                       "private_key": str(other_key)}}})

    code, findings = doctor(config)
    assert code == 1
    assert findings["tls listener cert"]["status"] == "FAIL"
    assert "expired on 2020-01-02" in findings["tls listener cert"]["detail"]
    assert "renew" in findings["tls listener cert"]["fix"]
    assert findings["tls listener key"]["status"] == "OK"  # the expired certificate's own key
    assert findings["tls pacs CA"]["status"] == "OK"
    assert findings["tls pacs cert"]["status"] == "OK"
    mismatch = findings["tls pacs key"]
    assert mismatch["status"] == "FAIL" and "is not the private key of" in mismatch["detail"], mismatch


def test_a_store_not_migrated_names_the_command_and_an_open_spool_is_warned(tmp_path):
    config = configuration(tmp_path, migrate=False)
    sqlite3.connect(tmp_path / "machaon.db").close()  # a file, but no tables
    (tmp_path / "spool").chmod(0o755)

    code, findings = doctor(config)
    assert code == 1
    assert findings["store"]["status"] == "OK"  # reached
    schema = findings["store schema"]
    assert schema["status"] == "FAIL" and "machaon db upgrade" in schema["fix"], schema
    spool = findings["spool permissions"]
    assert spool["status"] == "WARN" and f"chmod -R go= {tmp_path / 'spool'}" in spool["fix"], spool
    assert findings["models"]["status"] == "WARN"  # no rule names a model


def test_a_configuration_error_is_one_failure_naming_the_key(tmp_path):
    config = tmp_path / "machaon.toml"
    config.write_text('[dicom]\nport = "eleven"\n')
    code, findings = doctor(config)
    assert code == 1
    assert list(findings) == ["config"]
    assert findings["config"]["status"] == "FAIL" and "dicom.port" in findings["config"]["detail"]

    table = run_machaon("doctor", config=config, env={"COLUMNS": "80"})  # the table cut, the problem whole
    assert table.returncode == 1
    assert "FAIL config: dicom.port" in table.stdout and f"fix: correct it in {config}" in table.stdout, table.stdout
