"""DICOMweb destinations: results stored by STOW-RS at a PACS's DICOMweb root."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from .base import DestinationSettings, Outcomes, Outgoing, SendError

if TYPE_CHECKING:
    import requests


class DicomWebDestination(DestinationSettings):
    """A DICOMweb server (a PACS's /dicom-web root) that receives results by STOW-RS."""

    type: Literal["dicomweb"]
    url: str = Field(pattern=r"^https?://")
    username: str | None = None  # HTTP basic authentication, if the server asks for it
    password: str | None = None
    connect_timeout: float = Field(5, gt=0)  # seconds for the TCP connection (and TLS handshake)
    timeout: float = Field(30, gt=0)  # seconds each request may wait for the server's answer


class StowRsSender:
    """One STOW-RS request per result, over one HTTP session. Each request is tried once, its
    connection bounded by the destination's connect_timeout and each wait for the server by its
    timeout: retrying is the dispatcher's job, with its backoff, so a server that is down costs one
    bounded attempt."""

    def __init__(self, destination: DicomWebDestination, *, calling_ae: str):
        self.destination = destination

    def send(self, results: Sequence[Outgoing]) -> Outcomes:
        import requests
        from dicomweb_client.api import DICOMwebClient

        url = self.destination.url
        with session_without_retries() as session:
            if self.destination.username:
                session.auth = (self.destination.username, self.destination.password or "")
            try:
                client = DICOMwebClient(url, session=session,
                                        timeout=(self.destination.connect_timeout, self.destination.timeout))
            except ValueError as exc:  # a URL the client cannot take apart
                raise SendError(f"{url}: {exc}") from None
            # Else the client tries each request up to 5 times, waiting 2 to 16 s in between (30 s
            # in all for a server that is down), whatever the exception.
            client.set_http_retry_params(retry=False)
            for result in results:
                ds = result.dataset
                try:
                    response = client.store_instances([ds])
                except requests.HTTPError as exc:  # an answer: this result is refused, others may not be
                    answer = exc.response
                    code = f"HTTP {answer.status_code} {answer.reason}" if answer is not None else str(exc)
                    yield SendError(f"{url}: STOW-RS of {ds.SOPInstanceUID} rejected: {code}")
                    continue
                except (requests.RequestException, ValueError) as exc:  # nothing more goes through now
                    raise SendError(f"{url}: STOW-RS of {ds.SOPInstanceUID} failed: "
                                    f"{self.why(exc)}") from None
                failed = response.get("FailedSOPSequence") if response is not None else None
                if failed:
                    reason = failed[0].get("FailureReason", "no reason given")
                    yield SendError(f"{url}: STOW-RS rejected {ds.SOPInstanceUID} (failure reason {reason})")
                else:
                    yield None

    def why(self, exc: Exception) -> str:
        """What went wrong with a request, in words an operator can act on."""
        import requests

        destination = self.destination
        if isinstance(exc, requests.exceptions.SSLError):
            return (f"TLS failed ({_os_reason(exc)}): does the system (or REQUESTS_CA_BUNDLE) trust the "
                    "server's certificate, and does it name the host in the url?")
        if isinstance(exc, requests.ConnectTimeout):
            return (f"could not connect: timed out after {destination.connect_timeout:g} s (no TCP "
                    "connection): is the server running at that address, and does a firewall let us through?")
        if isinstance(exc, requests.Timeout) or _timed_out(exc):  # a read, or a write of the request
            return (f"timed out: no answer within {destination.timeout:g} s (the server took the connection: "
                    "is it hung or overloaded?)")
        if isinstance(exc, requests.ConnectionError):
            return f"could not connect ({_os_reason(exc)}): is the DICOMweb server running at that address?"
        return str(exc)


def session_without_retries() -> requests.Session:
    """A requests session that tries each request once (urllib3 would otherwise retry as its
    adapter is told)."""
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, HTTPAdapter(max_retries=0))
    return session


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions requests and urllib3 wrapped in it, outermost first."""
    seen: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending and len(seen) < 20:
        current = pending.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        pending += [e for e in (getattr(current, "reason", None), current.__cause__, current.__context__,
                                *current.args) if isinstance(e, BaseException)]
    return seen


def _timed_out(exc: BaseException) -> bool:
    return any(isinstance(e, TimeoutError) for e in _chain(exc))


def _os_reason(exc: BaseException) -> str:
    """The operating system's (or OpenSSL's) word for a failed connection ("Connection refused"),
    found in the chain of exceptions; else the exception's own text."""
    for current in _chain(exc):
        untrusted = getattr(current, "verify_message", None)  # a certificate not trusted, and why
        if untrusted:
            return f"certificate not trusted: {untrusted}"
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        reason = getattr(current, "reason", None)
        if isinstance(reason, str) and reason:
            return reason
    return str(exc)
