"""A container decodes JSON messages with one decoder: the same values as kombu's."""

from __future__ import annotations

import datetime
import decimal
import uuid

import pytest
from kombu.serialization import dumps, loads, registry
from kombu.utils import json as kombu_json

from celery_concurrent.container import decoding

VALUES = {
    "text": "héllo",
    "number": 1.5,
    "nested": {"list": [1, None, True], "empty": {}},
    "when": datetime.datetime(2026, 12, 3, 6, 30, tzinfo=datetime.timezone.utc),
    "day": datetime.date(2026, 12, 3),
    "id": uuid.UUID("b1f6cc6d-3bcf-4688-8821-def7abd0810b"),
    "amount": decimal.Decimal("10.25"),
    "raw": b"\x00bytes",
}


@pytest.fixture
def kombu_json_registered():
    """Put kombu's own json serializer back after the test."""
    yield
    registry.register("json", kombu_json.dumps, kombu_json.loads, "application/json", "utf-8")


@pytest.mark.parametrize("form", ["str", "bytes", "memoryview", "bytearray"])
def test_it_decodes_what_kombu_decodes(form):
    _, _, text = dumps(VALUES, serializer="json")
    data = {
        "str": text,
        "bytes": text.encode(),
        "memoryview": memoryview(text.encode()),
        "bytearray": bytearray(text.encode()),
    }[form]
    assert decoding.loads(data) == kombu_json.loads(data) == VALUES


def test_installed_once_it_serves_every_json_message(kombu_json_registered):
    assert decoding.reuse_one_json_decoder() is True
    assert decoding.reuse_one_json_decoder() is False  # already ours
    content_type, encoding, text = dumps(VALUES, serializer="json")
    assert loads(text, content_type, encoding) == VALUES
    assert registry._decoders[content_type] is decoding.loads


def test_a_json_serializer_of_the_users_own_is_left_alone(kombu_json_registered):
    def theirs(data):
        return {"theirs": True}

    registry.register("json", kombu_json.dumps, theirs, "application/json", "utf-8")
    assert decoding.reuse_one_json_decoder() is False
    assert loads('{"a": 1}', "application/json", "utf-8") == {"theirs": True}


def test_bad_json_raises_as_kombu_raises():
    with pytest.raises(ValueError):
        kombu_json.loads("{not json")
    with pytest.raises(ValueError):
        decoding.loads("{not json")
