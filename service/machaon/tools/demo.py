"""`machaon demo`: the whole job on one machine, with a phantom study.

It starts `machaon serve` on the configuration given (by default the embedded
one: SQLite, lv-segmentation, a results folder), sends a synthetic cardiac MR
study to it by a real C-STORE association, waits for the job that study's
completion gets, prints where the SEG and SR are, and keeps serving until Ctrl-C.
`--send-only AET@HOST:PORT` sends the phantom study to any DICOM node and exits.
The phantom is the same study each time (a fixed seed), so a second run waits for
the jobs of its own, newer completion, not the finished ones of the first run.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from rich.console import Console

from ..config import Settings
from . import phantom

SEED = 2026


def send(files: list[Path], aet: str, host: str, port: int, calling_ae: str) -> tuple[int, list[str]]:
    """C-STORE `files` over one association; (how many were acknowledged, the failures)."""
    import pydicom

    from ..senders import SendError
    from ..senders.dicom import DicomClient

    datasets = [pydicom.dcmread(f) for f in files]
    # Each file in its own transfer syntax, so that it is sent as written, not converted.
    contexts = sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets})
    client = DicomClient(aet, host, port, calling_ae=calling_ae, timeout=30)
    stored, failures = 0, []
    try:
        with client.association([(sop_class, [syntax]) for sop_class, syntax in contexts]) as assoc:
            try:
                for failure in client.c_store(assoc, datasets):
                    if failure:
                        failures.append(str(failure))
                    else:
                        stored += 1
            except SendError as exc:  # the association was lost
                failures.append(str(exc))
    except SendError as exc:
        failures.append(f"no association: {exc}")
    return stored, failures


def phantom_study(folder: Path) -> phantom.PhantomStudy:
    return phantom.write_study(folder, seed=SEED)


def send_only(target: str, calling_ae: str, console: Console) -> int:
    match = re.fullmatch(r"([^@]{1,16})@(.+):(\d{1,5})", target)
    if not match:
        console.print(f"{target!r} is not AET@HOST:PORT")
        return 2
    study = phantom_study(Path("var/demo"))
    files = study.sax_files + list(study.view_files.values())
    stored, failures = send(files, match[1], match[2], int(match[3]), calling_ae)
    console.print(f"sent the phantom study {study.study_uid}: {stored} of {len(files)} images stored")
    for failure in failures:
        console.print(f"  {failure}")
    return 0 if not failures else 1


def run_demo(settings: Settings, console: Console, stopping, calling_ae: str = "DEMO") -> None:
    """Called once `machaon serve` is listening: send the phantom study and report its jobs."""
    from ..operations import NotFound, show_study
    from ..startup import open_store
    from ..store import DeliveryStatus, JobStatus

    def shown_or_none(session, study_uid: str) -> dict | None:
        try:
            return show_study(session, study_uid)
        except NotFound:
            return None

    study = phantom_study(Path("var/demo"))
    files = study.sax_files + list(study.view_files.values())
    host = "127.0.0.1" if settings.dicom.host in ("0.0.0.0", "") else settings.dicom.host
    store = open_store(settings)
    try:
        # Completions of this study before the send (an earlier demo's): their jobs are not ours.
        with store.read_session() as session:
            before = (shown_or_none(session, study.study_uid) or {"completion_count": 0})["completion_count"]
        stored, failures = send(files, settings.dicom.ae_title, host, settings.dicom.port, calling_ae)
        console.print(f"[bold]demo:[/] sent phantom study {study.study_uid} ({stored} of {len(files)} images "
                      f"stored) from {calling_ae} to {settings.dicom.ae_title}@{host}:{settings.dicom.port}")
        if failures:
            console.print(f"demo: not stored: {'; '.join(failures)}")
            return
        console.print(f"demo: waiting {settings.completion.complete_after:g} s of quiet for the study "
                      "to complete, then for its job...")
        deadline = time.monotonic() + settings.completion.complete_after + 300
        while time.monotonic() < deadline and not stopping.is_set():
            with store.read_session() as session:
                shown = shown_or_none(session, study.study_uid)
            # The jobs of the completion our images caused: a later generation than any before.
            jobs = [j for j in shown["jobs"] if j["generation"] > before] if shown else []
            results = [r for j in jobs for r in j["results"]]
            if jobs and all(JobStatus(j["status"]).finished for j in jobs) and all(
                    d["status"] == DeliveryStatus.SENT for r in results for d in r["deliveries"]):
                _report(console, settings, jobs, study)
                return
            time.sleep(0.5)
        console.print("demo: no outcome yet; `machaon studies show "
                      f"{study.study_uid}` shows where the study is")
    finally:
        store.dispose()


def _volumes(path: Path) -> list[str]:
    """The volumes an SR reports, as text ("LV cavity volume: 93.4 ml")."""
    import highdicom as hd

    content = hd.sr.srread(path).content  # a TID 1500 measurement report: machaon wrote it
    assert isinstance(content, hd.sr.MeasurementReport)
    return [f"{group.tracking_identifier}: {m.value} {m.unit.value}"
            for group in content.get_volumetric_roi_measurement_groups()
            for m in group.get_measurements()]


def _report(console: Console, settings: Settings, jobs: list[dict], study: phantom.PhantomStudy) -> None:
    for job in jobs:
        console.print(f"demo: job {job['id']} ({job['model']}): [bold]{job['status']}[/]"
                      + (f": {job['error']}" if job["error"] else ""))
        for result in job["results"]:
            for delivery in result["deliveries"]:
                destination = settings.destinations[delivery["destination"]]
                where = getattr(destination, "path", None)
                name = f"{result['sop_instance_uid']}.dcm"
                place = (Path(where) / study.study_uid / result["series_uid"] / name
                         if where else delivery["destination"])
                console.print(f"  {result['kind'].upper()}: {place}")
                if result["kind"] == "sr" and where:
                    for volume in _volumes(place):
                        console.print(f"    {volume}")
    console.print(f"demo: the phantom's true LV cavity volume is {study.cavity_volume_ml:.1f} ml. "
                  f"machaon keeps running for your own studies (AE {settings.dicom.ae_title}, "
                  f"port {settings.dicom.port}); Ctrl-C stops it.")
    if settings.api.enabled:
        console.print(f"demo: the web page is at http://{settings.api.host}:{settings.api.port}/ ; sign in "
                      "with a token from `machaon tokens create YOUR-NAME --role operator`")
