"""Read a training's TensorBoard event files without TensorFlow: per-epoch scalars and the planned epoch count.

An event file (`events.out.tfevents.*`) is a TFRecord file: each record is a little-endian uint64 length, the
masked CRC32C of those 8 bytes, the data, and the masked CRC32C of the data. Both checksums are verified; a
record cut short at the end of the file is one the trainer is still writing and is left for the next read; any
other damage makes the file corrupt (`EventFileError`). Each record's data is a `tensorflow.Event`, decoded with
`google.protobuf` against the few fields used here (tensorflow/core/util/event.proto,
tensorflow/core/framework/{summary,tensor}.proto, TensorFlow 2.21: package, names and field numbers as there),
built in code in a private descriptor pool as `signatures.py` does for the SavedModel. TensorBoard's own
`tensorboard.compat.proto` classes would do too, but the package is not needed by anything else here; the
subset's one departure is `TensorProto.dtype` read as its int32 wire value instead of the enum.

Trainers write the layout of Keras' TensorBoard callback: a `train/` and a `validation/` run, tags `epoch_<metric>`
at step = epoch index; scalars as a `simple_value` or a one-element tensor. The planned epoch count is the tag
`planned_epochs` (the shipped trainers write it at step 0 of the `train/` run before the first epoch).
"""

from __future__ import annotations

import functools
import posixpath
import struct
from typing import Any, Iterator

from model_registry.adapters.signatures import message_class, schema_from_table
from model_registry.adapters.storage import Storage
from model_registry.domain.errors import ArtifactError
from model_registry.domain.progress import Series, TrainingCurves

PLANNED_EPOCHS = "planned_epochs"
EPOCH_TAG = "epoch_"
_PACKAGE = "tensorflow"
_HINT = "the event file is damaged; progress and curves of this training are not shown (training is unaffected)"


class EventFileError(ArtifactError):
    """An event file whose records or events cannot be read."""


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC32C rotated right by 15 bits plus a constant (tensorflow/core/lib/hash/crc32c.h)."""
    import google_crc32c  # here: only what reads event files loads it

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records(data: bytes, name: str = "event file") -> Iterator[bytes]:
    """The complete records of a TFRecord file, checksums verified; a torn last record is not returned."""
    pos, size = 0, len(data)
    while size - pos >= 12:
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if masked_crc32c(header) != header_crc:
            raise EventFileError(f"{name}: the length of the record at byte {pos} fails its checksum", _HINT)
        end = pos + 12 + length + 4
        if end > size:
            return  # being written: the rest arrives with the next flush
        payload = data[pos + 12:end - 4]
        (data_crc,) = struct.unpack("<I", data[end - 4:end])
        if masked_crc32c(payload) != data_crc:
            raise EventFileError(f"{name}: the record at byte {pos} fails its checksum", _HINT)
        yield payload
        pos = end


# message -> [(field, number, type[, oneof])]; "repeated " marks a repeated field, other types are this table's
_MESSAGES: dict[str, list[tuple[str, ...]]] = {
    "Event": [("wall_time", "1", "double"), ("step", "2", "int64"), ("file_version", "3", "string", "what"),
              ("summary", "5", "Summary", "what")],
    "Summary": [("value", "1", "repeated Summary.Value")],
    "Summary.Value": [("node_name", "7", "string"), ("tag", "1", "string"), ("metadata", "9", "SummaryMetadata"),
                      ("simple_value", "2", "float", "value"), ("tensor", "8", "TensorProto", "value")],
    "SummaryMetadata": [("plugin_data", "1", "SummaryMetadata.PluginData")],
    "SummaryMetadata.PluginData": [("plugin_name", "1", "string"), ("content", "2", "bytes")],
    "TensorProto": [("dtype", "1", "int32"), ("tensor_content", "4", "bytes"), ("float_val", "5", "repeated float"),
                    ("double_val", "6", "repeated double"), ("int_val", "7", "repeated int32"),
                    ("int64_val", "10", "repeated int64")],
}
_SCALARS = {"double": 1, "float": 2, "int64": 3, "int32": 5, "string": 9, "bytes": 12}  # FieldDescriptorProto.Type
# DataType -> (struct format of one element in tensor_content, the repeated field holding values)
_DTYPES = {1: ("<f", "float_val"), 2: ("<d", "double_val"), 3: ("<i", "int_val"), 9: ("<q", "int64_val")}


def event_schema() -> Any:
    """The subset as a `google.protobuf.descriptor_pb2.FileDescriptorProto` (TensorFlow's names and numbers)."""
    return schema_from_table("starchart/event_subset.proto", _PACKAGE, _MESSAGES, _SCALARS)


@functools.cache
def _event_class() -> Any:
    return message_class(event_schema(), f"{_PACKAGE}.Event")


def _scalar(value: Any) -> float | None:
    """The number a summary value holds, if it is a scalar of a numeric type."""
    if value.WhichOneof("value") == "simple_value":
        return float(value.simple_value)
    if value.WhichOneof("value") != "tensor" or value.tensor.dtype not in _DTYPES:
        return None
    fmt, repeated = _DTYPES[value.tensor.dtype]
    content = value.tensor.tensor_content
    if content:
        return float(struct.unpack(fmt, content)[0]) if len(content) == struct.calcsize(fmt) else None
    values = getattr(value.tensor, repeated)
    return float(values[0]) if len(values) == 1 else None


def scalars(data: bytes, name: str = "event file") -> Iterator[tuple[str, int, float]]:
    """(tag, step, value) of every scalar summary in an event file's bytes."""
    from google.protobuf.message import DecodeError

    event_class = _event_class()
    for record in records(data, name):
        try:
            event = event_class.FromString(record)
        except DecodeError as exc:
            raise EventFileError(f"{name}: a record is not an Event ({exc})", _HINT) from None
        for value in event.summary.value:
            number = _scalar(value)
            if number is not None:
                yield value.tag, event.step, number


def read_log_dir(storage: Storage, log_dir: str) -> TrainingCurves | None:
    """The curves in a TensorBoard log folder (local or gs://); None when it holds no event file."""
    files = [f for f in storage.list_files(log_dir) if ".tfevents." in posixpath.basename(f)]
    if not files:
        return None
    runs: dict[str, dict[str, dict[int, float]]] = {}
    planned: int | None = None
    for rel in sorted(files):  # by run, then by the file's creation time in its name: a later value wins
        run = posixpath.dirname(rel) or "."
        data = storage.read_bytes(storage.join(log_dir, rel))
        for tag, step, value in scalars(data, rel):
            if tag == PLANNED_EPOCHS:
                planned = int(value) if value >= 1 and value == int(value) else planned
            elif tag.startswith(EPOCH_TAG) and step >= 0:
                runs.setdefault(run, {}).setdefault(tag[len(EPOCH_TAG):], {})[step] = value
    series: dict[str, dict[str, Series]] = {
        run: {metric: tuple(sorted(by_step.items())) for metric, by_step in metrics.items()}
        for run, metrics in runs.items()}
    return TrainingCurves(series, planned)
