"""The one reader of a checkpoint's JSON files (config.json, generation_config.json, tokenizer
files): UTF-8, nesting bounded before parsing, a JSON object at the top, and every failure a
``ConfigError`` (a ``ValueError``) that names the file."""
from __future__ import annotations

import json
import re
from typing import Any, Optional

from .errors import ConfigError, Glm4rtError

MAX_NESTING = 32  # levels of JSON arrays/objects (real GLM-4 configs use 3, tokenizer.json 4)

# A JSON string (escapes included) or a bracket: enough to follow the nesting of a document.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def read_json(path: str, error: type[Glm4rtError] = ConfigError) -> dict[str, Any]:
    """The JSON object in the file ``path``.

    Args:
        path: the file.
        error: the error class to raise (a tokenizer file's errors are ``TokenizerError``s).
    Raises:
        ConfigError (or ``error``, both ``ValueError``s): not UTF-8, not JSON, nested too deep, or not an object.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    deep = too_deep(text)
    if deep is not None:
        raise error(f"{path}: field {deep} nests more than {MAX_NESTING} levels deep")
    try:
        data = json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer of 4300+ digits
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object")
    return data


def too_deep(text: str) -> Optional[str]:
    """The top-level field whose value nests arrays/objects more than ``MAX_NESTING`` levels deep
    (its name as written), or None. A scan of the text: Python's json would take one stack frame
    per level, and raise RecursionError on a deep enough file before anything could be named."""
    depth, key, last_string = 0, None, None
    for token in _JSON_TOKEN.finditer(text):
        c = token.group()
        if c[0] == '"':
            if depth == 1:
                last_string = c
        elif c in "[{":
            depth += 1
            if depth == 2:
                key = last_string
            if depth > MAX_NESTING:
                return key or "(the top level)"
        else:
            depth -= 1
    return None
