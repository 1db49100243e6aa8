"""The App API's client of the sub-service APIs (AudioGen, MusicGen) over HTTP."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import httpx
from pydantic import ValidationError

from core_base.contracts import GenerateRequest, TaskResult
from core_base.domain import Kind
from core_base.errors import UnavailableError
from core_base.services import service_spec
from core_base.settings import AppSettings


def api_url_for(settings: AppSettings, kind: Kind) -> str:
    """Where the App API reaches the sub-service that serves ``kind``."""
    urls = {Kind.SOUND: settings.audio_gen_api_url, Kind.MUSIC: settings.music_gen_api_url}
    return urls[kind].rstrip("/")


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

    def __init__(self, http: httpx.AsyncClient, settings: AppSettings, internal_token: str) -> None:
        self._http = http
        self._settings = settings
        self._headers = {"Authorization": f"Bearer {internal_token}"}

    async def submit(self, kind: Kind, request: GenerateRequest) -> SubmitResult:
        url = f"{api_url_for(self._settings, kind)}/v1/generate"
        try:
            response = await self._http.post(
                url,
                content=request.model_dump_json(),
                headers={**self._headers, "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            return SubmitResult(Outcome.RETRY, f"unreachable ({type(exc).__name__})")
        if response.status_code in (200, 201, 202):
            return SubmitResult(Outcome.ACCEPTED)
        reason = f"HTTP {response.status_code}{_message(response)}"
        if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
            return SubmitResult(Outcome.REJECTED, reason)
        return SubmitResult(Outcome.RETRY, reason)

    async def fetch_task(self, kind: Kind, task_id: str) -> TaskResult | None:
        """The sub-service's record of the task; None when it has none (404)."""
        url = f"{api_url_for(self._settings, kind)}/v1/tasks/{task_id}"
        try:
            response = await self._http.get(url, headers=self._headers)
        except httpx.HTTPError as exc:
            raise UnavailableError(f"{title(kind)} unreachable ({type(exc).__name__})") from exc
        if response.status_code == 404:
            return None
        if not response.is_success:
            raise UnavailableError(f"{title(kind)} answered HTTP {response.status_code}")
        try:
            return TaskResult.model_validate_json(response.content)
        except ValidationError as exc:
            raise UnavailableError(f"{title(kind)} sent an invalid task record") from exc

    async def reachable(self, kind: Kind) -> bool:
        try:
            response = await self._http.get(f"{api_url_for(self._settings, kind)}/healthz")
        except httpx.HTTPError:
            return False
        return response.is_success


def title(kind: Kind) -> str:
    """``"AudioGen"`` for sound: what error messages call the sub-service."""
    return service_spec(kind).title


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    message = body.get("message") if isinstance(body, dict) else None
    return f": {str(message)[:200]}" if message else ""
