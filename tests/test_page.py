"""The web page, in a real browser (Debian's chromium driven by Playwright) against a real
`machaon serve`: an operator signs in, sees a job that failed on a corrupt image and why, sends the
image again, retries the job and sees it succeed; finds the study by accession number and reads
its timeline; a viewer sees the actions disabled; a wrong token and a form from another site are
refused. Each page is saved as a screenshot (under the test's tmp path and build/test-artefacts/)."""

from __future__ import annotations

import re
import shutil
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from machaon.tools import phantom
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import RLELossless

from tests.harness import REPO, RULES, acknowledged, finished, jobs_of, storescu

CHROMIUM = Path("/usr/bin/chromium")
ARTEFACTS = REPO / "build" / "test-artefacts" / "page"
REASON = "cannot decode its pixel data (RLE Lossless)"
# The page's first contentful paint in ms (the entry may be recorded just after the load event).
FIRST_PAINT = """new Promise(resolve => {
    const paint = () => performance.getEntriesByName('first-contentful-paint')[0];
    if (paint()) return resolve(paint().startTime);
    new PerformanceObserver(() => paint() && resolve(paint().startTime)).observe({type: 'paint', buffered: true});
    setTimeout(() => resolve(null), 5000);
})"""


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"the web page tests drive Debian's chromium, and {CHROMIUM} is missing: "
                    "apt-get install chromium (.ci/install does); Playwright's own browser download "
                    "is not used", pytrace=False)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def shoot(tmp_path):
    """page, name -> a full-page screenshot in the tmp path and in build/test-artefacts/page/."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    ARTEFACTS.mkdir(parents=True, exist_ok=True)

    def shot(page, name: str) -> Path:
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        shutil.copyfile(path, ARTEFACTS / path.name)
        return path
    return shot


def _corrupt_copy(source: Path, target: Path) -> Path:
    """The same image (same SOP Instance UID) RLE-compressed with its frame cut short, as a
    broken encoder would leave it."""
    ds = pydicom.dcmread(source)
    ds.compress(RLELossless, generate_instance_uid=False)
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    ds.save_as(target)
    return target


def _wait_for_api(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _sign_in(page, url: str, token: str) -> None:
    page.goto(url + "/")
    assert "/signin" in page.url  # every page sends a browser without a valid token here
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(url + "/")


def test_an_operator_retries_a_failed_job_and_follows_its_study(serve, built_models, orthanc, browser, shoot,
                                                               tmp_path):
    from playwright.sync_api import expect

    study = phantom.write_study(tmp_path / "study", seed=51, views=False)
    good = study.sax_files[4]
    bad = _corrupt_copy(good, tmp_path / "corrupt.dcm")
    orthanc.start()
    pacs = (f'[destinations.pacs]\ntype = "dicom"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
            f'port = {orthanc.dicom_port}\ntimeout = 5\n')
    server = serve(models={"path": str(built_models)}, extra=RULES.format(destination="pacs") + pacs)
    url = server.api_url
    _wait_for_api(url)
    operator = server.machaon("tokens", "create", "alice", "--role", "operator").stdout.strip()
    viewer = server.machaon("tokens", "create", "victor", "--role", "viewer").stdout.strip()

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    # A wrong token is refused, saying what to do.
    page.goto(url + "/jobs?status=failed")
    assert page.url.startswith(url + "/signin")
    shoot(page, "signin")
    page.get_by_label("Token").fill("mch_not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("That token is not valid")
    shoot(page, "signin-refused")

    _sign_in(page, url, operator)
    first_paint = page.evaluate(FIRST_PAINT)
    print(f"dashboard first contentful paint: {first_paint:.0f} ms" if first_paint is not None
          else "dashboard first contentful paint: not reported")
    expect(page.get_by_text("Signed in as alice")).to_be_visible()
    expect(page.get_by_text("No job has failed")).to_be_visible()

    # The study arrives with one image corrupt: the failed job shows up on the dashboard by itself
    # (it refreshes every few seconds), with its reason and its study.
    files = [f for f in study.sax_files if f != good] + [bad]
    assert acknowledged(storescu(server.port, *files, extra=("-xr",)).stderr) == len(files)
    row = page.locator("section[aria-labelledby=failed] tbody tr", has_text="PH51")
    expect(row).to_contain_text(REASON, timeout=60_000)
    expect(row).to_contain_text("lv-segmentation")
    expect(row).to_contain_text("PHANTOM-51")
    expect(row).to_contain_text("Cardiac MR phantom (synthetic)")
    [failed_job] = finished(server, study.study_uid)
    assert failed_job["status"] == "failed"
    job_id = failed_job["id"]
    expect(page.locator(f"#job-{job_id}")).to_be_visible()
    shoot(page, "dashboard")

    # A viewer sees the same, with the actions disabled and a tooltip saying why.
    viewing = browser.new_page(viewport={"width": 1280, "height": 900})
    _sign_in(viewing, url, viewer)
    retry = viewing.locator(f"#job-{job_id}").get_by_role("button", name="Retry")
    expect(retry).to_be_disabled()
    expect(retry).to_have_attribute("title", re.compile(r"viewer's.*operator token.*machaon tokens create"))
    expect(viewing.get_by_text("You can look but not act")).to_be_visible()
    shoot(viewing, "dashboard-viewer")
    # ... and a form forced through anyway is refused.
    status = viewing.evaluate(f"fetch('/jobs/{job_id}/retry', {{method: 'POST'}}).then(r => r.status)")
    assert status == 403
    # A form on another site cannot retry the job in the operator's name.
    page.goto(f"data:text/html,<form method=post action='{url}/jobs/{job_id}/retry'></form>"
              "<script>document.forms[0].submit()</script>")
    expect(page.get_by_role("alert")).to_contain_text("not sent from machaon's own page")
    assert jobs_of(server, study.study_uid)[0]["status"] == "failed"

    # The cause fixed: the image sent again, whole, under its SOP Instance UID. The study is
    # complete again and its new job succeeds by itself; the failed one waits for the operator.
    assert acknowledged(storescu(server.port, good).stderr) == 1
    finished(server, study.study_uid, count=2)
    page.goto(url + "/")
    page.locator(f"#job-{job_id}").get_by_role("button", name="Retry").click()
    expect(page.get_by_role("status")).to_contain_text(f"Job {job_id} is queued again")
    shoot(page, "retried")

    # The study, found by its accession number: its jobs, timeline and results.
    page.get_by_role("link", name="Studies").click()
    page.get_by_label("Patient ID, accession number, study date or Study Instance UID").fill("PH51")
    page.get_by_role("button", name="Search").click()
    page.get_by_role("link", name="Cardiac MR phantom (synthetic)").click()
    heading = page.get_by_role("heading", name=f"Job {job_id}: lv-segmentation")
    for _ in range(60):  # the retried job runs in turn: reload until it has finished
        if "succeeded" in heading.inner_text():
            break
        time.sleep(1)
        page.reload()
    expect(heading).to_contain_text("succeeded")
    timeline = page.locator("table.timeline")
    for words in ("First image received", "Complete: 1 series, 12 images", f"Job {job_id} (lv-segmentation) failed",
                  "More images arrived", f"Job {job_id} (lv-segmentation) queued again (it was failed)",
                  f"Job {job_id} (lv-segmentation) succeeded", "SEG sent to pacs", "SR sent to pacs"):
        expect(timeline).to_contain_text(words)
    expect(timeline).to_contain_text("api:alice")
    expect(page.locator("ol.milestones")).not_to_contain_text("not yet")
    shoot(page, "study")
    page.get_by_role("heading", name=f"Job {job_id}: lv-segmentation").get_by_role("link").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(f"Job {job_id}: lv-segmentation succeeded")
    expect(page.locator("table.timeline")).to_contain_text("queued again (it was failed)")
    shoot(page, "job")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download SEG").first.click()
    seg = pydicom.dcmread(download.value.path())
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == study.study_uid

    page.get_by_role("link", name="Models").click()
    expect(page.get_by_role("row", name="lv-segmentation")).to_contain_text("CPUExecutionProvider")
    shoot(page, "models")

    page.get_by_role("button", name="Sign out").click()
    page.goto(url + "/")
    assert "/signin" in page.url
    # The PACS holds the study's results once, though two jobs made them.
    assert len(orthanc.get(f"/dicom-web/studies/{study.study_uid}/instances")) == 2
