"""The client's exception tree against the protocol's list of error codes (no daemon needed)."""

from __future__ import annotations

import re

import pytest

from mirador.client import errors, protocol


def test_every_documented_error_code_has_its_family():
    listed = protocol.__doc__.split("Error codes:")[1].split("Flow control")[0]
    codes = set(re.findall(r"``([a-z_]+)``", listed)) - {"done"}  # an event named in the text
    assert {"bad_request", "not_found", "model_error", "memory_unavailable", "shutting_down", "internal"} <= codes
    assert codes <= set(errors.CODE_CLASSES), codes - set(errors.CODE_CLASSES)


@pytest.mark.parametrize("code, cls", [
    ("bad_request", errors.BadRequest), ("unknown_stage", errors.NotFound), ("busy", errors.Busy),
    ("model_error", errors.ModelError), ("stage_unavailable", errors.Unavailable), ("internal", errors.InternalError),
    ("from_a_newer_daemon", errors.ResponseError),
])
def test_an_error_reply_becomes_the_most_specific_exception(code, cls):
    exc = errors.response_error({"v": 1, "id": "r1", "event": "error", "final": True, "code": code, "message": "what to do"})
    assert type(exc) is cls and isinstance(exc, errors.MiradorError)
    assert (exc.code, exc.message, exc.request_id, str(exc)) == (code, "what to do", "r1", "what to do")
    assert issubclass(errors.ModelError, errors.Unavailable) and issubclass(errors.NoReply, TimeoutError)


def test_memory_records_to_import_are_checked_field_by_field():
    good = {"id": "a", "question": "q", "answer": "a", "ts": 1.5, "models": ["m"], "session": "", "route": "simple"}
    assert protocol.memory_record_problem(good) is None
    assert "answer" in protocol.memory_record_problem({"id": "a", "question": "q"})
    assert "'ts' must be a number" in protocol.memory_record_problem({**good, "ts": "today"})
    assert "'models'" in protocol.memory_record_problem({**good, "models": [1]})
    assert "1..64" in protocol.memory_record_problem({**good, "id": "x" * 65})
    with pytest.raises(protocol.ProtocolError, match="record 2: 'ts'"):
        protocol.parse_request([protocol.request("memory", "r", op="import", records=[good, {**good, "ts": "x"}])])
    with pytest.raises(protocol.ProtocolError, match="'targets'"):
        protocol.parse_request([protocol.request("memory", "r", op="forget", targets=[1])])
