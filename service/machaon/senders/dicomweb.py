"""DICOMweb destinations: results stored by STOW-RS at a PACS's DICOMweb root."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from .base import DestinationSettings, Outcomes, Outgoing, SendError


class DicomWebDestination(DestinationSettings):
    """A DICOMweb server (a PACS's /dicom-web root) that receives results by STOW-RS."""

    type: Literal["dicomweb"]
    url: str = Field(pattern=r"^https?://")
    username: str | None = None  # HTTP basic authentication, if the server asks for it
    password: str | None = None
    timeout: float = Field(30, gt=0)


class StowRsSender:
    """One STOW-RS request per result, over one HTTP session. Each request is tried once, its
    connection and each read bounded by the destination's timeout: retrying is the dispatcher's
    job, with its backoff, so a server that is down costs one bounded attempt."""

    def __init__(self, destination: DicomWebDestination, *, calling_ae: str):
        self.destination = destination

    def send(self, results: Sequence[Outgoing]) -> Outcomes:
        import requests
        from dicomweb_client.api import DICOMwebClient

        url = self.destination.url
        session = requests.Session()
        if self.destination.username:
            session.auth = (self.destination.username, self.destination.password or "")
        try:
            client = DICOMwebClient(url, session=session, timeout=self.destination.timeout)
        except ValueError as exc:  # a URL the client cannot take apart
            raise SendError(f"{url}: {exc}") from None
        client.set_http_retry_params(retry=False)  # else up to 5 tries, with waits, per request
        with session:
            for result in results:
                ds = result.dataset
                try:
                    response = client.store_instances([ds])
                except requests.HTTPError as exc:  # an answer: this result is refused, others may not be
                    answer = exc.response
                    code = f"HTTP {answer.status_code} {answer.reason}" if answer is not None else str(exc)
                    yield SendError(f"{url}: STOW-RS of {ds.SOPInstanceUID} answered {code}")
                    continue
                except requests.Timeout:
                    raise SendError(f"{url}: STOW-RS of {ds.SOPInstanceUID} failed: no answer within "
                                    f"{self.destination.timeout:g} s") from None
                except requests.ConnectionError as exc:
                    raise SendError(f"{url}: STOW-RS of {ds.SOPInstanceUID} failed: could not connect "
                                    f"({_os_reason(exc)}): is the DICOMweb server running at that "
                                    "address?") from None
                except (requests.RequestException, ValueError) as exc:
                    raise SendError(f"{url}: STOW-RS of {ds.SOPInstanceUID} failed: {exc}") from None
                failed = response.get("FailedSOPSequence") if response is not None else None
                if failed:
                    reason = failed[0].get("FailureReason", "no reason given")
                    yield SendError(f"{url}: STOW-RS refused {ds.SOPInstanceUID} (failure reason {reason})")
                else:
                    yield None


def _os_reason(exc: BaseException) -> str:
    """The operating system's word for a failed connection ("Connection refused"), found in the
    chain of exceptions requests and urllib3 wrap it in; else the exception's own text."""
    seen: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if any(current is s for s in seen) or len(seen) > 20:
            continue
        seen.append(current)
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        pending += [e for e in (getattr(current, "reason", None), current.__cause__, current.__context__,
                                *current.args) if isinstance(e, BaseException)]
    return str(exc)
