"""Parsing a JSON body outside FastAPI's parameter machinery, with its 422 shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.requests import Request

from core_base.errors import UnsupportedEncodingError

Model = TypeVar("Model", bound=BaseModel)


# Problems listed in one 422 answer. A body within the size limit can hold tens
# of thousands (an unknown field each): listing them all took a second of the
# event loop and made a 422 of megabytes.
MAX_LISTED_PROBLEMS = 20
_TOO_MANY = "too_many_errors"
_NOT_JSON = "must be sent as JSON (Content-Type: application/json)"


def parse_json_body(model: type[Model], raw: bytes) -> Model:
    """``model`` from the raw body; a bad body raises the ``RequestValidationError``
    FastAPI would have raised (fields located under ``body``), so it gets the same
    422 naming the field, with at most ``MAX_LISTED_PROBLEMS`` problems listed."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        # Only what the answer shows: the inputs and contexts are left out.
        found = exc.errors(include_url=False, include_context=False, include_input=False)
        errors = [{**error, "loc": ("body", *error["loc"])} for error in found]
        raise RequestValidationError(capped_problems(errors)) from None


def refuse_encoded_body(headers: Headers) -> None:
    """A compressed body (``Content-Encoding: gzip``, say) is refused with 415 naming
    the header: read as it is, it would be a puzzling "invalid JSON" 422."""
    # Every Content-Encoding header counts (a second one may name gzip).
    codings = [c.strip() for v in headers.getlist("content-encoding") for c in v.split(",")]
    refused = [coding for coding in codings if coding and coding.lower() != "identity"]
    if refused:
        raise UnsupportedEncodingError(", ".join(refused)[:40])


async def read_body_as(model: type[Model], request: Request) -> Model:
    """``model`` from ``request``'s body read as JSON whatever its Content-Type (the
    App API takes what marketplaces send); a compressed body is a 415 (see
    ``refuse_encoded_body``), a bad one the 422 of ``parse_json_body``."""
    refuse_encoded_body(request.headers)
    return parse_json_body(model, await request.body())


async def read_json_body(model: type[Model], request: Request) -> Model:
    """``model`` from ``request``'s body, taken as a FastAPI body parameter takes it:
    only a body sent as JSON (``application/json`` or ``application/*+json``) is
    parsed; any other Content-Type, or none, is a 422 naming the body; a compressed
    one is a 415 (see ``refuse_encoded_body``)."""
    refuse_encoded_body(request.headers)
    if not _is_json_media_type(request.headers.get("content-type")):
        # FastAPI hands such a body to validation as bytes, which fails on "body";
        # the same 422, with a message that says what is wrong.
        problem = {"type": "content_type", "loc": ("body",), "msg": _NOT_JSON}
        raise RequestValidationError([problem])
    return parse_json_body(model, await request.body())


def _is_json_media_type(content_type: str | None) -> bool:
    """FastAPI's rule for a JSON body: ``application/json`` or ``application/*+json``,
    whatever its parameters (``charset``)."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    main_type, _, subtype = media_type.partition("/")
    return main_type == "application" and (subtype == "json" or subtype.endswith("+json"))


def capped_problems(errors: Sequence[Any]) -> list[Any]:
    """The first ``MAX_LISTED_PROBLEMS`` validation errors, and one saying how many
    more there were, if any; errors capped already are left as they are."""
    if len(errors) <= MAX_LISTED_PROBLEMS or errors[-1].get("type") == _TOO_MANY:
        return list(errors)
    more = len(errors) - MAX_LISTED_PROBLEMS
    summary = {"type": _TOO_MANY, "loc": ("body",), "msg": f"and {more} more problems"}
    return [*errors[:MAX_LISTED_PROBLEMS], summary]
