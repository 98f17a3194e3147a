"""The TFRecord schema, in one place: encode (pure Python) and parse (TensorFlow).

The converter writes records without importing TensorFlow (its import alone costs ~6 s here and the
decode workers must stay light), so `encode_example` writes the `tf.train.Example` protobuf wire format and
`frame_record` the TFRecord framing directly. Both are checked against TensorFlow's own parser in the tests.
Keys are written in sorted order so the same record always has the same bytes.

Features (fixed since the first version; docs/architecture.md): image (raw uint8, H*W), height, width, label (0/1), patient_id,
boxes (normalised x, y, w, h, flattened), view_position, sex, age (-1 unknown). Nothing else from the header.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

SCHEMA_VERSION = 1
META_DIM = 6  # is_AP, is_PA, is_male, is_female, age/100 (0 when unknown), age_known


@dataclass(frozen=True)
class Record:
    image: np.ndarray  # (H, W) uint8
    label: int
    patient_id: str
    boxes: tuple[float, ...] = ()  # normalised x, y, w, h, flattened
    view_position: str = ""
    sex: str = ""
    age: int = -1


# --- protobuf wire format (only what tf.train.Example needs) --------------------------------------------
def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # int64 negatives are ten-byte two's complement varints
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:
    return _len_field(1, _len_field(1, value))  # Feature.bytes_list -> BytesList.value


def _float_feature(values) -> bytes:
    packed = struct.pack(f"<{len(values)}f", *values)
    return _len_field(2, _len_field(1, packed) if values else b"")  # Feature.float_list, packed


def _int64_feature(value: int) -> bytes:
    return _len_field(3, _len_field(1, _varint(value)))  # Feature.int64_list, packed


def safe_harbor_age(age: int) -> int:
    """HIPAA Safe Harbor: an age over 89 is stored as 90 (one '90 or older' category); -1 (unknown) stays."""
    return min(age, 90)


def encode_example(rec: Record) -> bytes:
    """`tf.train.Example` bytes for one record (deterministic: sorted keys)."""
    image = np.ascontiguousarray(rec.image, dtype=np.uint8)
    height, width = image.shape
    features = {
        "age": _int64_feature(safe_harbor_age(int(rec.age))),
        "boxes": _float_feature([float(v) for v in rec.boxes]),
        "height": _int64_feature(height),
        "image": _bytes_feature(image.tobytes()),
        "label": _int64_feature(int(rec.label)),
        "patient_id": _bytes_feature(rec.patient_id.encode()),
        "sex": _bytes_feature(rec.sex.encode()),
        "view_position": _bytes_feature(rec.view_position.encode()),
        "width": _int64_feature(width),
    }
    entries = b"".join(_len_field(1, _len_field(1, k.encode()) + _len_field(2, v)) for k, v in features.items())
    return _len_field(1, entries)  # Example.features -> Features.feature (map entries)


# --- TFRecord framing ---------------------------------------------------------------------------------
def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
    """One TFRecord: length, masked CRC32C of the length, payload, masked CRC32C of the payload."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))


def iter_records(path: str | Path) -> Iterator[bytes]:
    """Payloads of a TFRecord file, checksums verified; a damaged file raises ValueError naming it."""
    with open(path, "rb") as f:
        offset = 0
        while header := f.read(12):
            if len(header) < 12:
                raise ValueError(f"{path}: truncated record header at byte {offset}")
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
                raise ValueError(f"{path}: corrupt length checksum at byte {offset}")
            body = f.read(length + 4)
            if len(body) < length + 4:
                raise ValueError(f"{path}: truncated record at byte {offset}")
            payload = body[:length]
            if struct.unpack("<I", body[length:])[0] != _masked_crc(payload):
                raise ValueError(f"{path}: corrupt record checksum at byte {offset}")
            offset += 12 + length + 4
            yield payload


# --- parsing (TensorFlow; imported lazily so the converter never pays for it) ------------------------------
def feature_spec():
    import tensorflow as tf

    return {
        "image": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "patient_id": tf.io.FixedLenFeature([], tf.string),
        "boxes": tf.io.VarLenFeature(tf.float32),
        "view_position": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "sex": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "age": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    }


def metadata_vector(view_position, sex, age):
    """The model's optional side inputs from the record's header fields: (B, META_DIM) float32."""
    import tensorflow as tf

    age = tf.cast(age, tf.float32)
    known = tf.cast(age >= 0, tf.float32)
    return tf.stack(
        [
            tf.cast(tf.equal(view_position, "AP"), tf.float32),
            tf.cast(tf.equal(view_position, "PA"), tf.float32),
            tf.cast(tf.equal(sex, "M"), tf.float32),
            tf.cast(tf.equal(sex, "F"), tf.float32),
            known * age / 100.0,
            known,
        ],
        axis=-1,
    )


def parse_batch(serialized, image_size: int, with_info: bool = False):
    """A batch of serialised examples -> ({"image": uint8 (B,S,S,1), "meta": (B,6)}, label float32 (B,)).

    Vectorised: one `parse_example` and one `decode_raw` for the whole batch. With `with_info`, the features
    also carry patient_id, view_position, sex, age and boxes (dense, -1 padded) for evaluation and explanations.
    """
    import tensorflow as tf

    parsed = tf.io.parse_example(serialized, feature_spec())
    images = tf.io.decode_raw(parsed["image"], tf.uint8)
    images = tf.reshape(images, [-1, image_size, image_size, 1])
    features = {
        "image": images,
        "meta": metadata_vector(parsed["view_position"], parsed["sex"], parsed["age"]),
    }
    if with_info:
        features.update(
            patient_id=parsed["patient_id"],
            view_position=parsed["view_position"],
            sex=parsed["sex"],
            age=parsed["age"],
            boxes=tf.sparse.to_dense(parsed["boxes"], default_value=-1.0),
        )
    return features, tf.cast(parsed["label"], tf.float32)
