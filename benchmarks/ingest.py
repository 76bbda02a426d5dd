"""Ingest throughput: machaon against DCMTK's storescp, same data, same run.

A 300-slice 512x512 16-bit CT is sent by DCMTK's storescu (TCP_NODELAY=1) over
one association, and over 4 parallel associations (storescp with --fork), to
each receiver in turn, alternating, several rounds. machaon fsyncs every file
and commits every row before it answers; storescp does neither. A third
receiver, pynetdicom with a handler that keeps nothing (noop_scp.py), shows
the ceiling of the network layer machaon is built on. With --tls, machaon is also
measured over DICOM TLS (storescu +tls, TLS 1.2 or later, client certificates).

    .venv/bin/python -m benchmarks.ingest [--rounds 3] [--slices 300] [--tls]
        [--database postgresql+psycopg://...]

Prints images/s per receiver and case, and the ratios machaon / storescp and
machaon over TLS / machaon; writes the same as JSON to benchmarks/out/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from tests.dicomgen import write_ct_series
from tests.harness import free_port, make_certificates

HERE = Path(__file__).parent

MACHAON = str(Path(sys.executable).with_name("machaon"))
ENV = {**os.environ, "TCP_NODELAY": "1"}


def wait_listening(port: int, proc: subprocess.Popen) -> None:
    import socket
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("receiver did not start listening")


@contextmanager
def storescp(workdir: Path, parallel: bool):
    port = free_port()
    out = workdir / "storescp"
    out.mkdir()
    cmd = ["storescp", *(["--fork"] if parallel else []), "-od", str(out), str(port)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def pynetdicom_noop(workdir: Path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "noop_scp.py"), str(port)], cwd=workdir)
    try:
        wait_listening(port, proc)
        yield port
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def machaon(workdir: Path, database: str | None, certs: Path | None = None):
    """machaon serve; with `certs`, listening over DICOM TLS (the port yielded) too."""
    port = free_port()
    url = database or f"sqlite:///{workdir}/machaon.db"
    env = {**ENV, "MACHAON_DATABASE_URL": url, "MACHAON_DICOM_HOST": "127.0.0.1",
           "MACHAON_DICOM_PORT": str(port), "MACHAON_SPOOL_PATH": str(workdir / "spool"),
           "MACHAON_SPOOL_MIN_FREE_MB": "0", "MACHAON_LOG_LEVEL": "WARNING", "MACHAON_API_ENABLED": "false",
           "MACHAON_MODELS_PATH": str(HERE.parent / "build" / "models")}
    if certs:
        port = free_port()
        env["MACHAON_DICOM_TLS"] = (f'{{port = {port}, certificate = "{certs}/pacs.crt", '
                                    f'private_key = "{certs}/pacs.key", ca_certificates = "{certs}/ca.crt"}}')
    subprocess.run([MACHAON, "db", "upgrade"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([MACHAON, "serve"], env=env, cwd=workdir)
    try:
        wait_listening(port, proc)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def receiving(receiver: str, workdir: Path, parallel: bool, database: str | None, certs: Path):
    if receiver == "storescp":
        return storescp(workdir, parallel)
    if receiver == "machaon":
        return machaon(workdir, database)
    if receiver == "machaon-tls":
        return machaon(workdir, database, certs)
    return pynetdicom_noop(workdir)


def send(port: int, files: list[Path], associations: int, tls: tuple[str, ...] = ()) -> float:
    """Seconds from the first association to the last response."""
    groups = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    senders = [subprocess.Popen(["/usr/bin/storescu", *tls, "-aec", "MACHAON", "127.0.0.1", str(port),
                                 *map(str, g)], env=ENV, stderr=subprocess.PIPE, text=True) for g in groups]
    for s in senders:
        _, err = s.communicate()
        if s.returncode != 0:
            raise RuntimeError(f"storescu failed: {err}")
    return time.perf_counter() - start


def reset_database(url: str) -> None:
    """A PostgreSQL database given on the command line is emptied between rounds."""
    import sqlalchemy
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE studies, series, instances, jobs, results, events CASCADE")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--database", help="job store URL for machaon (default: SQLite in a temp folder)")
    parser.add_argument("--tls", action="store_true", help="also machaon over DICOM TLS")
    args = parser.parse_args()
    certs = make_certificates(HERE / "out" / "certs")
    client = ("+tls", str(certs / "machaon.key"), str(certs / "machaon.crt"), "+cf", str(certs / "ca.crt"))

    data = HERE / "out" / f"ct{args.slices}"
    if not (data.is_dir() and len(list(data.glob("*.dcm"))) == args.slices):
        shutil.rmtree(data, ignore_errors=True)
        write_ct_series(data, slices=args.slices, size=512, seed=1)
    files = sorted(data.glob("*.dcm"))

    results: dict[str, dict[str, list[float]]] = {}
    for case, associations in (("1 association", 1), ("4 associations", 4)):
        receivers = ["storescp", "machaon", "pynetdicom-noop", *(["machaon-tls"] if args.tls else [])]
        times = results.setdefault(case, {r: [] for r in receivers})
        for round_ in range(args.rounds):
            order = list(times) if round_ % 2 == 0 else list(reversed(times))
            for receiver in order:
                with tempfile.TemporaryDirectory(dir=HERE / "out") as tmp:
                    workdir = Path(tmp)
                    if receiver.startswith("machaon") and args.database:
                        reset_database(args.database)
                    with receiving(receiver, workdir, associations > 1, args.database, certs) as port:
                        tls = client if receiver == "machaon-tls" else ()
                        times[receiver].append(send(port, files, associations, tls))
            print(f"{case}, round {round_ + 1}: " + ", ".join(
                f"{r} {len(files) / t[-1]:.0f} images/s" for r, t in times.items()), flush=True)

    summary = {}
    print(f"\n{len(files)} CT slices, 512x512x16 bit, median of {args.rounds} rounds")
    print(f"{'case':<16}{'storescp':>10}{'machaon':>10}{'noop':>10}"
          f"{'machaon/storescp':>18}{'noop/storescp':>15}   (images/s)")
    for case, times in results.items():
        rate = {r: len(files) / statistics.median(t) for r, t in times.items()}
        ratio, ceiling = rate["machaon"] / rate["storescp"], rate["pynetdicom-noop"] / rate["storescp"]
        summary[case] = {**{f"{r}_images_per_s": round(v, 1) for r, v in rate.items()},
                         "ratio": round(ratio, 3), "pynetdicom_noop_ratio": round(ceiling, 3)}
        tls = ""
        if "machaon-tls" in rate:
            summary[case]["tls_ratio"] = round(rate["machaon-tls"] / rate["machaon"], 3)
            tls = (f"   machaon over TLS {rate['machaon-tls']:.0f} images/s, "
                   f"{summary[case]['tls_ratio']:.2f}x plain")
        print(f"{case:<16}{rate['storescp']:>10.0f}{rate['machaon']:>10.0f}{rate['pynetdicom-noop']:>10.0f}"
              f"{ratio:>18.2f}{ceiling:>15.2f}{tls}")
    (HERE / "out" / "ingest.json").write_text(json.dumps(
        {"slices": len(files), "rounds": args.rounds, "database": args.database or "sqlite", **summary},
        indent=2))


if __name__ == "__main__":
    main()
