"""The REST API, as a script or a dashboard would use it: over HTTP, against a real `machaon serve`,
with tokens made by `machaon tokens create`; failed jobs retried through it reach a real Orthanc."""

from __future__ import annotations

import re
import shutil
import socket
import sqlite3

import pydicom
import requests
from machaon.tools import phantom
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import RLELossless

from tests.harness import RULES, Server, acknowledged, run_machaon, storescu

GETS = ["/api/v1/studies", "/api/v1/jobs", "/api/v1/deliveries", "/api/v1/events", "/api/v1/models",
        "/api/v1/summary"]


class Api:
    """HTTP calls to one server's API, with a token or without."""

    def __init__(self, server: Server, token: str | None = None):
        self.url = server.api_url
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str, **params) -> requests.Response:
        return self.http.get(self.url + path, params=params, timeout=30)

    def post(self, path: str, body: dict | None = None) -> requests.Response:
        return self.http.post(self.url + path, json=body, timeout=60)


def token(server: Server, name: str, role: str) -> str:
    return server.machaon("tokens", "create", name, "--role", role).stdout.strip()


def error_of(response: requests.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


def test_reading_needs_a_token_and_acting_an_operators_token(serve):
    server = serve()
    operator, viewer = token(server, "alice", "operator"), token(server, "bob", "viewer")

    for who in (Api(server), Api(server, "mch_not-a-token-anyone-was-given")):
        response = who.get("/api/v1/jobs")
        assert "machaon tokens create" in error_of(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    assert "operator token" in error_of(Api(server, viewer).post("/api/v1/jobs/retry"), 403)

    for path in GETS:
        for who in (viewer, operator):
            response = Api(server, who).get(path)
            assert response.status_code == 200, (path, response.text)
    assert Api(server, viewer).get("/api/v1/summary").json()["jobs"]["failed"] == 0
    # The page's cookie is a token for reading; never for acting, which a form posted from another
    # page of the same site (another port of this host) would do with it.
    cookie = requests.get(f"{server.api_url}/api/v1/events", cookies={"machaon_token": viewer}, timeout=30)
    assert {e["action"] for e in cookie.json()} == {"token.created"}
    forged = requests.post(f"{server.api_url}/api/v1/jobs/retry", cookies={"machaon_token": operator},
                           headers={"Origin": "http://127.0.0.1:8042"}, timeout=30)
    assert "machaon tokens create" in error_of(forged, 401)

    reader = Api(server, viewer)
    assert "1.2.3.4" in error_of(reader.get("/api/v1/studies/1.2.3.4"), 404)
    assert "no job 999" in error_of(reader.get("/api/v1/jobs/999"), 404)
    assert "no job 999" in error_of(Api(server, operator).post("/api/v1/jobs/999/retry"), 404)
    assert "since" in error_of(reader.get("/api/v1/jobs", since="yesterday-ish"), 400)
    assert "job_id" in error_of(reader.get("/api/v1/jobs/first"), 422)
    assert "nonsense" in error_of(Api(server, operator).post("/api/v1/jobs/retry", {"nonsense": 1}), 422)

    # Only a hash of each token is kept: no column holds the token itself.
    with sqlite3.connect(server.workdir / "machaon.db") as database:
        rows = database.execute("SELECT * FROM api_tokens").fetchall()
    assert len(rows) == 2
    assert not [value for row in rows for value in row for t in (operator, viewer) if t in str(value)]

    server.machaon("tokens", "revoke", "bob")
    assert "revoked" in error_of(reader.get("/api/v1/jobs"), 401)


def test_reading_without_a_token_where_configured_but_never_acting(serve):
    server = serve(api={"read_requires_token": False})
    assert Api(server).get("/api/v1/studies").json() == []
    assert "machaon tokens create" in error_of(Api(server).post("/api/v1/jobs/retry"), 401)


def test_health_readiness_metrics_and_docs_need_no_token(serve):
    server = serve()
    anyone = Api(server)
    assert anyone.get("/healthz").json() == {"status": "ok"}
    ready = anyone.get("/readyz")
    assert ready.status_code == 200 and ready.json()["failed"] == []
    assert set(ready.json()["checks"]) == {"store", "spool", "dicom_listener"}

    # Where received images land becomes unusable (a file where the folder was; root could
    # still write to a read-only folder): not ready, and why.
    incoming = server.spool / "incoming"
    shutil.move(incoming, server.workdir / "incoming.moved")
    incoming.write_text("not a folder")
    try:
        response = anyone.get("/readyz")
        assert response.status_code == 503
        assert response.json()["failed"] == ["spool"]
        assert "incoming is not writable" in response.json()["checks"]["spool"]["problem"]
    finally:
        incoming.unlink()
        shutil.move(server.workdir / "incoming.moved", incoming)
    assert anyone.get("/readyz").status_code == 200

    metrics = anyone.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "/api/v1/jobs/{job_id}/retry" in anyone.get("/api/openapi.json").json()["paths"]
    docs = anyone.get("/api/docs")
    assert docs.status_code == 200 and "https://" not in docs.text  # no CDN: hospital networks are closed
    for script in re.findall(r'(?:src|href)="(/static/[^"]+)"', docs.text):
        assert anyone.get(script).status_code == 200, script


def test_an_api_port_in_use_stops_start_up_naming_the_key(tmp_path):
    server = Server(tmp_path, f"sqlite:///{tmp_path}/machaon.db", {})
    server.machaon("db", "upgrade")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.api_port))
        taken.listen()
        # Waited for (its holder may be on its way out), then given up on: exit 75, which systemd restarts.
        started = run_machaon("serve", config=server.config, env={"MACHAON_SERVICE_STARTUP_WAIT": "0"})
    assert started.returncode == 75, started.stderr
    assert "api.port" in started.stderr and "already in use" in started.stderr
    assert "listening as" not in started.stderr  # stopped before any image could be accepted


def _corrupt_one_frame(study) -> tuple[str, pydicom.Dataset]:
    """Slice 4 of the study RLE-compressed with its frame cut short, as a broken encoder would leave
    it; returns its SOP Instance UID and the good dataset."""
    path = study.sax_files[3]
    good = pydicom.dcmread(path)
    bad = pydicom.dcmread(path)
    bad.compress(RLELossless, generate_instance_uid=False)  # the same instance, badly encoded
    frame = get_frame(bad.PixelData, 0, number_of_frames=1)
    bad.PixelData = encapsulate([frame[: len(frame) // 3]])
    bad.save_as(path)
    return good.SOPInstanceUID, good


def test_a_failed_job_retried_through_the_api_succeeds_and_its_results_reach_orthanc_once(
        serve, built_models, orthanc, tmp_path):
    orthanc.start()
    study = phantom.write_study(tmp_path / "study", seed=61, views=False, patient_id="API-1")
    sop_uid, good = _corrupt_one_frame(study)
    setup = RULES.format(destination="pacs") + (
        f'[destinations.pacs]\ntype = "dicom"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        f"port = {orthanc.dicom_port}\ntimeout = 10\n")
    # The study completes only when the operator says so: a fixed image sent later reopens it,
    # and no new completion plans a job that would do the retry's work.
    server = serve(models={"path": str(built_models)}, completion={"complete_after": 3600},
                   dispatch={"check_every": 0.5}, extra=setup)
    operator = Api(server, token(server, "alice", "operator"))
    assert acknowledged(storescu(server.port, *study.sax_files, extra=("-xr",)).stderr) == phantom.SAX_SLICES
    assert operator.post(f"/api/v1/studies/{study.study_uid}/complete").status_code == 200

    failed = server.wait_for(lambda: operator.get("/api/v1/jobs", status="failed", study=study.study_uid).json(),
                             timeout=60, what="the job to fail")
    [job] = failed
    assert "cannot decode its pixel data" in job["error"] and sop_uid in job["error"], job["error"]
    assert job["patient_id"] == "API-1" and job["model"] == "lv-segmentation"
    assert [s["study_uid"] for s in operator.get("/api/v1/studies", q="API-1").json()] == [study.study_uid]
    assert operator.get(f"/api/v1/studies/{study.study_uid}").json()["jobs"][0]["status"] == "failed"

    # The sender sends the image again, whole, under the same SOP Instance UID; the job runs again.
    fixed = tmp_path / "fixed.dcm"
    good.save_as(fixed)
    assert acknowledged(storescu(server.port, fixed).stderr) == 1
    assert operator.post(f"/api/v1/jobs/{job['id']}/retry").json() == {"retried": [job["id"]]}
    done = server.wait_for(lambda: (j := operator.get(f"/api/v1/jobs/{job['id']}").json())["status"]
                           not in ("queued", "running") and j, timeout=60, what="the retried job to finish")
    assert done["status"] == "succeeded", done["error"]
    assert sorted(r["kind"] for r in done["results"]) == ["seg", "sr"]
    assert [e["actor"] for e in done["history"] if e["action"] == "job.retried"] == ["api:alice"]

    def sent():
        rows = [d for d in operator.get("/api/v1/deliveries", destination="pacs").json()
                if d["study_uid"] == study.study_uid]
        return rows if len(rows) == 2 and all(d["status"] == "sent" for d in rows) else None
    server.wait_for(sent, timeout=60, what="the results sent to Orthanc")
    events = operator.get("/api/v1/events", study=study.study_uid, actor="dispatcher").json()
    assert len([e for e in events if e["action"] == "result.sent"]) == 2  # each result once
    instances = orthanc.get(f"/dicom-web/studies/{study.study_uid}/instances")
    assert sorted(i["00080060"]["Value"][0] for i in instances) == ["SEG", "SR"]

    # A job that succeeded cannot be retried; its study can be reprocessed.
    assert "succeeded" in error_of(operator.post(f"/api/v1/jobs/{job['id']}/retry"), 409)
    lv = next(m for m in operator.get("/api/v1/models").json() if m["name"] == "lv-segmentation")
    assert lv["rules"] == ["lv"] and "CPUExecutionProvider" in lv["providers"]
    assert operator.get("/api/v1/summary").json()["jobs"]["succeeded"] == 1


def test_a_queued_job_cannot_be_retried_but_can_be_cancelled(serve, built_models, tmp_path):
    # No worker threads: the study's job stays queued.
    study = phantom.write_study(tmp_path / "study", seed=62, views=False)
    setup = RULES.format(destination="out") + f'[destinations.out]\ntype = "folder"\npath = "{tmp_path / "out"}"\n'
    server = serve(models={"path": str(built_models)}, worker={"threads": 0}, extra=setup)
    operator = Api(server, token(server, "alice", "operator"))
    assert acknowledged(storescu(server.port, *study.sax_files).stderr) == phantom.SAX_SLICES
    [job] = server.wait_for(lambda: operator.get("/api/v1/jobs", status="queued").json(), what="a queued job")

    assert "queued" in error_of(operator.post(f"/api/v1/jobs/{job['id']}/retry"), 409)
    assert operator.post(f"/api/v1/jobs/{job['id']}/cancel").json() == {"cancelled": [job["id"]]}
    assert operator.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert "already complete" in error_of(operator.post(f"/api/v1/studies/{study.study_uid}/complete"), 409)
    reprocessed = operator.post(f"/api/v1/studies/{study.study_uid}/reprocess", {"model": "lv-segmentation"})
    assert reprocessed.status_code == 200 and len(reprocessed.json()["jobs"]) == 1
    actions = [(e["actor"], e["action"]) for e in operator.get("/api/v1/events", study=study.study_uid).json()]
    assert ("api:alice", "job.cancelled") in actions and ("api:alice", "study.reprocessed") in actions
