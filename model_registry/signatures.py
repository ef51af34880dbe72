"""Read a TensorFlow SavedModel's input/output signature without importing TensorFlow.

`saved_model.pb` is a serialized `tensorflow.SavedModel` protocol buffer. This module decodes
just the fields needed for the signatures with a small stdlib-only wire-format reader (no
tensorflow, no google.protobuf). Everything else, including the large `graph_def` and
`object_graph_def`, is skipped over by length without being decoded. Field numbers are from
tensorflow/core/protobuf/{saved_model,meta_graph}.proto and
tensorflow/core/framework/{tensor_shape,types}.proto (TensorFlow 2.21).

Callers that keep models in Google Cloud Storage download the `saved_model.pb` bytes
themselves and pass them to `read_signature`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_registry.errors import ArtifactError

__all__ = [
    "DATA_TYPES",
    "SignatureError",
    "parse_saved_model",
    "read_signature",
    "read_signature_from_dir",
    "signature_summary",
]

SAVED_MODEL_PB = "saved_model.pb"
SAVED_MODEL_PBTXT = "saved_model.pbtxt"


class SignatureError(ArtifactError):
    """A SavedModel's signature could not be read: missing, corrupt, or no such tag set/key."""


# tensorflow.DataType (types.proto). `<name>_REF` variants are these values + 100.
_BASE_DATA_TYPES = {
    0: "DT_INVALID", 1: "DT_FLOAT", 2: "DT_DOUBLE", 3: "DT_INT32", 4: "DT_UINT8", 5: "DT_INT16",
    6: "DT_INT8", 7: "DT_STRING", 8: "DT_COMPLEX64", 9: "DT_INT64", 10: "DT_BOOL", 11: "DT_QINT8",
    12: "DT_QUINT8", 13: "DT_QINT32", 14: "DT_BFLOAT16", 15: "DT_QINT16", 16: "DT_QUINT16",
    17: "DT_UINT16", 18: "DT_COMPLEX128", 19: "DT_HALF", 20: "DT_RESOURCE", 21: "DT_VARIANT",
    22: "DT_UINT32", 23: "DT_UINT64", 24: "DT_FLOAT8_E5M2", 25: "DT_FLOAT8_E4M3FN",
    26: "DT_FLOAT8_E4M3FNUZ", 27: "DT_FLOAT8_E4M3B11FNUZ", 28: "DT_FLOAT8_E5M2FNUZ", 29: "DT_INT4",
    30: "DT_UINT4", 31: "DT_INT2", 32: "DT_UINT2", 33: "DT_FLOAT4_E2M1FN",
}
DATA_TYPES: dict[int, str] = {
    **_BASE_DATA_TYPES,
    **{n + 100: f"{name}_REF" for n, name in _BASE_DATA_TYPES.items() if n},
}

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_MAX_FIELD_NUMBER = (1 << 29) - 1
_CORRUPT_HINT = (
    "the file is truncated, corrupt, or not a binary SavedModel; re-export the model "
    "(tf.saved_model.save or keras model.export) and upload saved_model.pb again"
)


class _DecodeError(Exception):
    """Internal: malformed wire data at byte offset `pos`."""

    def __init__(self, what: str, pos: int) -> None:
        super().__init__(f"{what} at byte {pos}")


# ---------------------------------------------------------------------------------------------
# Wire format. Every reader works on the whole buffer with absolute [pos, end) bounds, so
# nothing is copied and errors carry a real file offset.


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode an unsigned varint (at most 10 bytes); returns (value, new_pos)."""
    result = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise _DecodeError("truncated varint", start)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
        if shift >= 70:
            raise _DecodeError("varint longer than 10 bytes", start)


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _fields(buf: bytes, pos: int, end: int):
    """Yield (field_number, wire_type, value, value_pos) for each field in buf[pos:end].

    `value` is the integer for varints, and the end offset for length-delimited fields (whose
    payload is buf[value_pos:value]). Fixed 32/64-bit fields yield value None (we need none).
    """
    while pos < end:
        tag_pos = pos
        tag, pos = _varint(buf, pos, end)
        if tag > 0xFFFFFFFF:
            raise _DecodeError("tag out of range", tag_pos)
        number, wire = tag >> 3, tag & 7
        if number == 0 or number > _MAX_FIELD_NUMBER:
            raise _DecodeError(f"invalid field number {number}", tag_pos)
        if wire == _VARINT:
            value, next_pos = _varint(buf, pos, end)
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            value = next_pos = pos + length
            if next_pos > end:
                raise _DecodeError(f"field {number} runs past the end of its message", tag_pos)
        elif wire == _I64 or wire == _I32:
            value, next_pos = None, pos + (8 if wire == _I64 else 4)
            if next_pos > end:
                raise _DecodeError(f"field {number} runs past the end of its message", tag_pos)
        elif wire in (_SGROUP, _EGROUP):
            raise _DecodeError("group fields are not used by SavedModel", tag_pos)
        else:
            raise _DecodeError(f"invalid wire type {wire}", tag_pos)
        yield number, wire, value, pos
        pos = next_pos


def _string(buf: bytes, start: int, end: int) -> str:
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise _DecodeError("string field is not valid UTF-8", start) from None


def _map(
    buf: bytes, start: int, end: int, parse_value: Callable[[bytes, list[tuple[int, int]]], Any]
) -> tuple[str, Any]:
    """Decode one map entry (key = 1: string, value = 2: message); returns (key, value)."""
    key, value_spans = "", []
    for number, wire, value, vpos in _fields(buf, start, end):
        if wire != _LEN:
            continue
        if number == 1:
            key = _string(buf, vpos, value)
        elif number == 2:
            value_spans.append((vpos, value))
    # A repeated singular message field merges; parse_value accepts a list of spans for that.
    return key, parse_value(buf, value_spans)


# ---------------------------------------------------------------------------------------------
# Messages. A singular message field seen more than once is merged (protobuf semantics), so
# these parsers take a list of (start, end) spans and fold them into one result.


def _tensor_shape(buf: bytes, spans: list[tuple[int, int]]) -> list[int] | None:
    """TensorShapeProto: dim = 2 (Dim: size = 1 int64, name = 2), unknown_rank = 3."""
    dims: list[int] = []
    unknown_rank = False
    for start, end in spans:
        for number, wire, value, vpos in _fields(buf, start, end):
            if number == 2 and wire == _LEN:
                size = 0
                for dnum, dwire, dvalue, _ in _fields(buf, vpos, value):
                    if dnum == 1 and dwire == _VARINT:
                        size = _int64(dvalue)
                dims.append(size)
            elif number == 3 and wire == _VARINT:
                unknown_rank = bool(value)
    return None if unknown_rank else dims


def _coo_sparse(buf: bytes, start: int, end: int) -> dict[str, str]:
    """TensorInfo.CooSparse: values = 1, indices = 2, dense_shape = 3 tensor names."""
    names = {1: "values", 2: "indices", 3: "dense_shape"}
    out = dict.fromkeys(names.values(), "")
    for number, wire, value, vpos in _fields(buf, start, end):
        if number in names and wire == _LEN:
            out[names[number]] = _string(buf, vpos, value)
    return out


def _tensor_info(buf: bytes, spans: list[tuple[int, int]]) -> dict[str, Any]:
    """TensorInfo: oneof encoding {name = 1, coo_sparse = 4, composite_tensor = 5},
    dtype = 2 (DataType enum), tensor_shape = 3."""
    encoding, tensor, sparse = "name", "", None
    dtype = 0
    shape_spans: list[tuple[int, int]] = []
    for start, end in spans:
        for number, wire, value, vpos in _fields(buf, start, end):
            if number == 1 and wire == _LEN:
                encoding, tensor = "name", _string(buf, vpos, value)
            elif number == 2 and wire == _VARINT:
                dtype = _int32(value)
            elif number == 3 and wire == _LEN:
                shape_spans.append((vpos, value))
            elif number == 4 and wire == _LEN:
                encoding, sparse = "coo_sparse", _coo_sparse(buf, vpos, value)
            elif number == 5 and wire == _LEN:
                # Validate the framing of the nested message even though we don't report it.
                for _ in _fields(buf, vpos, value):
                    pass
                encoding = "composite"
    shape = _tensor_shape(buf, shape_spans)
    if encoding == "composite" and not shape_spans:
        shape = None  # TF leaves dtype/shape unset for composites; the type_spec has them.
    info: dict[str, Any] = {
        "dtype": DATA_TYPES.get(dtype, f"DT_UNKNOWN_{dtype}"),
        "shape": shape,
        "tensor": tensor if encoding == "name" else None,
    }
    if encoding != "name":
        info["encoding"] = encoding
    if sparse is not None:
        info["components"] = sparse
    return info


def _signature_def(buf: bytes, spans: list[tuple[int, int]]) -> dict[str, Any]:
    """SignatureDef: inputs = 1, outputs = 2 (map<string, TensorInfo>), method_name = 3."""
    sig: dict[str, Any] = {"method_name": "", "inputs": {}, "outputs": {}}
    for start, end in spans:
        for number, wire, value, vpos in _fields(buf, start, end):
            if number in (1, 2) and wire == _LEN:
                key, info = _map(buf, vpos, value, _tensor_info)
                sig["inputs" if number == 1 else "outputs"][key] = info
            elif number == 3 and wire == _LEN:
                sig["method_name"] = _string(buf, vpos, value)
    return sig


def _meta_graph(buf: bytes, start: int, end: int) -> dict[str, Any]:
    """MetaGraphDef: meta_info_def = 1 (MetaInfoDef: tags = 4), signature_def = 5 (map)."""
    tags: list[str] = []
    signatures: dict[str, Any] = {}
    for number, wire, value, vpos in _fields(buf, start, end):
        if number == 1 and wire == _LEN:
            for inum, iwire, ivalue, ivpos in _fields(buf, vpos, value):
                if inum == 4 and iwire == _LEN:
                    tags.append(_string(buf, ivpos, ivalue))
        elif number == 5 and wire == _LEN:
            key, sig = _map(buf, vpos, value, _signature_def)
            signatures[key] = sig
        # graph_def (2), saver_def (3), collection_def (4), asset_file_def (6) and
        # object_graph_def (7) are skipped by length, never decoded.
    return {"tags": tags, "signatures": signatures}


# ---------------------------------------------------------------------------------------------
# Public API


def parse_saved_model(data: bytes) -> dict[str, Any]:
    """Decode a serialized SavedModel into `{"schema_version": int, "meta_graphs": [...]}`.

    Each meta graph is `{"tags": [str, ...], "signatures": {key: signature}}`, with signatures
    shaped as `read_signature` returns them. Raises SignatureError on any malformed input.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"parse_saved_model needs bytes, not {type(data).__name__}")
    data = bytes(data) if isinstance(data, memoryview) else data
    if not data:
        raise SignatureError("saved_model.pb is empty", _CORRUPT_HINT)
    if data[:256].lstrip().startswith((b"saved_model_schema_version", b"meta_graphs")):
        raise SignatureError(
            "this looks like a text-format SavedModel (saved_model.pbtxt), which is not supported",
            "export the model in binary form (saved_model.pb)",
        )
    schema_version = 0
    meta_graphs: list[dict[str, Any]] = []
    try:
        for number, wire, value, vpos in _fields(data, 0, len(data)):
            if number == 1 and wire == _VARINT:
                schema_version = _int64(value)
            elif number == 2 and wire == _LEN:
                meta_graphs.append(_meta_graph(data, vpos, value))
    except _DecodeError as e:
        raise SignatureError(f"saved_model.pb could not be decoded: {e}", _CORRUPT_HINT) from None
    if not meta_graphs:
        raise SignatureError("saved_model.pb contains no meta graphs: not a SavedModel", _CORRUPT_HINT)
    return {"schema_version": schema_version, "meta_graphs": meta_graphs}


def _tag_label(tags: list[str] | tuple[str, ...]) -> str:
    return ",".join(tags) if tags else "(empty tag set)"


def read_signature(
    data: bytes,
    signature_key: str = "serving_default",
    tags: tuple[str, ...] | str = ("serve",),
) -> dict[str, Any]:
    """Return one signature of a serialized SavedModel.

    Result: `{"method_name": str, "inputs": {key: tensor}, "outputs": {key: tensor}}` where a
    tensor is `{"dtype": "DT_FLOAT", "shape": [-1, 4] (None if rank unknown), "tensor":
    "serving_default_x:0"}`. Sparse/composite tensors have `"tensor": None` and an
    `"encoding"` of "coo_sparse" (plus `"components"`: its three tensor names) or "composite"
    (dtype/shape as the proto carries them: TF leaves them unset). `tags` matches a meta graph's tag set
    exactly, ignoring order (a comma-separated string is accepted too, as saved_model_cli).
    """
    if isinstance(tags, str):
        tags = tuple(tags.split(","))
    wanted = {t for t in tags if t}
    model = parse_saved_model(data)
    for meta_graph in model["meta_graphs"]:
        if set(meta_graph["tags"]) == wanted:
            break
    else:
        available = "; ".join(repr(_tag_label(m["tags"])) for m in model["meta_graphs"])
        raise SignatureError(
            f"SavedModel has no meta graph with tag set {_tag_label(sorted(wanted))!r}",
            f"its tag sets are: {available}",
        )
    signatures = meta_graph["signatures"]
    if signature_key not in signatures:
        # "__saved_model_init_op" is TF2's internal initializer entry, not a callable signature.
        public = sorted(k for k in signatures if not k.startswith("__"))
        hint = (
            f"its signatures are: {', '.join(repr(k) for k in public)}" if public
            else "it has no serving signatures; export it with signatures= (or keras model.export)"
        )
        raise SignatureError(
            f"SavedModel has no signature {signature_key!r} in tag set {_tag_label(meta_graph['tags'])!r}",
            hint,
        )
    return signatures[signature_key]


def read_signature_from_dir(
    path: str | os.PathLike[str],
    signature_key: str = "serving_default",
    tags: tuple[str, ...] | str = ("serve",),
) -> dict[str, Any]:
    """Read `<path>/saved_model.pb` from local disk and return `read_signature` of it."""
    text = os.fspath(path)
    if text.startswith("gs://"):
        raise SignatureError(
            f"{text} is a Cloud Storage path; read_signature_from_dir only reads local directories",
            "download saved_model.pb and pass its bytes to read_signature()",
        )
    directory = Path(text)
    pb = directory / SAVED_MODEL_PB
    if not pb.is_file():
        if (directory / SAVED_MODEL_PBTXT).is_file():
            raise SignatureError(
                f"the SavedModel at {directory} is text format (saved_model.pbtxt), which is not supported",
                "export the model in binary form (saved_model.pb)",
            )
        if directory.is_file():
            raise SignatureError(
                f"{directory} is a file, not a SavedModel directory",
                "pass the directory that contains saved_model.pb",
            )
        raise SignatureError(
            f"no SavedModel at {directory} (no saved_model.pb)",
            "check the path: it should be the export directory containing saved_model.pb and variables/",
        )
    try:
        data = pb.read_bytes()
    except OSError as e:
        raise SignatureError(f"cannot read {pb}: {e.strerror or e}", "check the file's permissions") from None
    try:
        return read_signature(data, signature_key, tags)
    except SignatureError as e:
        raise SignatureError(f"{pb}: {e.message}", e.hint) from None


def _shape_text(shape: list[int] | None) -> str:
    return "unknown_rank" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def signature_summary(sig: dict[str, Any]) -> str:
    """Render a signature compactly, one line per tensor, in saved_model_cli's notation."""
    lines = []
    for kind in ("inputs", "outputs"):
        for key, info in sorted(sig.get(kind, {}).items()):
            line = f"{kind}['{key}'] dtype: {info['dtype']} shape: {_shape_text(info['shape'])}"
            if info.get("encoding"):
                line += f" encoding: {info['encoding']}"
            lines.append(line)
    lines.append(f"method name: {sig.get('method_name', '')}")
    return "\n".join(lines)
