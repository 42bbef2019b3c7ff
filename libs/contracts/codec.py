"""JSON encoding of contract models (orjson) and field-level error rendering."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from .events import EVENT_MODELS
from .notifications import FieldError


def dumps(model: BaseModel) -> bytes:
    """Compact JSON of a contract model; unset optional fields are left out."""
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def error_list(exc: ValidationError) -> list[FieldError]:
    """Turn a pydantic ValidationError into Baton's field-level errors.

    The discriminator tag (the event type) is removed from the location so that
    ``loc`` is the path inside the published JSON document.
    """
    out: list[FieldError] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = list(err["loc"])
        # ("created", "title") -> ("title",) for tagged-union errors
        if len(loc) > 1 and err["type"] != "union_tag_invalid" and loc[0] in EVENT_MODELS:
            loc = loc[1:]
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append(FieldError(loc=loc, code=err["type"], message=msg))
    return out
