"""Wire formats: one encoder, one decoder that recognises all three formats.

* **Confluent framing** (``0x00`` + 4-byte big-endian schema id + Avro body) when a schema
  registry URL is configured; ids are resolved through the registry and cached, or from
  ``known_ids`` given up front.
* **Avro single-object encoding** (``C3 01`` + 8-byte little-endian CRC-64-AVRO fingerprint
  + Avro body) otherwise; fingerprints resolve against the current and released schemas in
  ``schemas/``, so data written with any released version reads with the current one.
* **JSON**: a UTF-8 JSON object of the record's shape, for services that cannot produce
  Avro. Missing fields take their schema defaults at every level (a nested ``output``
  without ``probabilities`` gets ``{}``); a union value is either plain (``"a"``, ``null``)
  or in Avro's JSON encoding (``{"string": "a"}``, ``{"io.shadowpipe.Output": {...}}``, the
  short name ``{"Output": {...}}`` too).

Anything else raises :class:`DecodeError` with a reason, which workers dead-letter. Every
decoded record then passes :func:`~shadowpipe.schemas.validate.check` (the same rules for
every processor): a record that cannot be processed raises
:class:`~shadowpipe.schemas.validate.InvalidRecord` (a DecodeError whose ``kind`` is
``invalid``), and NaN numeric features come back listed in ``null_features``.

>>> codec = Codec()
>>> fb = {"request_id": "r1", "label": "spam", "event_time": 1700000000000}
>>> data = codec.encode("Feedback", fb)
>>> data[:2]
b'\\xc3\\x01'
>>> codec.decode(data, "Feedback")["label"]
'spam'
>>> codec.decode(b'{"request_id": "r1", "label": {"string": "spam"}, "event_time": 1700000000000}',
...              "Feedback") == codec.decode(data, "Feedback")
True
>>> codec.decode(codec.encode("Feedback", {**fb, "event_time": -5}), "Feedback")
Traceback (most recent call last):
...
shadowpipe.schemas.validate.InvalidRecord: event_time -5 is not a positive epoch-ms
"""

from __future__ import annotations

import copy
import io
import json
import struct
import urllib.request
from functools import cache
from typing import Any

import fastavro
from fastavro.schema import expand_schema, to_parsing_canonical_form

from shadowpipe.schemas import NAMES, released, released_versions, schema
from shadowpipe.schemas.validate import DecodeError, InvalidRecord, check
from shadowpipe.schemas.wire import (
    CONFLUENT_MAGIC,
    SINGLE_OBJECT_MARKER,
    confluent_prefix,
    schema_fingerprint,
    single_object_prefix,
)

__all__ = ["CONFLUENT", "SINGLE_OBJECT", "Codec", "DecodeError", "InvalidRecord",
           "SchemaRegistryClient", "schema_fingerprint"]

SINGLE_OBJECT = "single-object"
CONFLUENT = "confluent"
_JSON_START = frozenset(b"{ \t\r\n")

Record = dict[str, Any]


class SchemaRegistryClient:
    """Minimal Confluent Schema Registry REST client (register and fetch by id).

    >>> SchemaRegistryClient("http://127.0.0.1:8081").url
    'http://127.0.0.1:8081'
    """

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read())

    def register(self, subject: str, parsed: dict[str, Any]) -> int:
        """Register ``parsed`` under ``subject`` and return its global id."""
        canonical = to_parsing_canonical_form(parsed)
        return int(self._call("POST", f"/subjects/{subject}/versions", {"schema": canonical})["id"])

    def schema_by_id(self, schema_id: int) -> dict[str, Any]:
        """The writer schema registered under ``schema_id``."""
        reply = self._call("GET", f"/schemas/ids/{schema_id}")
        return fastavro.parse_schema(json.loads(reply["schema"]))


class Codec:
    """Encode records for the wire and decode any of the three accepted formats.

    Parameters
    ----------
    registry_url
        Confluent Schema Registry URL; empty selects single-object encoding.
    known_ids
        Schema ids known without asking a registry (``{id: parsed_schema}``).
    """

    def __init__(
        self, registry_url: str = "", *, known_ids: dict[int, dict[str, Any]] | None = None
    ) -> None:
        self.registry = SchemaRegistryClient(registry_url) if registry_url else None
        self._by_id: dict[int, dict[str, Any]] = dict(known_ids or {})
        self._id_for: dict[str, int] = {}
        self._by_fingerprint: dict[bytes, dict[str, Any]] = {}
        self._single_object: dict[str, bytes] = {}
        current_by_form = {}
        for name in NAMES:
            current = schema(name)
            self._by_fingerprint[schema_fingerprint(current)] = current
            self._single_object[name] = single_object_prefix(current)
            current_by_form[to_parsing_canonical_form(current)] = name
            for version in released_versions():
                old = released(version, name)
                if old is not None:
                    self._by_fingerprint.setdefault(schema_fingerprint(old), old)
        for schema_id, parsed in self._by_id.items():  # known ids of current schemas frame
            name = current_by_form.get(to_parsing_canonical_form(parsed))
            if name is not None:
                self._id_for.setdefault(f"{name}-value", schema_id)

    # -- encoding -------------------------------------------------------------------------

    def header(self, name: str, framing: str | None = None, *, subject: str | None = None,
               schema_id: int | None = None) -> bytes:
        """The framing bytes put before an Avro body of the current schema ``name``.

        ``framing`` is :data:`SINGLE_OBJECT` (``C3 01`` + fingerprint) or :data:`CONFLUENT`
        (``00`` + schema id); by default the codec's own: Confluent with a registry. The
        Confluent id is ``schema_id`` when given (then decodable from here on), else the id of
        ``subject`` (default ``<name>-value``): from ``known_ids`` or registered once.
        LookupError when there is none (no registry, id not known).

        >>> Codec().header("Feedback")[:2]
        b'\\xc3\\x01'
        >>> Codec().header("Feedback", CONFLUENT, schema_id=7)
        b'\\x00\\x00\\x00\\x00\\x07'
        """
        if framing is None:
            framing = SINGLE_OBJECT if self.registry is None else CONFLUENT
        if framing == SINGLE_OBJECT:
            return self._single_object[name]
        if framing != CONFLUENT:
            raise ValueError(f"unknown framing {framing!r}")
        if schema_id is None:
            key = subject or f"{name}-value"
            schema_id = self._id_for.get(key)
            if schema_id is None:
                if self.registry is None:
                    raise LookupError(f"no schema id for {key}: no registry configured")
                schema_id = self._id_for[key] = self.registry.register(key, schema(name))
        self._by_id.setdefault(schema_id, schema(name))
        return confluent_prefix(schema_id)

    def encode(self, name: str, record: Record, *, subject: str | None = None) -> bytes:
        """Encode ``record`` as schema ``name``: Confluent-framed with a registry, else
        single-object. ``subject`` (default ``<name>-value``) is the registry subject."""
        buf = io.BytesIO()
        buf.write(self.header(name, subject=subject))
        fastavro.schemaless_writer(buf, schema(name), record)
        return buf.getvalue()

    def confluent_frame(self, schema_id: int, name: str, record: Record) -> bytes:
        """Encode with Confluent framing under a known ``schema_id`` (no registry call)."""
        buf = io.BytesIO()
        buf.write(self.header(name, CONFLUENT, schema_id=schema_id))
        fastavro.schemaless_writer(buf, schema(name), record)
        return buf.getvalue()

    # -- decoding -------------------------------------------------------------------------

    def decode(self, data: bytes | None, name: str) -> Record:
        """Decode ``data`` into a record of the current schema ``name``.

        Raises :class:`DecodeError` with a reason for anything that is not one, and its
        subclass :class:`InvalidRecord` for a record that cannot be processed
        (:func:`~shadowpipe.schemas.validate.check`).
        """
        return check(name, self._decode(data, name))

    def _decode(self, data: bytes | None, name: str) -> Record:
        if not data:
            raise DecodeError("empty message")
        if data[:2] == SINGLE_OBJECT_MARKER:
            return self._decode_single_object(data, name)
        if data[0] == CONFLUENT_MAGIC:
            return self._decode_confluent(data, name)
        if data[0] in _JSON_START:
            return self._decode_json(data, name)
        raise DecodeError(f"unrecognised framing: first byte 0x{data[0]:02x} is not Avro or JSON")

    def _decode_single_object(self, data: bytes, name: str) -> Record:
        if len(data) < 10:
            raise DecodeError("truncated single-object header")
        writer = self._by_fingerprint.get(data[2:10])
        if writer is None:
            raise DecodeError(f"unknown schema fingerprint {data[2:10][::-1].hex()}")
        return self._read_body(data, 10, writer, name)

    def _decode_confluent(self, data: bytes, name: str) -> Record:
        if len(data) < 5:
            raise DecodeError("truncated Confluent header")
        (schema_id,) = struct.unpack_from(">I", data, 1)
        writer = self._by_id.get(schema_id)
        if writer is None and self.registry is not None:
            try:
                writer = self._by_id[schema_id] = self.registry.schema_by_id(schema_id)
            except OSError as exc:
                raise DecodeError(f"schema id {schema_id}: registry lookup failed: {exc}") from exc
        if writer is None:
            raise DecodeError(f"unknown schema id {schema_id} (no registry configured)")
        return self._read_body(data, 5, writer, name)

    def _read_body(self, data: bytes, start: int, writer: dict[str, Any], name: str) -> Record:
        reader = schema(name)
        if writer["name"] != reader["name"]:
            raise DecodeError(f"expected {reader['name']}, got {writer['name']}")
        buf = io.BytesIO(data)
        buf.seek(start)
        try:
            record = fastavro.schemaless_reader(
                buf, writer, None if writer is reader else reader
            )
        except Exception as exc:  # fastavro raises many types on corrupt bodies
            raise DecodeError(f"corrupt Avro body for {name}: {type(exc).__name__}: {exc}") from exc
        if buf.tell() != len(data):
            raise DecodeError(f"{len(data) - buf.tell()} trailing bytes after {name} body")
        return record

    def _decode_json(self, data: bytes, name: str) -> Record:
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise DecodeError(f"invalid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise DecodeError(f"JSON message is a {type(obj).__name__}, not an object")
        obj = _from_json(_expanded(name), obj)
        # Round-trip through Avro: validates types and rejects unknown fields.
        buf = io.BytesIO()
        try:
            fastavro.schemaless_writer(buf, schema(name), obj, strict=True)
        except Exception as exc:
            raise DecodeError(f"JSON does not match {name}: {exc}") from exc
        buf.seek(0)
        return fastavro.schemaless_reader(buf, schema(name), None)


@cache
def _expanded(name: str) -> dict[str, Any]:
    """Schema ``name`` with every named type inlined (JSON conversion walks it)."""
    return expand_schema(schema(name))


def _from_json(t: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as fastavro writes type ``t``: defaults filled in records at
    every level, unions unwrapped from Avro's JSON encoding. Anything that does not fit is
    returned as is, for the strict writer to refuse with its reason."""
    if isinstance(t, list):
        return _union(t, value)
    if not isinstance(t, dict):
        return value
    kind = t["type"]
    if kind == "record" and isinstance(value, dict):
        out = {k: v for k, v in value.items()}  # unknown keys stay: the writer refuses them
        for field in t["fields"]:
            name = field["name"]
            if name in value:
                out[name] = _from_json(field["type"], value[name])
            elif "default" in field:
                out[name] = copy.deepcopy(field["default"])
        return out
    if kind == "map" and isinstance(value, dict):
        return {k: _from_json(t["values"], v) for k, v in value.items()}
    if kind == "array" and isinstance(value, list):
        return [_from_json(t["items"], v) for v in value]
    return value


def _branch_names(t: Any) -> list[str]:
    if isinstance(t, str):
        return [t]
    name = t.get("name")
    if name is None:
        return [t["type"]]  # map, array
    return [name, name.rsplit(".", 1)[-1]]


def _union(branches: list[Any], value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, dict) and len(value) == 1:
        (key, inner), = value.items()
        for branch in branches:
            fields = branch.get("fields", ()) if isinstance(branch, dict) else ()
            if key in _branch_names(branch) and all(f["name"] != key for f in fields):
                return _from_json(branch, inner)  # Avro JSON encoding: {"string": "a"}
    for branch in branches:  # a plain value: records and maps take objects
        if isinstance(branch, dict) and isinstance(value, dict | list):
            return _from_json(branch, value)
    return value
