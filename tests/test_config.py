"""Configuration: every mistake stops start-up with one message naming the key and its source."""

from __future__ import annotations

import socket

import pytest
from machaon.cli import EXIT_CONFIG
from machaon.config import ConfigError, load_settings

from tests.harness import free_port, run_machaon


def write(tmp_path, text: str):
    path = tmp_path / "machaon.toml"
    path.write_text(text)
    return path


def test_embedded_default_is_the_documented_one():
    settings = load_settings(environ={})
    assert settings.dicom.ae_title == "MACHAON"
    assert settings.dicom.port == 11112
    assert settings.database.url == "sqlite:///var/machaon.db"
    assert str(settings.spool.path) == "var/spool"
    assert settings.completion.complete_after == 5


def test_file_values_and_environment_overrides(tmp_path):
    path = write(tmp_path, '[dicom]\nport = 104\nae_title = "PACSNODE"\n')
    settings = load_settings(path, environ={
        "MACHAON_DICOM_PORT": "4242",
        "MACHAON_DICOM_ALLOWED_CALLING_AETS": '["CT1", "MR1"]',
        "MACHAON_DATABASE_URL": "postgresql+psycopg://machaon@db:5432/machaon",
    })
    assert settings.dicom.port == 4242
    assert settings.dicom.ae_title == "PACSNODE"
    assert settings.dicom.allowed_calling_aets == ["CT1", "MR1"]
    assert settings.database.url.startswith("postgresql+psycopg://")


@pytest.mark.parametrize("text, env, expected", [
    ('[dicom]\nprot = 104\n', {}, "dicom.prot (set in {file}): unknown key"),
    ('[dicom]\nport = "many"\n', {}, "dicom.port (set in {file}): Input should be a valid integer"),
    ('[dicom]\nport = 70000\n', {}, "dicom.port (set in {file}): Input should be less than or equal to 65535"),
    ('[dicom]\nae_title = "A-VERY-LONG-AE-TITLE"\n', {}, "dicom.ae_title (set in {file}): Value error, an AE title is 1 to 16"),
    ('[dicomm]\nport = 104\n', {}, "dicomm (set in {file}): unknown key"),
    ('[database]\nurl = "mysql://x"\n', {}, "database.url (set in {file}): Value error, use sqlite:///PATH"),
    ('', {"MACHAON_DICOM_PORT": "abc"}, "dicom.port (set in environment variable MACHAON_DICOM_PORT)"),
    ('', {"MACHAON_SPOOL_MIN_FREE": "1"}, "spool.min_free (set in environment variable MACHAON_SPOOL_MIN_FREE): unknown key"),
    ('', {"MACHAON_NOSUCH_THING": "1"}, "environment variable MACHAON_NOSUCH_THING is not a setting"),
    ('[dicom\nport = 1\n', {}, "{file} is not valid TOML"),
])
def test_mistakes_name_the_key_and_where_it_was_set(tmp_path, text, env, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ=env)
    assert expected.format(file=path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"configuration file {tmp_path}/nope.toml does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


# --- start-up refuses, with exit status 78 (EX_CONFIG), before accepting anything ---

def start_refused(tmp_path, text: str, env: dict | None = None) -> str:
    config = write(tmp_path, text)
    proc = run_machaon("serve", config=config, env=env, timeout=30)
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert proc.stderr.count("\n") == 1, f"expected one line, got: {proc.stderr}"
    return proc.stderr.replace(str(config), "FILE")


def migrated_sqlite(tmp_path) -> str:
    url = f"sqlite:///{tmp_path}/m.db"
    run_machaon("db", "upgrade", env={"MACHAON_DATABASE_URL": url}, check=True)
    return url


def test_port_in_use_is_refused(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        message = start_refused(tmp_path, f'[dicom]\nhost = "127.0.0.1"\nport = {port}\n'
                                f'[spool]\npath = "{tmp_path}/spool"\n'
                                f'[database]\nurl = "{migrated_sqlite(tmp_path)}"\n')
    assert f"dicom.port (set in FILE): 127.0.0.1:{port} is already in use" in message


def test_unwritable_spool_is_refused(tmp_path):
    # root may write anywhere, so the spool is put under a regular file instead
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    message = start_refused(tmp_path, f'[dicom]\nport = {free_port()}\n'
                            f'[spool]\npath = "{not_a_dir}/spool"\n'
                            f'[database]\nurl = "{migrated_sqlite(tmp_path)}"\n')
    assert "spool.path (set in FILE):" in message and "is not writable" in message


def test_unreachable_database_is_refused(tmp_path):
    url = f"postgresql+psycopg://machaon@127.0.0.1:{free_port()}/machaon"
    message = start_refused(tmp_path, f'[dicom]\nport = {free_port()}\n[spool]\npath = "{tmp_path}/s"\n',
                            env={"MACHAON_DATABASE_URL": url})
    assert "database.url (set in environment variable MACHAON_DATABASE_URL): cannot use the database" in message


def test_database_without_schema_asks_for_upgrade(tmp_path):
    (tmp_path / "empty.db").touch()  # a database file, but no tables in it
    message = start_refused(tmp_path, f'[dicom]\nport = {free_port()}\n[spool]\npath = "{tmp_path}/s"\n'
                            f'[database]\nurl = "sqlite:///{tmp_path}/empty.db"\n')
    assert "database.url (set in FILE): the database has no machaon tables: run `machaon db upgrade`" in message


def test_shipped_examples_are_valid(tmp_path):
    from pathlib import Path
    examples = sorted((Path(__file__).parents[1] / "config" / "examples").glob("*.toml"))
    assert examples
    for example in examples:
        load_settings(example, environ={})


def test_serve_before_db_upgrade_says_so_and_leaves_no_empty_database_behind(tmp_path):
    database = tmp_path / "var" / "machaon.db"
    message = start_refused(tmp_path, f'[dicom]\nport = {free_port()}\n[spool]\npath = "{tmp_path}/s"\n'
                            f'[database]\nurl = "sqlite:///{database}"\n')
    assert f"there is no job store at {database}: create it with `machaon db upgrade`" in message
    assert not database.exists()
