"""The dev file server's response: Starlette's ``FileResponse``, with its Range
errors in the services' terms.

Starlette answers a Range header it cannot parse with a 400 in plain text, and
one past the file's end with a bare 416. RFC 9110 (section 14.2) lets a server
ignore a Range it cannot parse, which is what S3, the production file server,
does: so does this, serving the whole file. A range past the end stays a 416,
with the services' error body.
"""

from __future__ import annotations

import asyncio
import os

from starlette.datastructures import Headers
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from core_base.http.errors import error_body, send_error


class ServedFile(FileResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        http_range = headers.get("range")
        if http_range is not None and scope["method"] in ("GET", "HEAD"):
            stat_result = await asyncio.to_thread(os.stat, self.path)
            # The ETag and Last-Modified an If-Range is compared with; Starlette
            # uses this stat too, instead of making its own.
            self.stat_result = stat_result
            self.set_stat_headers(stat_result)
            if_range = headers.get("if-range")
            if if_range is not None and not self._should_use_range(if_range):
                # No longer the file the client has part of: Starlette serves it whole.
                await super().__call__(scope, receive, send)
                return
            size = stat_result.st_size
            try:
                self._parse_range_header(http_range, size)
            except MalformedRangeHeader:
                scope = {
                    **scope,
                    "headers": [(k, v) for k, v in scope["headers"] if k != b"range"],
                }
            except RangeNotSatisfiable:
                body = error_body(
                    "range_not_satisfiable", f"the range is outside the file ({size} bytes)"
                )
                await send_error(send, 416, body, [(b"content-range", f"bytes */{size}".encode())])
                return
        await super().__call__(scope, receive, send)
