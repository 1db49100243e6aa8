"""Posting task results back to the App API's callback URL, with retries.

A callback is a notification, not the result's only copy: the result is already
in S3 and the task store before it is sent, and the App API can ask
``GET /v1/tasks/{id}`` for anything it missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from core_base.contracts import TaskResult
from core_base.http.client import HttpClient, HttpError

logger = logging.getLogger(__name__)

# 24 attempts with backoff 0.5, 1, 2, ... capped at 30 s, nine minutes of pauses
# (up to 13 against an App API that hangs, each attempt's timeout added): rides
# out an App API restart, or PostgreSQL down behind it for minutes, and the result
# arrives within 30 s of their return. (With two minutes, a result given up on
# waited for the App API's reconciler, 5 minutes after the task's last news: seen
# as 150 s of delay after a 150 s PostgreSQL outage.) A waiting callback costs a
# sleeping coroutine and its body; a stopping worker drops them (the reconciler
# finds those).
CALLBACK_ATTEMPTS = 24
CALLBACK_BACKOFF_BASE_S = 0.5
CALLBACK_BACKOFF_CAP_S = 30.0


class CallbackSender:
    def __init__(
        self,
        client: HttpClient,
        internal_token: str,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {internal_token}"}
        self._sleep = sleep

    async def send(
        self, url: str, result: TaskResult, *, attempts: int = CALLBACK_ATTEMPTS
    ) -> bool:
        """POST ``result`` to ``url``; True once a 2xx came back."""
        body = result.to_bytes()
        headers = {**self._headers, "Content-Type": "application/json"}
        for attempt in range(1, attempts + 1):
            try:
                response = await self._client.post(url, content=body, headers=headers)
                if response.is_success:
                    if attempt > 1:  # the warnings before it end here
                        logger.info(
                            "callback for %s delivered on attempt %d", result.task_id, attempt
                        )
                    return True
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    logger.error(
                        "callback for %s refused with %s; not retrying%s",
                        result.task_id,
                        response.status_code,
                        _HINTS.get(response.status_code, ""),
                    )
                    return False
                # The App API's own reason, as in "PostgreSQL unreachable".
                reason = f"HTTP {response.status_code}{response.reason_given()}"
            except HttpError as exc:
                reason = str(exc)
            if attempt == attempts:
                logger.warning(
                    "callback for %s failed (%s), attempt %d of %d; giving up (the App API"
                    " looks the task up when it hears nothing)",
                    result.task_id,
                    reason,
                    attempt,
                    attempts,
                )
                break
            delay_s = min(CALLBACK_BACKOFF_CAP_S, CALLBACK_BACKOFF_BASE_S * 2 ** (attempt - 1))
            logger.warning(
                "callback for %s failed (%s), attempt %d of %d; next in %.1fs",
                result.task_id,
                reason,
                attempt,
                attempts,
                delay_s,
            )
            await self._sleep(delay_s)
        return False


# What a refusal most likely means, for the log line.
_HINTS = {
    401: " (does INTERNAL_TOKEN differ between this service and the App API?)",
    403: " (does INTERNAL_TOKEN differ between this service and the App API?)",
}
