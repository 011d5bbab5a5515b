"""The lane's fast read of a ``{"features": [...]}`` body: the same numbers msgspec
decodes, or None (the body is then decoded as ever) wherever the two could differ."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import simdjson

from mlgate.schemas.predict import PredictRequest
from mlgate.service.predict.flow import json_feature_row

_decode = msgspec.json.Decoder(PredictRequest).decode


@pytest.mark.parametrize(
    "body",
    [
        b'{"features":[1,2.5,-3]}',
        b'{"features":[1e5,-0.0,1E-2,1.0e-400]}',
        b' {"features" : [ 1 , 2 ] } \n',
        b'{"\\u0066eatures":[1]}',
        b'{"features":[18446744073709551615, 9007199254740993]}',
        b'{"features":[0.1, 0.2, 0.30000000000000004, 3.4028235677973366e38]}',
    ],
)
def test_a_plain_row_is_read_as_the_numbers_msgspec_decodes(body: bytes) -> None:
    row = json_feature_row(simdjson.Parser(), body.strip())
    expected = np.asarray([_decode(body).features], dtype=np.float64)
    assert row is not None and row.dtype == np.float64
    assert np.array_equal(row, expected)


@pytest.mark.parametrize(
    "body",
    [
        b'{"features":[[1],[2]]}',  # simdjson's as_buffer would flatten it
        b'{"features":[1,true]}',
        b'{"features":[1,"2"]}',
        b'{"features":[1,null]}',
        b'{"features":[1e400]}',
        b'{"features":[-9223372036854775809]}',  # simdjson: BIGINT_ERROR; msgspec: a float
        b'{"features":[]}',
        b'{"features":[1]} x',
        b'{"features":[1],"features":[2]}',
        b'\xef\xbb\xbf{"features":[1]}',  # a byte-order mark msgspec refuses
        b'{"features":[01]}',
        b'{"features":[1,]}',
        b'{"features":[1], "request_id": "r"}',
        b'{"instances":[1]}',
        b"[1,2]",
    ],
)
def test_anything_else_is_left_to_msgspec(body: bytes) -> None:
    assert json_feature_row(simdjson.Parser(), body) is None


def test_the_parser_reads_row_after_row_whatever_failed_before() -> None:
    parser = simdjson.Parser()
    for body in (b'{"features":[1,true]}', b'{"features":[-9223372036854775809]}', b'{"features":[1]} x'):
        assert json_feature_row(parser, body) is None
    row = json_feature_row(parser, b'{"features":[4,5]}')
    assert row is not None and row.tolist() == [[4.0, 5.0]]
