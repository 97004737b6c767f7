"""Outputs over the record size limit: the input they came from is dead-lettered, the batch goes on."""
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from workers.delivery import RECORD_OVERHEAD_BYTES, Output, dead_letter, fitting

LIMIT = RECORD_OVERHEAD_BYTES + 1000


def record(offset: int) -> ConsumerRecord:
    return ConsumerRecord("frames", 0, 0, offset, 0, 0, b"cam", b"jpeg", [("frame-id", f"f{offset}".encode())], None, 3, 4, -1)


def reject(r: ConsumerRecord, reason: str, detail: str) -> Output:
    return dead_letter("dl", r, reason, detail, "w", LIMIT)


def test_an_input_with_an_oversized_output_is_dead_lettered_alone():
    a, b = record(1), record(2)
    outputs = [
        Output("scores", b"f1", b"x" * 100, source=a), Output("alerts", b"f1", b"x" * 100, source=a),
        Output("scores", b"f2", b"x" * 100, source=b), Output("alerts", b"f2", b"x" * 2000, source=b),
        Output("negatives", b"7", None),
    ]
    got = fitting(outputs, LIMIT, reject)
    assert got[:3] == [outputs[0], outputs[1], outputs[4]]  # the other input's outputs, and what has no input
    (dl,) = got[3:]
    headers = dict(dl.headers)
    assert dl.topic == "dl" and headers["x-dl-reason"] == b"output-too-large" and headers["x-dl-source-offset"] == b"2"
    assert b"alerts record would be 2002 bytes, over the limit of 1000" in headers["x-dl-detail"]


def test_outputs_that_fit_pass_untouched_and_one_from_no_input_that_does_not_is_a_defect():
    outputs = [Output("scores", b"k", b"x" * 990, source=record(1))]
    assert fitting(outputs, LIMIT, reject) is outputs
    with pytest.raises(ValueError, match="exceeds the record size limit"):
        fitting([Output("negatives", b"7", b"x" * 2000)], LIMIT, reject)


def test_a_dead_letter_carries_only_its_own_x_dl_headers():
    """Found by the generated hostile records: a frame bringing its own x-dl-reason or
    x-dl-source-offset got two of each, and readers take the first (the forged) one."""
    forged = ConsumerRecord("frames", 3, 0, 41, 0, 0, b"cam", b"jpeg",
                            [("frame-id", b"f"), ("x-dl-reason", b"nothing-wrong"), ("x-dl-source-offset", b"7")], None, 3, 4, -1)
    dl = dead_letter("dl", forged, "corrupt", "bad bytes", "w", LIMIT)
    names = [k for k, _ in dl.headers]
    assert names.count("x-dl-reason") == 1 and names.count("x-dl-source-offset") == 1 and "frame-id" in names
    assert dict(dl.headers)["x-dl-reason"] == b"corrupt" and dict(dl.headers)["x-dl-source-offset"] == b"41"
