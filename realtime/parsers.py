"""A JSON parser for DRF that refuses a body nested too deep to decode with a 400."""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    """DRF's `JSONParser`, except that a body nested deeper than Python's decoder can follow
    (`"[" * 100000`, 100 KB) is a `400` like any other malformed body. DRF's own turns
    `ValueError` into a `ParseError` but lets the decoder's `RecursionError` through: a
    `500` and a logged traceback, for any client who sends one."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply") from None
