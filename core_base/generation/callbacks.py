"""Posting task results back to the App API's callback URL, with retries.

A callback is a notification, not the result's only copy: the result is already
in S3 and the task store before it is sent, and the App API can ask
``GET /v1/tasks/{id}`` for anything it missed.
"""

from __future__ import annotations

import asyncio
import logging

from core_base.contracts import TaskResult
from core_base.http.client import HttpClient, HttpError

logger = logging.getLogger(__name__)

# 6 attempts with backoff 0.5, 1, 2, 4, 8 s: rides out an App API restart.
CALLBACK_ATTEMPTS = 6
CALLBACK_BACKOFF_BASE_S = 0.5


class CallbackSender:
    def __init__(self, client: HttpClient, internal_token: str) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {internal_token}"}

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
                    return True
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    logger.error(
                        "callback for %s refused with %s; not retrying",
                        result.task_id,
                        response.status_code,
                    )
                    return False
                reason = f"HTTP {response.status_code}"
            except HttpError as exc:
                reason = str(exc)
            if attempt < attempts:
                await asyncio.sleep(CALLBACK_BACKOFF_BASE_S * 2 ** (attempt - 1))
            logger.warning(
                "callback for %s failed (%s), attempt %d", result.task_id, reason, attempt
            )
        return False
