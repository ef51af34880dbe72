"""Read a TensorFlow SavedModel's input/output signature without importing TensorFlow.

`saved_model.pb` is a serialized `tensorflow.SavedModel` protocol buffer; `google.protobuf` decodes it
against the subset of TensorFlow's schema that holds the signatures (tensorflow/core/protobuf/
{saved_model,meta_graph}.proto, tensorflow/core/framework/{tensor_shape,types}.proto, TensorFlow 2.21:
the same package, message names and field numbers). Everything outside the subset, the large `graph_def`
and `object_graph_def` included, stays an unknown field: framed, skipped, never decoded.

The subset is built in code as a `FileDescriptorProto` in a private descriptor pool rather than compiled
from a vendored `.proto` to a generated `_pb2` module: there is no generated file to keep in step with the
protobuf runtime (generated code pins the runtime version it may run on), no protoc in the build, and a TF
process that has its own `tensorflow.*` messages loaded sees no clash. Two deliberate departures, neither
visible on the wire: string fields are `bytes` (so invalid UTF-8 is reported by field, not as a bare parse
error), and each `map<string, …>` is its repeated `…Entry` message without the map option (upb drops a map
entry that carries an unknown field, where TensorFlow's C++ loader keeps it; and repeated entries keep the
file's order, the last duplicate key winning as in a map). tests/test_signatures.py checks the subset
against TensorFlow's own descriptors.

Hostile input: the subset has no recursive message (`TensorInfo.CompositeTensor` is left empty, its
`components` would nest TensorInfo), so nesting is bounded by the schema; unknown groups nest at most to
upb's depth limit (100), past which protobuf refuses the bytes. Input over protobuf's 2 GiB message limit
is refused before parsing. Any refusal becomes a `SignatureError`; when protobuf refuses, a framing walk
over the same subset says what is wrong and at which byte.

Callers that keep models in Google Cloud Storage download the `saved_model.pb` bytes
themselves and pass them to `read_signature`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from model_registry.domain.errors import ArtifactError

__all__ = [
    "DATA_TYPES",
    "SignatureError",
    "parse_saved_model",
    "read_signature",
    "read_signature_from_dir",
    "saved_model_schema",
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

# The schema subset: message -> [(field, number, type[, oneof])], in package `tensorflow`. A type is a
# scalar, "DataType", or a message of this table; "repeated " marks a repeated field.
_PACKAGE = "tensorflow"
_MESSAGES: dict[str, list[tuple[Any, ...]]] = {
    "SavedModel": [("saved_model_schema_version", 1, "int64"), ("meta_graphs", 2, "repeated MetaGraphDef")],
    "MetaGraphDef": [
        ("meta_info_def", 1, "MetaGraphDef.MetaInfoDef"),
        ("signature_def", 5, "repeated MetaGraphDef.SignatureDefEntry"),
    ],
    "MetaGraphDef.MetaInfoDef": [("tags", 4, "repeated bytes")],
    "MetaGraphDef.SignatureDefEntry": [("key", 1, "bytes"), ("value", 2, "SignatureDef")],
    "SignatureDef": [
        ("inputs", 1, "repeated SignatureDef.InputsEntry"),
        ("outputs", 2, "repeated SignatureDef.OutputsEntry"),
        ("method_name", 3, "bytes"),
    ],
    "SignatureDef.InputsEntry": [("key", 1, "bytes"), ("value", 2, "TensorInfo")],
    "SignatureDef.OutputsEntry": [("key", 1, "bytes"), ("value", 2, "TensorInfo")],
    "TensorInfo": [
        ("name", 1, "bytes", "encoding"),
        ("coo_sparse", 4, "TensorInfo.CooSparse", "encoding"),
        ("composite_tensor", 5, "TensorInfo.CompositeTensor", "encoding"),
        ("dtype", 2, "DataType"),
        ("tensor_shape", 3, "TensorShapeProto"),
    ],
    "TensorInfo.CooSparse": [
        ("values_tensor_name", 1, "bytes"),
        ("indices_tensor_name", 2, "bytes"),
        ("dense_shape_tensor_name", 3, "bytes"),
    ],
    "TensorInfo.CompositeTensor": [],  # type_spec (1) and components (2) stay unknown: never read, not recursive
    "TensorShapeProto": [("dim", 2, "repeated TensorShapeProto.Dim"), ("unknown_rank", 3, "bool")],
    "TensorShapeProto.Dim": [("size", 1, "int64"), ("name", 2, "bytes")],
}
_SCALARS = {"int64": 3, "bool": 8, "bytes": 12}  # FieldDescriptorProto.Type numbers
_MAX_BYTES = (1 << 31) - 1  # protobuf's message size limit; TensorFlow refuses to write a larger SavedModel
_CORRUPT_HINT = (
    "the file is truncated, corrupt, or not a binary SavedModel; re-export the model "
    "(tf.saved_model.save or keras model.export) and upload saved_model.pb again"
)


def saved_model_schema() -> Any:
    """The schema subset as a `google.protobuf.descriptor_pb2.FileDescriptorProto` (TensorFlow's names and numbers)."""
    return schema_from_table("starchart/saved_model_subset.proto", _PACKAGE, _MESSAGES, _SCALARS,
                             {"DataType": DATA_TYPES})


def schema_from_table(file_name: str, package: str, messages: Mapping[str, Sequence[tuple[Any, ...]]],
                      scalars: Mapping[str, int], enums: Mapping[str, Mapping[int, str]] | None = None) -> Any:
    """A FileDescriptorProto from a table `message -> [(field, number, type[, oneof])]` ("repeated " marks a
    repeated field; other types are the table's messages, or `enums`), parents listed before nested messages."""
    from google.protobuf import descriptor_pb2  # imported on first use: importing this module stays light

    field_type = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name=file_name, package=package, syntax="proto3")
    for enum_name, values in (enums or {}).items():
        enum = proto.enum_type.add(name=enum_name)
        for number, name in sorted(values.items()):
            enum.value.add(name=name, number=number)
    made: dict[str, Any] = {}
    for full_name, fields in messages.items():
        parent, _, name = full_name.rpartition(".")
        message = made[full_name] = (made[parent].nested_type if parent else proto.message_type).add(name=name)
        oneofs: list[str] = []
        for field, number, kind, *oneof in fields:
            repeated = kind.startswith("repeated ")
            kind = kind.removeprefix("repeated ")
            spec = message.field.add(name=field, number=int(number),
                                     label=field_type.LABEL_REPEATED if repeated else field_type.LABEL_OPTIONAL)
            if kind in scalars:
                spec.type = scalars[kind]
            else:
                spec.type = field_type.TYPE_ENUM if kind in (enums or {}) else field_type.TYPE_MESSAGE
                spec.type_name = f".{package}.{kind}"
            if oneof:
                if oneof[0] not in oneofs:
                    oneofs.append(oneof[0])
                    message.oneof_decl.add(name=oneof[0])
                spec.oneof_index = oneofs.index(oneof[0])
    return proto


def message_class(schema: Any, full_name: str) -> Any:
    """The message class `full_name` of `schema`, in a pool of its own (a TF process's tensorflow.* never clash)."""
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


@functools.cache
def _saved_model_class() -> Any:
    """The message class for `tensorflow.SavedModel`, built once from `saved_model_schema()`."""
    return message_class(saved_model_schema(), f"{_PACKAGE}.SavedModel")


# ---------------------------------------------------------------------------------------------
# Why protobuf refused the bytes: a walk of the framing (tags and lengths) over the same subset, run
# only after a refusal, so the message can say what is wrong and where. It decodes no values.


class _Fault(Exception):
    """Internal: malformed wire data at byte offset `pos`."""

    def __init__(self, what: str, pos: int) -> None:
        super().__init__(f"{what} at byte {pos}")


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode an unsigned varint (at most 10 bytes); returns (value, new_pos)."""
    result = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise _Fault("truncated varint", start)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Fault("varint longer than 10 bytes", start)


@functools.cache
def _children(message: str) -> dict[int, str]:
    """Field number -> message type, for the message-typed fields of `message` in the subset."""
    out = {}
    for _field, number, kind, *_ in _MESSAGES[message]:
        kind = kind.removeprefix("repeated ")
        if kind in _MESSAGES:
            out[number] = kind
    return out


def _framing_fault(buf: bytes, pos: int, end: int, message: str = "SavedModel") -> None:
    """Raise _Fault at the first framing error in buf[pos:end], read as `message` (depth bounded by the subset)."""
    while pos < end:
        tag_pos = pos
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if tag > 0xFFFFFFFF or number == 0 or number >= 1 << 29:
            raise _Fault(f"invalid field number {number}", tag_pos)
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Fault(f"field {number} runs past the end of its message", tag_pos)
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Fault(f"field {number} runs past the end of its message", tag_pos)
            if number in _children(message):
                _framing_fault(buf, pos, pos + length, _children(message)[number])
            pos += length
        elif wire in (3, 4):
            raise _Fault("group fields are not used by SavedModel", tag_pos)
        else:
            raise _Fault(f"invalid wire type {wire}", tag_pos)


def _refusal(data: bytes, error: Exception) -> SignatureError:
    try:
        _framing_fault(data, 0, len(data))
        why = str(error).rpartition(": ")[2] or "malformed protocol buffer data"  # upb's own reason
    except _Fault as fault:
        why = str(fault)
    return SignatureError(f"saved_model.pb could not be decoded: {why}", _CORRUPT_HINT)


# ---------------------------------------------------------------------------------------------
# From messages to the dicts stored with versions and compared by diffs.


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureError(
            f"saved_model.pb could not be decoded: {what} {value[:40]!r} is not valid UTF-8", _CORRUPT_HINT
        ) from None


def _tensor(info: Any) -> dict[str, Any]:
    """TensorInfo -> {"dtype", "shape", "tensor"} (+ "encoding", "components" when not a named tensor)."""
    encoding = info.WhichOneof("encoding") or "name"
    shape = info.tensor_shape
    dims = None if shape.unknown_rank else [d.size for d in shape.dim]
    if encoding == "composite_tensor" and not info.HasField("tensor_shape"):
        dims = None  # TF leaves dtype/shape unset for composites; the type_spec has them.
    out: dict[str, Any] = {
        "dtype": DATA_TYPES.get(info.dtype, f"DT_UNKNOWN_{info.dtype}"),
        "shape": dims,
        "tensor": _text(info.name, "tensor name") if encoding == "name" else None,
    }
    if encoding == "coo_sparse":
        sparse = info.coo_sparse
        out["encoding"] = "coo_sparse"
        out["components"] = {
            "values": _text(sparse.values_tensor_name, "tensor name"),
            "indices": _text(sparse.indices_tensor_name, "tensor name"),
            "dense_shape": _text(sparse.dense_shape_tensor_name, "tensor name"),
        }
    elif encoding == "composite_tensor":
        out["encoding"] = "composite"
    return out


def _signature(sig: Any) -> dict[str, Any]:
    # Entries in file order; a repeated key replaces the earlier value in place, as a map does.
    return {
        "method_name": _text(sig.method_name, "method name"),
        "inputs": {_text(e.key, "input key"): _tensor(e.value) for e in sig.inputs},
        "outputs": {_text(e.key, "output key"): _tensor(e.value) for e in sig.outputs},
    }


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
    if len(data) > _MAX_BYTES:
        raise SignatureError(
            f"saved_model.pb is {len(data)} bytes, over protobuf's 2 GiB limit: not a SavedModel TensorFlow wrote",
            _CORRUPT_HINT,
        )
    if data[:256].lstrip().startswith((b"saved_model_schema_version", b"meta_graphs")):
        raise SignatureError(
            "this looks like a text-format SavedModel (saved_model.pbtxt), which is not supported",
            "export the model in binary form (saved_model.pb)",
        )
    from google.protobuf.message import DecodeError

    try:
        model = _saved_model_class().FromString(data)
    except DecodeError as e:
        raise _refusal(data, e) from None
    if not model.meta_graphs:
        raise SignatureError("saved_model.pb contains no meta graphs: not a SavedModel", _CORRUPT_HINT)
    meta_graphs = [
        {
            "tags": [_text(tag, "meta graph tag") for tag in meta_graph.meta_info_def.tags],
            "signatures": {_text(e.key, "signature key"): _signature(e.value) for e in meta_graph.signature_def},
        }
        for meta_graph in model.meta_graphs
    ]
    return {"schema_version": model.saved_model_schema_version, "meta_graphs": meta_graphs}


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
