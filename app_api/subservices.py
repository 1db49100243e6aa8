"""The App API's client of the sub-service APIs (AudioGen, MusicGen) over HTTP."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from core_base.contracts import GenerateBatchResult, GenerateRequest, TaskResult
from core_base.domain import Kind
from core_base.errors import SettingsError, UnavailableError
from core_base.http.client import HttpClient, HttpError, HttpResponse
from core_base.services import service_spec
from core_base.settings import AppSettings


def api_url_setting(kind: Kind) -> str:
    """The variable naming where the sub-service of ``kind`` is reached, after its
    service's prefix: ``AUDIO_GEN_API_URL`` for sound."""
    try:
        spec = service_spec(kind)
    except KeyError:
        raise SettingsError(
            f"kind {kind.value!r} has no generation service (core_base/services.py)"
        ) from None
    return f"{spec.env_prefix}API_URL"


def api_url_for(settings: AppSettings, kind: Kind) -> str:
    """Where the App API reaches the sub-service that serves ``kind``."""
    url: str = getattr(settings, api_url_setting(kind).lower())
    return url.rstrip("/")


def check_every_kind_is_reachable(settings: AppSettings) -> None:
    """Every kind a call may ask for has a sub-service and a URL setting: checked
    at start-up, since a kind without one was accepted, then never handed on."""
    for kind in Kind:
        name = api_url_setting(kind)
        if not hasattr(settings, name.lower()):
            raise SettingsError(
                f"{name}: not a setting of the App API (AppSettings has no"
                f" {name.lower()}), so {kind.value} tasks could not be handed on"
            )


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"  # the sub-service refused the task: retrying cannot help
    RETRY = "retry"  # unreachable, overloaded or broken right now


@dataclass(frozen=True)
class SubmitResult:
    outcome: Outcome
    reason: str = ""


class SubServices:
    """``POST /v1/generate``, ``GET /v1/tasks/{id}`` and ``/healthz`` of each kind's API."""

    def __init__(self, http: HttpClient, settings: AppSettings, internal_token: str) -> None:
        check_every_kind_is_reachable(settings)
        self._http = http
        self._settings = settings
        self._headers = {"Authorization": f"Bearer {internal_token}"}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}

    def url(self, kind: Kind) -> str:
        """Where ``kind``'s sub-service API is reached (for log lines)."""
        return api_url_for(self._settings, kind)

    async def submit(self, kind: Kind, request: GenerateRequest) -> SubmitResult:
        """``POST /v1/generate``: one task."""
        url = f"{api_url_for(self._settings, kind)}/v1/generate"
        try:
            response = await self._http.post(
                url, content=request.model_dump_json().encode(), headers=self._json_headers
            )
        except HttpError as exc:
            return SubmitResult(Outcome.RETRY, f"unreachable ({exc})")
        if response.status_code in (200, 201, 202):
            return SubmitResult(Outcome.ACCEPTED)
        return _refusal(response.status_code, response.reason_given())

    async def submit_many(
        self, kind: Kind, requests: Sequence[GenerateRequest]
    ) -> list[SubmitResult]:
        """``POST /v1/generate/batch``: a result per task, in order. A sub-service
        without the batch route (an older version during a rolling upgrade) gets
        the tasks one by one."""
        url = f"{api_url_for(self._settings, kind)}/v1/generate/batch"
        body = b'{"tasks":[' + b",".join(r.model_dump_json().encode() for r in requests) + b"]}"
        try:
            response = await self._http.post(url, content=body, headers=self._json_headers)
        except HttpError as exc:
            unreachable = SubmitResult(Outcome.RETRY, f"unreachable ({exc})")
            return [unreachable] * len(requests)
        if response.status_code in (404, 405):
            return list(await asyncio.gather(*(self.submit(kind, r) for r in requests)))
        if response.status_code != 200:
            return [_refusal(response.status_code, response.reason_given())] * len(requests)
        try:
            results = GenerateBatchResult.model_validate_json(response.content).results
        except ValidationError:
            results = []
        if len(results) != len(requests):
            invalid = SubmitResult(Outcome.RETRY, "invalid answer to a batch")
            return [invalid] * len(requests)
        return [
            SubmitResult(Outcome.ACCEPTED)
            if item.status is not None
            else _refusal(item.http_status, f": {item.message}" if item.message else "")
            for item in results
        ]

    async def fetch_task(self, kind: Kind, task_id: str) -> TaskResult | None:
        """The sub-service's record of the task; None when it has none (404)."""
        url = f"{api_url_for(self._settings, kind)}/v1/tasks/{task_id}"
        try:
            response = await self._http.get(url, headers=self._headers)
        except HttpError as exc:
            raise UnavailableError(f"{title(kind)} unreachable ({exc})") from exc
        if response.status_code == 404:
            return None
        if not response.is_success:
            raise UnavailableError(f"{title(kind)} answered HTTP {response.status_code}")
        try:
            return TaskResult.model_validate_json(response.content)
        except ValidationError as exc:
            raise UnavailableError(f"{title(kind)} sent an invalid task record") from exc

    async def cancel(self, kind: Kind, task_id: str) -> bool:
        """``POST /v1/tasks/{id}/cancel``: ask the sub-service not to run the task
        (it records it canceled unless it has ended); True when it answered so."""
        url = f"{api_url_for(self._settings, kind)}/v1/tasks/{task_id}/cancel"
        try:
            response = await self._http.post(url, content=b"", headers=self._headers)
        except HttpError:
            return False
        return response.is_success

    async def reachable(self, kind: Kind) -> bool:
        """The sub-service answers, takes this App API's ``INTERNAL_TOKEN`` and
        reaches its task store: ``GET /v1/ping`` answers 204. Otherwise raises,
        saying why (readiness logs it): unreachable at its address, a refused token
        (with another token on each side every task would be refused), another
        answer."""
        response = await self._probe(kind, "/v1/ping")
        if response.status_code == 404:
            # A sub-service older than /v1/ping (a rollout that updates the App API
            # first): a lookup of a task that does not exist tells the same.
            response = await self._probe(kind, f"/v1/tasks/{_NO_SUCH_TASK_ID}")
            if response.status_code == 404:
                return True
        if response.status_code in (401, 403):
            raise UnavailableError(
                f"{title(kind)} refuses this App API's INTERNAL_TOKEN"
                f" (HTTP {response.status_code}): set the same on both"
            )
        if response.status_code != 204:
            raise UnavailableError(f"{title(kind)} answered HTTP {response.status_code} to a ping")
        return True

    async def _probe(self, kind: Kind, path: str) -> HttpResponse:
        base_url = api_url_for(self._settings, kind)
        try:
            return await self._http.get(f"{base_url}{path}", headers=self._headers)
        except HttpError as exc:
            raise UnavailableError(f"{title(kind)} unreachable at {base_url} ({exc})") from exc


# Looked up when a sub-service has no /v1/ping; no task has this id (task ids are UUIDs).
_NO_SUCH_TASK_ID = "readiness-probe"


def title(kind: Kind) -> str:
    """``"AudioGen"`` for sound: what error messages call the sub-service."""
    return service_spec(kind).title


def _refusal(status_code: int, message: str) -> SubmitResult:
    """A refused task: final for a client error, worth retrying otherwise. A
    refused token is the deployment's mistake, not the task's: retried (until the
    fan-out's deadline), so that fixing INTERNAL_TOKEN in time loses no task."""
    reason = f"HTTP {status_code}{message[:202]}"
    if status_code in (401, 403):
        return SubmitResult(Outcome.RETRY, f"{reason} (is INTERNAL_TOKEN the same on both?)")
    if 400 <= status_code < 500 and status_code not in (408, 429):
        return SubmitResult(Outcome.REJECTED, reason)
    return SubmitResult(Outcome.RETRY, reason)
