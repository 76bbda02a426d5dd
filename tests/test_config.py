"""Configuration: every mistake stops start-up with one message naming the key and its source."""

from __future__ import annotations

import os
import socket

import pytest
from machaon.cli import EXIT_CONFIG, EXIT_UNAVAILABLE
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


def start_given_up(tmp_path, text: str, env: dict | None = None) -> str:
    """`machaon serve` that waited for something that may come by itself, and exited 75: its last
    line, which says what was missing."""
    config = write(tmp_path, text)
    proc = run_machaon("serve", config=config, env=env, timeout=60)
    assert proc.returncode == EXIT_UNAVAILABLE, proc.stderr
    assert "trying again in" in proc.stderr  # each retry logged, with the time left
    return proc.stderr.strip().splitlines()[-1].replace(str(config), "FILE")


def migrated_sqlite(tmp_path) -> str:
    url = f"sqlite:///{tmp_path}/m.db"
    run_machaon("db", "upgrade", env={"MACHAON_DATABASE_URL": url}, check=True)
    return url


def test_a_port_in_use_for_longer_than_startup_wait_exits_75(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        message = start_given_up(tmp_path, f'[dicom]\nhost = "127.0.0.1"\nport = {port}\n'
                                 f'[spool]\npath = "{tmp_path}/spool"\n'
                                 f'[database]\nurl = "{migrated_sqlite(tmp_path)}"\n'
                                 '[api]\nenabled = false\n[service]\nstartup_wait = 2\n')
    assert f"machaon: not available: dicom.port (set in FILE): 127.0.0.1:{port} is already in use" in message
    assert "(waited service.startup_wait = 2 s)" in message


def test_unwritable_spool_is_refused(tmp_path):
    # root may write anywhere, so the spool is put under a regular file instead
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    message = start_refused(tmp_path, f'[dicom]\nport = {free_port()}\n'
                            f'[spool]\npath = "{not_a_dir}/spool"\n'
                            f'[database]\nurl = "{migrated_sqlite(tmp_path)}"\n')
    assert "spool.path (set in FILE):" in message and "is not writable" in message


def test_an_unreachable_database_is_waited_for_then_exits_75(tmp_path):
    port = free_port()
    url = f"postgresql+psycopg://machaon@127.0.0.1:{port}/machaon"
    message = start_given_up(tmp_path, f'[dicom]\nport = {free_port()}\n[spool]\npath = "{tmp_path}/s"\n',
                             env={"MACHAON_DATABASE_URL": url, "MACHAON_SERVICE_STARTUP_WAIT": "1"})
    assert (f"database.url (set in environment variable MACHAON_DATABASE_URL): the database at 127.0.0.1:{port} "
            "is not available") in message
    assert "Connection refused" in message and "check that it is running and reachable from here" in message


@pytest.mark.postgres
def test_a_database_that_answers_no_is_a_configuration_error(tmp_path, postgres_url):
    url = postgres_url.replace("postgres@", "nosuchrole@", 1)
    message = start_refused(tmp_path, f'[dicom]\nport = {free_port()}\n[spool]\npath = "{tmp_path}/s"\n',
                            env={"MACHAON_DATABASE_URL": url})
    assert 'cannot use the database: connection to server at "127.0.0.1", port 5432 failed' in message
    assert 'role "nosuchrole" does not exist' in message


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


# --- secrets: never printed, and kept from other users ---

SECRET = "hunter2-do-not-print"


def with_password(tmp_path, mistakes: str) -> str:
    return (f'[dicom]\nport = {free_port()}\n[spool]\npath = "{tmp_path}/s"\n'
            f'[destinations.pacs]\ntype = "dicomweb"\nurl = "http://127.0.0.1:1/dicom-web"\n'
            f'username = "machaon"\npassword = "{SECRET}"\n' + mistakes)


@pytest.mark.parametrize("mistakes, expected", [
    # a wrong value in the destination's table, named without the table's type
    ('timeout = -1\n', "destinations.pacs.timeout (set in FILE): Input should be greater than 0 (got -1)"),
    # a check of the whole table, which pydantic reports with the table as its input
    ('type2 = 1\n', "destinations.pacs.type2 (set in FILE): unknown key"),
    # a check across tables, named by its key
    ('[[rules]]\nname = "x"\nmodels = ["m"]\ndestinations = ["nope"]\n',
     "rules.0.destinations (set in FILE): nope is not a configured destination"),
])
def test_a_configuration_error_never_prints_a_password(tmp_path, mistakes, expected):
    config = write(tmp_path, with_password(tmp_path, mistakes))
    os.chmod(config, 0o600)
    for command in (("serve",), ("worker",), ("jobs", "list"), ("rules", "test", str(tmp_path))):
        proc = run_machaon(*command, config=config, timeout=30)
        assert proc.returncode == EXIT_CONFIG, proc.stderr
        assert SECRET not in proc.stdout + proc.stderr
        assert expected in proc.stderr.replace(str(config), "FILE")


def test_a_wrong_password_value_is_not_echoed(tmp_path):
    config = write(tmp_path, with_password(tmp_path, "").replace(f'"{SECRET}"', f'["{SECRET}"]'))
    with pytest.raises(ConfigError) as err:
        load_settings(config, environ={})
    assert "destinations.pacs.password" in str(err.value) and SECRET not in str(err.value)
    url = f"postgresql+psycopg://machaon:{SECRET}@db/machaon"
    with pytest.raises(ConfigError) as err:
        load_settings(config, environ={"MACHAON_DATABASE_URL": url, "MACHAON_DICOM_PORT": "x"})
    assert SECRET not in str(err.value)


def test_a_mistake_in_a_rule_names_the_file_it_is_in(tmp_path):
    message = start_refused(tmp_path, f'[dicom]\nport = {free_port()}\n[spool]\npath = "{tmp_path}/s"\n'
                            f'[models]\npath = "{tmp_path}/models"\n'
                            '[[rules]]\nname = "x"\nmodels = ["not-built"]\n')
    assert "rules.0.models (set in FILE):" in message and "built-in default" not in message


def test_a_configuration_file_with_a_password_must_be_private(tmp_path):
    # The job store is missing: a service that gets past the file's check stops there.
    config = write(tmp_path, with_password(tmp_path, f'[database]\nurl = "sqlite:///{tmp_path}/none.db"\n'))
    os.chmod(config, 0o644)
    for command in ("serve", "worker"):
        proc = run_machaon(command, config=config, timeout=30)
        assert proc.returncode == EXIT_CONFIG, proc.stderr
        assert (f"destinations.pacs.password (set in {config}): {config} holds a password and other users "
                f"can read it (mode 0644): run `chmod 600 {config}`") in proc.stderr
        assert SECRET not in proc.stderr
    os.chmod(config, 0o640)
    if os.geteuid() == 0:  # only root can give the file to another group
        os.chown(config, -1, 4242)
        assert "holds a password" in run_machaon("serve", config=config, timeout=30).stderr
        os.chown(config, -1, os.getegid())  # the service's own group may read it (root:machaon 0640)
    proc = run_machaon("serve", config=config, timeout=30)
    assert proc.returncode == EXIT_CONFIG and "there is no job store" in proc.stderr
    os.chmod(config, 0o600)
    assert "there is no job store" in run_machaon("serve", config=config, timeout=30).stderr
    # A command that is not a service reads it as it is.
    os.chmod(config, 0o644)
    assert "holds a password" not in run_machaon("jobs", "list", config=config, timeout=30).stderr


def test_a_database_password_in_a_readable_file_is_refused_but_not_in_the_environment(tmp_path):
    url = f"postgresql+psycopg://machaon:{SECRET}@127.0.0.1:{free_port()}/machaon"
    config = write(tmp_path, f'[spool]\npath = "{tmp_path}/s"\n[database]\nurl = "{url}"\n')
    os.chmod(config, 0o644)
    proc = run_machaon("serve", config=config, timeout=30)
    assert proc.returncode == EXIT_CONFIG and f"database.url (set in {config}): {config} holds a password" \
        in proc.stderr
    assert SECRET not in proc.stderr
    config.write_text(f'[spool]\npath = "{tmp_path}/s"\n[service]\nstartup_wait = 0\n')
    proc = run_machaon("serve", config=config, env={"MACHAON_DATABASE_URL": url}, timeout=30)
    assert proc.returncode == EXIT_UNAVAILABLE, proc.stderr  # past the check: the database is not there
    assert SECRET not in proc.stderr
