"""The control socket's JSON (vtl/run/controlsock.py, docs/control-socket.md): each pitfall
of a JSON parser is a GenericError with a clear desc, never a silent choice or an internal
error.  Without KVM: the request path alone (tests/test_control_socket.py drives the same
lines through the real socket of a running guest)."""

from __future__ import annotations

import pytest

from vtl.run import controlsock
from vtl.run.controlsock import CommandError


@pytest.mark.parametrize("raw,desc", [
    (b'{"execute": "query-status", "execute": "stop"}', "duplicate key 'execute'"),
    (b'{"execute": "stop", "id": 1, "id": 2}', "duplicate key 'id'"),
    (b'{"execute": "subscribe", "arguments": {"trace": false, "trace": true}}', "duplicate key 'trace'"),
    (b'{"execute": "query-status", "id": {"a": 1, "a": 2}}', "duplicate key 'a'"),
    (b'{"execute": "query-status", "id": 1e999}', "1e999 is out of range"),
    (b'{"execute": "query-status", "id": -1E400}', "-1E400 is out of range"),
    (b'{"execute": "query-status", "id": NaN}', "NaN is not JSON"),
    (b'{"execute": "query-status", "id": -Infinity}', "-Infinity is not JSON"),
    (b'{"execute": "query-status", "id": ' + b"9" * 4301 + b"}", "4300 digits"),
    (b'{"execute": "query-status", "id": ' + b"[" * 33 + b"]" * 33 + b"}", "nested more than 32 deep"),
    (b'{"execute": "query-status", "id": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested more than 32 deep"),
])
def test_json_pitfalls_are_generic_errors(raw: bytes, desc: str) -> None:
    with pytest.raises(CommandError) as e:
        controlsock._parse(raw)
    assert e.value.cls == "GenericError" and desc in e.value.desc, e.value.desc


def test_what_json_allows_still_parses() -> None:
    msg = controlsock._parse(b'{"execute": "query-status", "id": [1e308, -0.0, ' + b"9" * 4000
                             + b', "\\ud800", ' + b"[" * 30 + b"]" * 30 + b"]}")
    assert msg["execute"] == "query-status" and msg["id"][0] == 1e308
    # ... and the id goes back out as the client sent it (no inf, no recursion).
    assert controlsock._line({"return": {}, "id": msg["id"]}).endswith(b"\n")
