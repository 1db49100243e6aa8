"""Parsing a JSON body outside FastAPI's parameter machinery, with its 422 shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


# Problems listed in one 422 answer. A body within the size limit can hold tens
# of thousands (an unknown field each): listing them all took a second of the
# event loop and made a 422 of megabytes.
MAX_LISTED_PROBLEMS = 20
_TOO_MANY = "too_many_errors"


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


def capped_problems(errors: Sequence[Any]) -> list[Any]:
    """The first ``MAX_LISTED_PROBLEMS`` validation errors, and one saying how many
    more there were, if any; errors capped already are left as they are."""
    if len(errors) <= MAX_LISTED_PROBLEMS or errors[-1].get("type") == _TOO_MANY:
        return list(errors)
    more = len(errors) - MAX_LISTED_PROBLEMS
    summary = {"type": _TOO_MANY, "loc": ("body",), "msg": f"and {more} more problems"}
    return [*errors[:MAX_LISTED_PROBLEMS], summary]
