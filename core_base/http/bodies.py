"""Parsing a JSON body outside FastAPI's parameter machinery, with its 422 shape."""

from __future__ import annotations

from typing import TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


def parse_json_body(model: type[Model], raw: bytes) -> Model:
    """``model`` from the raw body; a bad body raises the ``RequestValidationError``
    FastAPI would have raised (fields located under ``body``), so it gets the same
    422 naming the field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from None
