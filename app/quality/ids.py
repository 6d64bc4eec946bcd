"""Prediction ids: a signed token per predicted row, from which any worker or replica that holds the same
secret (`MODELSERVE_FEEDBACK_SECRET`) reads back what was predicted, without a shared database.

A token is the URL-safe base64 (no padding) of a payload and its MAC:

    kind        1 byte   1: the prediction is a class index (int64), 2: a value (float64)
    name        1 byte length, then the model's name (ASCII, at most 64 bytes)
    version     uint64   the model version
    issued      uint32   Unix time in seconds
    nonce       uint64   per process: a random start, then one more per row (equal predictions differ)
    prediction  8 bytes  int64 class index or float64 value
    mac         16-18 bytes  keyed BLAKE2b (RFC 7693) of everything before it

all little-endian. The MAC is 16 bytes, or 17 or 18 so that the token is a whole number of base64 groups:
the ids of a batch are then encoded by one base64 call over their concatenation, cut at fixed places. The
fields shared by a batch (kind, name, version, time) are hashed once per batch; each row adds only its 16
bytes of nonce and prediction.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from app.model_card import LABEL_INDEX_OUTPUT, PROBABILITIES_OUTPUT, REGRESSION_OUTPUT

CLASS_INDEX: Final = 1
VALUE: Final = 2
MAC_BYTES: Final = 16
"""The shortest MAC (128 bits); one or two more bytes align the token to base64 groups."""
PREDICTION_IDS: Final = "prediction_ids"
"""The key under which a batch's outputs carry its ids (an object array, one per row) when ids are on."""
MAX_ID_CHARS: Final = 200
"""Longer text is not an id (the longest, for a 64-character model name, is 148 characters)."""
_BATCH_FIELDS: Final = struct.Struct("<QI")  # version, issued
_INDEX_ROW: Final = struct.Struct("<Qq")  # nonce, class index
_VALUE_ROW: Final = struct.Struct("<Qd")  # nonce, value
_ROW_BYTES: Final = 16
_NONCE_MASK: Final = 2**64 - 1


@dataclass(frozen=True, slots=True)
class PredictionId:
    """What a genuine id says."""

    mac: bytes
    """Its MAC: unique per id, the key under which it is counted once."""
    model: str
    version: int
    issued: int
    """Unix time in seconds."""
    prediction: int | float
    """The class index (classifiers) or the value (regressors)."""

    @property
    def is_class_index(self) -> bool:
        """Whether the prediction is a class index (a classifier's id)."""
        return isinstance(self.prediction, int)


class InvalidId(ValueError):
    """Not an id this server issued: `reason` says why, for the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def predictions_of(task: str, outputs: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[Any]:
    """One prediction per row of a batch's outputs: int64 class indices (the graph's `label_index`, else the
    argmax of `probabilities`) or float64 values."""
    if task == "classification":
        indices = outputs.get(LABEL_INDEX_OUTPUT)
        if indices is None:
            indices = outputs[PROBABILITIES_OUTPUT].argmax(axis=1)
        return np.asarray(indices, dtype=np.int64).reshape(-1)
    values = outputs[REGRESSION_OUTPUT]
    return np.asarray(values, dtype=np.float64).reshape(values.shape[0])


def _mac_bytes(batch_bytes: int) -> int:
    """The MAC's length for a batch prefix of `batch_bytes`: the token is a multiple of 3 bytes long."""
    return MAC_BYTES + (-(batch_bytes + _ROW_BYTES + MAC_BYTES)) % 3


class PredictionIds:
    """Issues and reads prediction ids signed with one secret."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        """Sign with `secret` (any length; hashed into the MAC key); `clock` gives Unix seconds."""
        self._key = hashlib.blake2b(secret, digest_size=32, person=b"modelserve-ids").digest()
        self._clock = clock
        self._next_nonce = secrets.randbits(64)
        self._signers: dict[tuple[bool, str, int], tuple[int, bytes, Any]] = {}
        """(kind, model, version) → (second, batch prefix, MAC state after the prefix), kept for a second."""

    def issue(self, model: str, version: int, predictions: npt.NDArray[Any]) -> list[str]:
        """One id per row of `predictions` (int class indices or float values) of `model` `version`."""
        rows = predictions.shape[0]
        if rows == 0:
            return []
        is_index = predictions.dtype.kind in "iu"
        second = int(self._clock())
        cached = self._signers.get((is_index, model, version))
        if cached is None or cached[0] != second:
            name = model.encode("ascii")
            prefix = bytes((CLASS_INDEX if is_index else VALUE, len(name))) + name
            prefix += _BATCH_FIELDS.pack(version, second)
            signer = hashlib.blake2b(prefix, key=self._key, digest_size=_mac_bytes(len(prefix)))
            cached = self._signers[(is_index, model, version)] = (second, prefix, signer)
        _, prefix, signer = cached
        pack = _INDEX_ROW.pack if is_index else _VALUE_ROW.pack
        nonce = self._next_nonce
        self._next_nonce = (nonce + rows) & _NONCE_MASK
        tokens = []
        for offset, prediction in enumerate(predictions.tolist()):
            row = pack((nonce + offset) & _NONCE_MASK, prediction)
            mac = signer.copy()
            mac.update(row)
            tokens.append(prefix + row + mac.digest())
        text = base64.urlsafe_b64encode(b"".join(tokens)).decode("ascii")
        width = len(text) // rows
        return [text[start : start + width] for start in range(0, len(text), width)]

    def read(self, token: object) -> PredictionId:
        """What a genuine id says.

        Raises:
            InvalidId: `token` is not text shaped like an id, or its MAC is not this secret's.
        """
        if not isinstance(token, str):
            raise InvalidId(f"expected a prediction id (text), got {_kind(token)}")
        if not 0 < len(token) <= MAX_ID_CHARS or len(token) % 4:
            raise InvalidId("malformed: not a prediction id (wrong length)")
        try:
            raw = base64.b64decode(token, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise InvalidId("malformed: not a prediction id (not base64url)") from None
        if len(raw) < 2:
            raise InvalidId("malformed: not a prediction id (too short)")
        kind, name_bytes = raw[0], raw[1]
        payload_bytes = 2 + name_bytes + _BATCH_FIELDS.size + _ROW_BYTES
        if kind not in (CLASS_INDEX, VALUE) or len(raw) != payload_bytes + _mac_bytes(
            payload_bytes - _ROW_BYTES
        ):
            raise InvalidId("malformed: not a prediction id (wrong layout)")
        payload, mac = raw[:payload_bytes], raw[payload_bytes:]
        expected = hashlib.blake2b(payload, key=self._key, digest_size=len(mac)).digest()
        if not hmac.compare_digest(mac, expected):
            raise InvalidId("forged: the signature does not match (not issued with this server's secret)")
        try:
            model = payload[2 : 2 + name_bytes].decode("ascii")
        except UnicodeDecodeError:
            raise InvalidId("malformed: not a prediction id (model name)") from None
        version, issued = _BATCH_FIELDS.unpack_from(payload, 2 + name_bytes)
        row = _INDEX_ROW if kind == CLASS_INDEX else _VALUE_ROW
        _, prediction = row.unpack_from(payload, payload_bytes - _ROW_BYTES)
        return PredictionId(mac=mac, model=model, version=version, issued=issued, prediction=prediction)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
