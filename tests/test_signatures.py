"""model_registry.adapters.signatures: a SavedModel signature reader on google.protobuf, checked against saved_model_cli.

SavedModels are built once per module by a TensorFlow subprocess (so this test process never
imports TensorFlow), then every signature is compared with `saved_model_cli show` output, and the
schema subset the reader decodes with is compared with TensorFlow's own descriptors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import made_once

from model_registry.adapters import signatures
from model_registry.adapters.signatures import (
    DATA_TYPES,
    SignatureError,
    parse_saved_model,
    read_signature,
    read_signature_from_dir,
    saved_model_schema,
    signature_summary,
)
from model_registry.domain.errors import ArtifactError

REPO = Path(__file__).resolve().parents[1]
HAVE_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(not HAVE_TF, reason="tensorflow is not installed")
TF_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


# ---------------------------------------------------------------------------------------------
# A tiny protobuf encoder, for hand-made SavedModels with wire-format edge cases.


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 -> 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def vint(number: int, value: int) -> bytes:
    return _key(number, 0) + _varint(value)


def ld(number: int, payload: bytes | str) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return _key(number, 2) + _varint(len(payload)) + payload


# Unknown fields of every wire type, sprinkled into every message below.
JUNK = (
    vint(1000, 2**63 + 5)
    + _key(1001, 1) + struct.pack("<d", 3.5)
    + ld(1002, b"\xff\x00not a message\x07")
    + _key(1003, 5) + struct.pack("<f", 1.25)
)


def dim(size: int, name: str = "") -> bytes:
    return ld(2, JUNK + vint(1, size) + (ld(2, name) if name else b""))


def tensor_info(name: str, dtype: int, *shape_parts: bytes) -> bytes:
    return JUNK + ld(1, name) + vint(2, dtype) + b"".join(ld(3, part) for part in shape_parts)


def entry(key: str, value: bytes) -> bytes:
    # No JUNK inside map entries: upb (Python protobuf >= 4, so saved_model_cli) drops a map entry
    # that has unknown fields, while C++ and pure-Python protobuf keep it. See
    # test_unknown_fields_inside_map_entry.
    return ld(1, key) + ld(2, value)


def synthetic_saved_model() -> bytes:
    """A SavedModel whose signature exercises unknown fields, merging, oneofs and -1 dims."""
    inputs = [
        # tensor_shape given twice: protobuf merges it, so the dims concatenate to (-1, 4).
        entry("x", tensor_info("in_x:0", 1, dim(-1, "batch"), dim(4) + JUNK)),
        entry("scalar", tensor_info("in_s:0", 9, b"")),
        entry("any", tensor_info("in_any:0", 14, vint(3, 1))),
        entry("big", tensor_info("in_big:0", 18, dim(-1) + dim(2**40) + dim(0))),
        # Duplicate map key: the last entry wins.
        entry("dup", tensor_info("dup_old:0", 3, dim(1))),
        entry("dup", tensor_info("dup_new:0", 7, dim(2))),
        # A known field (dtype) with the wrong wire type is an unknown field; 19 still applies.
        entry("wrongwire", ld(2, b"\x05") + tensor_info("in_h:0", 19, dim(3))),
        # oneof encoding: the last member set wins (name, then coo_sparse -> coo_sparse).
        entry("sparse", tensor_info("overridden:0", 1, dim(-1) + dim(10))
              + ld(4, ld(1, "sp/values:0") + ld(2, "sp/indices:0") + ld(3, "sp/shape:0") + JUNK)),
    ]
    outputs = [entry("y", tensor_info("out_y:0", 2, dim(-1) + dim(1)))]
    signature = (
        b"".join(ld(1, e) for e in inputs) + JUNK + b"".join(ld(2, e) for e in outputs)
        + ld(3, "tensorflow/serving/regress")
    )
    meta_graph = (
        ld(1, JUNK + ld(4, "serve"))                 # meta_info_def, in two pieces that merge
        + ld(1, ld(5, "2.21.0") + ld(4, "extra"))
        + ld(5, entry("serving_default", signature))
        + ld(5, entry("other", ld(3, "m")))
        + JUNK
    )
    return vint(1, 1) + JUNK + ld(2, meta_graph) + ld(2, ld(1, ld(4, "train")))


SYNTHETIC_TAGS = ("serve", "extra")

# ---------------------------------------------------------------------------------------------
# Building real SavedModels (in a TensorFlow subprocess) and reading them with saved_model_cli.

BUILD_SCRIPT = textwrap.dedent('''
    import os, sys
    import tensorflow as tf
    out = sys.argv[1]

    class Multi(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.ones([4, 1]))

        @tf.function(input_signature=[
            tf.TensorSpec([None, 4], tf.float32, name="x"),
            tf.TensorSpec([None], tf.string, name="name"),
            tf.TensorSpec([], tf.int64, name="k"),
            tf.TensorSpec(None, tf.float32, name="anything"),
            tf.TensorSpec([2, None, 3], tf.float16, name="h"),
        ])
        def serve(self, x, name, k, anything, h):
            return {"y": tf.matmul(x, self.w), "n": tf.strings.length(name), "k2": k * 2,
                    "a": tf.reduce_sum(anything), "hh": tf.cast(h, tf.float64)}

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def score(self, x):
            return {"score": tf.reduce_sum(x, axis=1),
                    "idx": tf.argmax(x, axis=1, output_type=tf.int32)}

    m = Multi()
    tf.saved_model.save(m, os.path.join(out, "multi"),
                        signatures={"serving_default": m.serve, "score": m.score})

    # TF1-style: sparse and ragged TensorInfos, and several meta graphs with different tag sets.
    v1 = tf.compat.v1
    with tf.Graph().as_default() as g:
        sp = v1.sparse_placeholder(tf.float32, shape=[None, 10], name="sp")
        rg = tf.RaggedTensor.from_row_lengths(v1.placeholder(tf.int32, [None], name="vals"),
                                              v1.placeholder(tf.int64, [None], name="lens"))
        dense = v1.placeholder(tf.float32, [None, 3], name="dense")
        info = v1.saved_model.build_tensor_info
        build = v1.saved_model.signature_def_utils.build_signature_def
        sig = build(inputs={"sp": info(sp), "rg": info(rg), "dense": info(dense)},
                    outputs={"total": info(tf.sparse.reduce_sum(sp, axis=1) + tf.reduce_sum(dense, 1)),
                             "rg_out": info(rg * 2)},
                    method_name="tensorflow/serving/predict")
        cls = build(inputs={"dense": info(dense)}, outputs={"scores": info(tf.nn.softmax(dense))},
                    method_name="tensorflow/serving/classify")
        with v1.Session(graph=g) as sess:
            b = v1.saved_model.Builder(os.path.join(out, "v1"))
            b.add_meta_graph_and_variables(
                sess, ["serve"], signature_def_map={"serving_default": sig, "classify": cls})
            b.add_meta_graph(["serve", "gpu"], signature_def_map={"gpu_sig": cls})
            b.add_meta_graph(["train"], signature_def_map={})
            b.save()

    import keras
    inp = keras.Input(shape=(4,), name="features")
    hidden = keras.layers.Dense(8, activation="relu")(inp)
    model = keras.Model(inp, keras.layers.Dense(3, name="probs")(hidden))
    model.export(os.path.join(out, "keras"), format="tf_saved_model", verbose=False)
''')

# (model dir, tag set as saved_model_cli takes it, signature key)
CLI_CASES = [
    ("multi", "serve", "serving_default"),
    ("multi", "serve", "score"),
    ("multi", "serve", "__saved_model_init_op"),
    ("v1", "serve", "serving_default"),
    ("v1", "gpu,serve", "gpu_sig"),
    ("keras", "serve", "serving_default"),
    ("keras", "serve", "serve"),
    ("synthetic", ",".join(SYNTHETIC_TAGS), "serving_default"),
]

CLI_MODELS = list(dict.fromkeys(case[0] for case in CLI_CASES))  # each SavedModel once, in CLI_CASES' order


def _saved_model_cli() -> str:
    local = Path(sys.executable).with_name("saved_model_cli")
    found = str(local) if local.exists() else shutil.which("saved_model_cli")
    if not found:
        pytest.skip("saved_model_cli is not installed")
    return found


def _build_models(root: Path) -> None:
    script = root / "build.py"
    script.write_text(BUILD_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(root)], check=False, env=TF_ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"building SavedModels failed:\n{proc.stderr[-4000:]}"
    (root / "synthetic").mkdir()
    (root / "synthetic" / "saved_model.pb").write_bytes(synthetic_saved_model())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """The SavedModels, built once per test run: real ones with TensorFlow, plus the hand-made one."""
    if not HAVE_TF:
        pytest.skip("tensorflow is not installed")
    return made_once(tmp_path_factory, "signature-saved-models", _build_models)


def _show_all(models: Path, exe: str, out: Path) -> None:
    """`saved_model_cli show --all` of each SavedModel, run in parallel (each starts TensorFlow), into out/MODEL."""
    procs = {
        model: subprocess.Popen([exe, "show", "--dir", str(models / model), "--all"],
                                env=TF_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for model in CLI_MODELS
    }
    for model, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"saved_model_cli show --all of {model} failed:\n{stderr[-3000:]}"
        (out / model).write_text(stdout)


@pytest.fixture(scope="module")
def cli_output(models, tmp_path_factory) -> dict[tuple[str, str, str], str]:
    """saved_model_cli's output for every CLI_CASE: one `show --all` per SavedModel (once per test run), cut into
    its signatures."""
    exe = _saved_model_cli()
    shown_dir = made_once(tmp_path_factory, "saved-model-cli-show", lambda out: _show_all(models, exe, out))
    shown = {(model, *where): text
             for model in CLI_MODELS
             for where, text in signature_sections((shown_dir / model).read_text()).items()}
    out = {}
    for case in CLI_CASES:
        model, tag_set, key = case
        out[case] = shown.get((model, frozenset(tag_set.split(",")), key), "")
        assert out[case], f"saved_model_cli show --all of {model} has no signature {key} for tags {tag_set}"
    return out


def signature_sections(text: str) -> dict[tuple[frozenset[str], str], str]:
    """`saved_model_cli show --all` output cut into (tag set, signature key) -> that signature's lines."""
    sections: dict[tuple[frozenset[str], str], list[str]] = {}
    tags: frozenset[str] = frozenset()
    current: list[str] | None = None
    for line in text.splitlines():
        if m := re.match(r"^MetaGraphDef with tag-set: '(.*)' contains the following SignatureDefs:$", line):
            tags, current = frozenset(t.strip() for t in m[1].split(",")), None
        elif m := re.match(r"^signature_def\['(.*)'\]:$", line):
            current = sections.setdefault((tags, m[1]), [])
        elif current is not None:
            current.append(line)
            if line.strip().startswith("Method name is:"):
                current = None  # what follows (the meta graph's ops, concrete functions) is not this signature's
    return {where: "\n".join(lines) for where, lines in sections.items()}


def parse_cli(text: str) -> dict:
    """Parse one signature of `saved_model_cli show` output into read_signature's shape."""
    sig: dict = {"inputs": {}, "outputs": {}, "method_name": None}
    current = None
    for line in text.splitlines():
        if m := re.match(r"^\s*(inputs|outputs)\['(.*)'\] tensor_info:$", line):
            current = sig[m[1]][m[2]] = {}
        elif m := re.match(r"^\s*dtype: (\S+)$", line):
            current["dtype"] = m[1]
        elif m := re.match(r"^\s*shape: (.*)$", line):
            text_shape = m[1].strip()
            current["shape"] = None if text_shape == "unknown_rank" else [
                int(d) for d in text_shape.strip("()").split(",") if d.strip()]
        elif m := re.match(r"^\s*name: ?(.*)$", line):
            current["tensor"] = m[1]
        elif m := re.match(r"^\s*Method name is: ?(.*)$", line):
            sig["method_name"] = m[1]
    assert sig["method_name"] is not None, f"unrecognised saved_model_cli output:\n{text}"
    return sig


def as_cli_sees_it(sig: dict) -> dict:
    """Our signature in saved_model_cli's terms: it prints name '' for sparse/composite tensors,
    and a composite's unset shape as ()."""
    def tensor(info: dict) -> dict:
        shape = info["shape"]
        if info.get("encoding") == "composite" and shape is None:
            shape = []
        return {"dtype": info["dtype"], "shape": shape, "tensor": info["tensor"] or ""}
    return {
        "method_name": sig["method_name"],
        "inputs": {k: tensor(v) for k, v in sig["inputs"].items()},
        "outputs": {k: tensor(v) for k, v in sig["outputs"].items()},
    }


# ---------------------------------------------------------------------------------------------
# Agreement with saved_model_cli


@needs_tf
@pytest.mark.parametrize("case", CLI_CASES, ids=["/".join(c) for c in CLI_CASES])
def test_matches_saved_model_cli(models, cli_output, case):
    model, tag_set, key = case
    ours = read_signature_from_dir(models / model, key, tags=tuple(tag_set.split(",")))
    assert set(ours) == {"method_name", "inputs", "outputs"}
    expected = parse_cli(cli_output[case])
    assert as_cli_sees_it(ours) == expected
    for info in [*ours["inputs"].values(), *ours["outputs"].values()]:
        if not info.get("encoding"):
            assert set(info) == {"dtype", "shape", "tensor"}


@needs_tf
def test_tf_module_signature_contents(models):
    sig = read_signature_from_dir(models / "multi")
    assert sig["method_name"] == "tensorflow/serving/predict"
    assert sig["inputs"]["x"] == {"dtype": "DT_FLOAT", "shape": [-1, 4], "tensor": "serving_default_x:0"}
    assert sig["inputs"]["name"] == {"dtype": "DT_STRING", "shape": [-1], "tensor": "serving_default_name:0"}
    assert sig["inputs"]["k"]["shape"] == [] and sig["inputs"]["k"]["dtype"] == "DT_INT64"
    assert sig["inputs"]["anything"]["shape"] is None
    assert sig["inputs"]["h"] == {"dtype": "DT_HALF", "shape": [2, -1, 3], "tensor": "serving_default_h:0"}
    assert sorted(sig["outputs"]) == ["a", "hh", "k2", "n", "y"]
    score = read_signature_from_dir(models / "multi", "score")
    assert score["outputs"]["idx"]["dtype"] == "DT_INT32"


@needs_tf
def test_keras_export(models):
    sig = read_signature_from_dir(models / "keras")
    out_tensor = sig["outputs"]["output_0"]["tensor"]
    assert sig == {
        "method_name": "tensorflow/serving/predict",
        "inputs": {"features": {"dtype": "DT_FLOAT", "shape": [-1, 4], "tensor": "serving_default_features:0"}},
        "outputs": {"output_0": {"dtype": "DT_FLOAT", "shape": [-1, 3], "tensor": out_tensor}},
    }
    assert out_tensor.startswith("StatefulPartitionedCall")
    # Keras exports the same function under "serve" too.
    assert read_signature_from_dir(models / "keras", "serve")["inputs"].keys() == {"features"}


@needs_tf
def test_sparse_ragged_and_tag_sets(models):
    data = (models / "v1" / "saved_model.pb").read_bytes()
    model = parse_saved_model(data)
    assert [sorted(m["tags"]) for m in model["meta_graphs"]] == [["serve"], ["gpu", "serve"], ["train"]]
    assert model["schema_version"] == 1
    sig = read_signature(data)
    assert sig["inputs"]["sp"] == {
        "dtype": "DT_FLOAT", "shape": [-1, 10], "tensor": None, "encoding": "coo_sparse",
        "components": {"values": "sp/values:0", "indices": "sp/indices:0", "dense_shape": "sp/shape:0"},
    }
    assert sig["inputs"]["rg"] == {"dtype": "DT_INVALID", "shape": None, "tensor": None, "encoding": "composite"}
    # Tag sets match as sets; a comma-separated string works as in saved_model_cli.
    for tags in [("serve", "gpu"), ("gpu", "serve"), "gpu,serve"]:
        assert read_signature(data, "gpu_sig", tags)["method_name"] == "tensorflow/serving/classify"


def test_synthetic_wire_format_edge_cases():
    """Unknown fields of all wire types, merged messages, duplicate keys, oneof overrides."""
    data = synthetic_saved_model()
    sig = read_signature(data, tags=SYNTHETIC_TAGS)
    assert sig["method_name"] == "tensorflow/serving/regress"
    i = sig["inputs"]
    assert list(i) == ["x", "scalar", "any", "big", "dup", "wrongwire", "sparse"]
    assert i["x"] == {"dtype": "DT_FLOAT", "shape": [-1, 4], "tensor": "in_x:0"}
    assert i["scalar"] == {"dtype": "DT_INT64", "shape": [], "tensor": "in_s:0"}
    assert i["any"] == {"dtype": "DT_BFLOAT16", "shape": None, "tensor": "in_any:0"}
    assert i["big"] == {"dtype": "DT_COMPLEX128", "shape": [-1, 2**40, 0], "tensor": "in_big:0"}
    assert i["dup"] == {"dtype": "DT_STRING", "shape": [2], "tensor": "dup_new:0"}
    assert i["wrongwire"]["dtype"] == "DT_HALF"
    assert i["sparse"]["encoding"] == "coo_sparse" and i["sparse"]["tensor"] is None
    assert sig["outputs"]["y"] == {"dtype": "DT_DOUBLE", "shape": [-1, 1], "tensor": "out_y:0"}
    model = parse_saved_model(data)
    assert [m["tags"] for m in model["meta_graphs"]] == [["serve", "extra"], ["train"]]
    assert read_signature(data, "other", ("extra", "serve")) == {"method_name": "m", "inputs": {}, "outputs": {}}


def test_unknown_fields_inside_map_entry():
    """An unknown field inside a map *entry* is ignored and the entry kept, as C++ protobuf does
    (TF's loader, TF Serving; checked via TF's C++ fingerprinting). upb instead drops the entry,
    so saved_model_cli would not list it."""
    sig = ld(1, ld(1, "x") + JUNK + ld(2, tensor_info("x:0", 1, dim(-1))) + JUNK) + ld(3, "p")
    data = ld(2, ld(1, ld(4, "serve")) + ld(5, ld(1, "serving_default") + JUNK + ld(2, sig)))
    assert read_signature(data)["inputs"] == {"x": {"dtype": "DT_FLOAT", "shape": [-1], "tensor": "x:0"}}


def test_unknown_dtype_is_reported_not_fatal():
    data = vint(1, 1) + ld(2, ld(1, ld(4, "serve")) + ld(5, entry("serving_default", ld(
        1, entry("x", tensor_info("x:0", 77, dim(1)))) + ld(1, entry("r", tensor_info("r:0", 101))))))
    sig = read_signature(data)
    assert sig["inputs"]["x"]["dtype"] == "DT_UNKNOWN_77"
    assert sig["inputs"]["r"] == {"dtype": "DT_FLOAT_REF", "shape": [], "tensor": "r:0"}


@needs_tf
def test_signature_summary(models):
    text = signature_summary(read_signature_from_dir(models / "multi"))
    lines = text.splitlines()
    assert "inputs['x'] dtype: DT_FLOAT shape: (-1, 4)" in lines
    assert "inputs['name'] dtype: DT_STRING shape: (-1)" in lines
    assert "inputs['k'] dtype: DT_INT64 shape: ()" in lines
    assert "inputs['anything'] dtype: DT_FLOAT shape: unknown_rank" in lines
    assert "outputs['y'] dtype: DT_FLOAT shape: (-1, 1)" in lines
    assert lines[-1] == "method name: tensorflow/serving/predict"
    assert lines.index("inputs['anything'] dtype: DT_FLOAT shape: unknown_rank") == 0  # sorted
    sparse = signature_summary(read_signature_from_dir(models / "v1"))
    assert "inputs['sp'] dtype: DT_FLOAT shape: (-1, 10) encoding: coo_sparse" in sparse.splitlines()


# ---------------------------------------------------------------------------------------------
# Refusals: always SignatureError (an ArtifactError) with a message and a hint


def assert_refused(data: bytes, *args, match: str | None = None) -> SignatureError:
    with pytest.raises(SignatureError, match=match) as exc:
        read_signature(data, *args)
    assert isinstance(exc.value, ArtifactError)
    assert exc.value.message and exc.value.hint
    return exc.value


def test_empty_and_random_bytes():
    assert_refused(b"", match="empty")
    rng = random.Random(1234)
    for n in [1, 2, 3, 7, 64, 1000, 65536]:
        for _ in range(20):
            assert_refused(rng.randbytes(n))


@pytest.mark.parametrize("data, match", [
    (b"\x1b\x00", "group"),                                       # field 3, start-group
    (b"\x0e", "wire type"),                                       # wire type 6
    (b"\x0f", "wire type"),                                       # wire type 7
    (b"\x00\x01", "field number 0"),
    (b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
    (b"\x08\xff\xff", "truncated varint"),
    (b"\x12\x05ab", "past the end"),
    (b"\x09abc", "past the end"),                                  # fixed64 cut short
    (b"\x0dab", "past the end"),                                   # fixed32 cut short
    (ld(2, ld(1, ld(4, b"\xff\xfe"))), "UTF-8"),
    (ld(2, ld(1, ld(4, "serve")) + ld(5, ld(1, "k") + b"\x12\x09" + ld(1, "x"))), "past the end"),
    (vint(1, 1), "no meta graphs"),
    (b"saved_model_schema_version: 1\nmeta_graphs {\n", "text-format"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00", None),               # a .keras zip
    (b"\x89HDF\r\n\x1a\n\x00\x00", None),                         # an .h5 file
])
def test_corrupt_wire_data(data, match):
    assert_refused(data, match=match)


@needs_tf
def test_truncated_saved_model(models):
    data = (models / "multi" / "saved_model.pb").read_bytes()
    sig_at = data.find(b"serving_default_x")
    cuts = {1, 2, 3, 5, 17, len(data) // 4, len(data) // 2, sig_at, sig_at + 7, len(data) - 2, len(data) - 1}
    for cut in sorted(cuts):
        assert_refused(data[:cut], match="could not be decoded|no meta graphs")


@needs_tf
def test_missing_tag_set_and_signature_key(models):
    data = (models / "v1" / "saved_model.pb").read_bytes()
    err = assert_refused(data, "serving_default", ("gpu",), match="no meta graph with tag set 'gpu'")
    assert "'serve'" in err.hint and "'serve,gpu'" in err.hint and "'train'" in err.hint
    err = assert_refused(data, "predict", match="no signature 'predict'")
    assert "'classify'" in err.hint and "'serving_default'" in err.hint
    err = assert_refused(data, "serving_default", ("train",), match="no signature")
    assert "no serving signatures" in err.hint
    multi = (models / "multi" / "saved_model.pb").read_bytes()
    err = assert_refused(multi, "nope")
    assert "'score'" in err.hint and "__saved_model_init_op" not in err.hint


def test_directory_problems(tmp_path):
    with pytest.raises(SignatureError, match="no SavedModel at") as exc:
        read_signature_from_dir(tmp_path)
    assert str(tmp_path) in exc.value.message
    with pytest.raises(SignatureError, match="no SavedModel at"):
        read_signature_from_dir(tmp_path / "does-not-exist")
    (tmp_path / "saved_model.pbtxt").write_text("saved_model_schema_version: 1\n")
    with pytest.raises(SignatureError, match="saved_model.pbtxt.*not supported"):
        read_signature_from_dir(tmp_path)
    a_file = tmp_path / "model.keras"
    a_file.write_bytes(b"PK\x03\x04")
    with pytest.raises(SignatureError, match="is a file"):
        read_signature_from_dir(a_file)
    with pytest.raises(SignatureError, match="Cloud Storage"):
        read_signature_from_dir("gs://bucket/models/m/1")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "saved_model.pb").write_bytes(b"\x12\x05ab")
    with pytest.raises(SignatureError, match=r"saved_model\.pb: saved_model\.pb could not be decoded"):
        read_signature_from_dir(tmp_path / "bad")


@needs_tf
def test_fuzz_single_byte_mutations(models):
    data = (models / "multi" / "saved_model.pb").read_bytes()
    rng = random.Random(20240601)
    sig_at = data.find(b"serving_default_x")
    # Most of the file is graph_def, which is skipped whole; aim most mutations at the framing
    # (first bytes) and the signature_def region, where the decoder actually looks.
    positions = (
        [rng.randrange(len(data)) for _ in range(100)]
        + [rng.randrange(min(48, len(data))) for _ in range(50)]
        + [rng.randrange(max(0, sig_at - 1500), min(len(data), sig_at + 1500)) for _ in range(150)]
    )
    outcomes = {"parsed": 0, "refused": 0}
    for pos in positions:
        mutated = bytearray(data)
        mutated[pos] = (mutated[pos] + rng.randrange(1, 256)) % 256
        try:
            sig = read_signature(bytes(mutated))
        except SignatureError as e:
            assert e.message and e.hint
            outcomes["refused"] += 1
        else:
            assert set(sig) == {"method_name", "inputs", "outputs"}
            outcomes["parsed"] += 1
    assert sum(outcomes.values()) == 300 and outcomes["refused"] > 0


def test_every_refusal_names_its_fault():
    """When protobuf refuses the bytes, the framing walk says what is wrong and where (never a bare parse error)."""
    rng = random.Random(77)
    base = synthetic_saved_model()
    decoded_refusals = 0
    for i in range(3000):
        if i % 3 == 0:
            data = rng.randbytes(rng.choice([2, 9, 100, 1000]))
        else:
            mutated = bytearray(base)
            for _ in range(rng.randint(1, 3)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            data = bytes(mutated[: rng.randrange(1, len(mutated) + 1)] if i % 3 == 2 else mutated)
        try:
            read_signature(data, tags=SYNTHETIC_TAGS)
        except SignatureError as e:
            assert e.message and e.hint
            if "could not be decoded" in e.message:
                decoded_refusals += 1
                assert re.search(r"at byte \d+$|is not valid UTF-8$", e.message), e.message
    assert decoded_refusals > 500


def test_hostile_nesting_is_refused_or_skipped_quickly():
    start = time.monotonic()
    # Start-group tags nested far past protobuf's depth limit, at the top and inside a signature.
    assert_refused(b"\x1b" * 200_000, match="group fields are not used by SavedModel at byte 0")
    inside = ld(2, ld(1, ld(4, "serve")) + ld(5, entry("serving_default", ld(1, entry("x", b"\x1b" * 5000)))))
    at = inside.index(b"\x1b")
    assert_refused(inside, match=f"group fields are not used by SavedModel at byte {at} ")
    # Length-delimited nesting below a field the schema subset leaves unknown (a composite's components):
    # never descended into, so it costs one skip, whatever its depth.
    nested = b""
    for _ in range(3000):
        nested = ld(5, ld(2, nested))
    data = ld(2, ld(1, ld(4, "serve")) + ld(5, entry("serving_default", ld(1, entry("c", nested)))))
    assert read_signature(data)["inputs"]["c"] == {
        "dtype": "DT_INVALID", "shape": None, "tensor": None, "encoding": "composite"}
    assert time.monotonic() - start < 10


def test_well_formed_unknown_group_is_ignored():
    """A group in an unknown field is ignored like any unknown field, as TensorFlow's own parser does."""
    group = _key(1004, 3) + vint(1, 5) + ld(2, "g") + _key(1004, 4)
    plain = ld(2, ld(1, ld(4, "serve")) + ld(5, entry("serving_default", ld(3, "m"))))
    grouped = group + ld(2, ld(1, group + ld(4, "serve")) + group + ld(5, entry("serving_default", ld(3, "m") + group)))
    assert read_signature(grouped) == read_signature(plain) == {"method_name": "m", "inputs": {}, "outputs": {}}


def test_input_over_protobufs_size_limit_is_refused(monkeypatch):
    data = synthetic_saved_model()
    monkeypatch.setattr(signatures, "_MAX_BYTES", len(data) - 1)
    assert_refused(data, match="over protobuf's 2 GiB limit")
    monkeypatch.setattr(signatures, "_MAX_BYTES", len(data))
    assert read_signature(data, tags=SYNTHETIC_TAGS)["method_name"] == "tensorflow/serving/regress"


# Runs in a TensorFlow subprocess: TensorFlow's descriptors for the messages of the reader's subset.
TF_SCHEMA_SCRIPT = textwrap.dedent("""
    import json, sys
    from google.protobuf import descriptor_pb2
    from tensorflow.core.protobuf import saved_model_pb2
    mine = descriptor_pb2.FileDescriptorProto.FromString(open(sys.argv[1], "rb").read())
    pool = saved_model_pb2.DESCRIPTOR.pool
    def walk(messages, prefix):
        for m in messages:
            yield prefix + m.name
            yield from walk(m.nested_type, prefix + m.name + ".")
    out = {"messages": {}, "enum": {v.name: v.number for v in pool.FindEnumTypeByName("tensorflow.DataType").values}}
    for name in walk(mine.message_type, mine.package + "."):
        d = pool.FindMessageTypeByName(name)
        out["messages"][name] = {f.name: [f.number, f.type, f.is_repeated, f.message_type and f.message_type.full_name,
                                         f.enum_type and f.enum_type.full_name,
                                         f.containing_oneof and f.containing_oneof.name] for f in d.fields}
    print(json.dumps(out))
""")


@needs_tf
def test_schema_subset_matches_tensorflows_descriptors(tmp_path):
    """Every message, field number, type and oneof of the subset is TensorFlow's; strings are read as bytes."""
    from google.protobuf import descriptor_pool

    schema = saved_model_schema()
    (tmp_path / "subset.pb").write_bytes(schema.SerializeToString())
    proc = subprocess.run([sys.executable, "-c", TF_SCHEMA_SCRIPT, str(tmp_path / "subset.pb")], env=TF_ENV,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert theirs["enum"] == {name: number for number, name in DATA_TYPES.items()}
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    string, bytes_ = 9, 12  # FieldDescriptor.TYPE_STRING, TYPE_BYTES
    for name, tf_fields in theirs["messages"].items():
        for field in pool.FindMessageTypeByName(name).fields:
            ours = [field.number, field.type, field.is_repeated,
                    field.message_type and field.message_type.full_name, field.enum_type and field.enum_type.full_name,
                    field.containing_oneof and field.containing_oneof.name]
            expected = tf_fields[field.name]
            if expected[1] == string:
                expected[1] = bytes_
            assert ours == expected, f"{name}.{field.name}"


# ---------------------------------------------------------------------------------------------


def test_import_does_not_load_tensorflow_or_protobuf():
    code = (
        "import model_registry.adapters.signatures, sys; "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'tensorflow' or m.startswith('google.protobuf')]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@needs_tf
def test_reading_does_not_load_tensorflow(models):
    code = (
        "import sys; from model_registry.adapters.signatures import read_signature_from_dir; "
        f"read_signature_from_dir({str(models / 'keras')!r}); "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'tensorflow'], 'tensorflow loaded'; "
        "assert 'google.protobuf.message_factory' in sys.modules, 'not decoded by google.protobuf'"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
