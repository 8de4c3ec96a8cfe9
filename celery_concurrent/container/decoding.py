"""One JSON decoder for every message a container reads.

kombu decodes each message's JSON with ``json.loads(s, object_hook=...)``, which builds
a new ``JSONDecoder`` (and its scanner) for every call: a Redis message is decoded
twice (its envelope and its body), and the two decoders cost a container more than
parsing the JSON does. A container registers the same decoding (kombu's own
``object_hook``, so kombu's encoded types still come back) with one decoder made once.
A ``json`` serializer the user registered in its place is left as it is.
"""

from __future__ import annotations

import json
from typing import Any

from kombu.serialization import registry
from kombu.utils import json as kombu_json

CONTENT_TYPE = "application/json"

#: decodes like ``kombu.utils.json.loads``; a decoder is safe to share between threads
_DECODER = json.JSONDecoder(object_hook=kombu_json.object_hook)


def _decode(text: str, object_hook: Any = None) -> Any:
    # kombu passes its own object_hook, which the shared decoder already has.
    return _DECODER.decode(text)


def loads(data: Any) -> Any:
    """``kombu.utils.json.loads`` (bytes, buffers and kombu's types), one decoder."""
    return kombu_json.loads(data, _loads=_decode)


def reuse_one_json_decoder() -> bool:
    """Decode ``application/json`` messages with :func:`loads` in this process."""
    decoders = getattr(registry, "_decoders", None)
    if not isinstance(decoders, dict) or decoders.get(CONTENT_TYPE) is not kombu_json.loads:
        return False
    registry.register("json", kombu_json.dumps, loads, CONTENT_TYPE, "utf-8")
    return True
