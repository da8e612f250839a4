"""The control socket's JSON and framing (vtl/run/controlsock.py, docs/control-socket.md):
each pitfall of a JSON parser is a GenericError with a clear desc, never a silent choice or
an internal error; requests are split from the byte stream as QEMU's JSON streamer splits
them.  Without KVM: the request path alone (tests/test_control_socket.py drives the same
bytes through the real socket of a running guest, tests/test_qmp.py QEMU's own clients)."""

from __future__ import annotations

import pytest

from vtl.run import controlsock
from vtl.run.controlsock import CommandError, Framer


@pytest.mark.parametrize("raw,desc", [
    (b'{"execute": "query-status", "execute": "quit"}', "duplicate key 'execute'"),
    (b'{"execute": "stop", "id": 1, "id": 2}', "duplicate key 'id'"),
    (b'{"execute": "vtl-subscribe", "arguments": {"trace": false, "trace": true}}', "duplicate key 'trace'"),
    (b'{"execute": "query-status", "id": {"a": 1, "a": 2}}', "duplicate key 'a'"),
    (b'{"execute": "query-status", "id": 1e999}', "1e999 is out of range"),
    (b'{"execute": "query-status", "id": -1E400}', "-1E400 is out of range"),
    (b'{"execute": "query-status", "id": NaN}', "NaN is not JSON"),
    (b'{"execute": "query-status", "id": -Infinity}', "-Infinity is not JSON"),
    (b'{"execute": "query-status", "id": ' + b"9" * 4301 + b"}", "4300 digits"),
    (b'{"execute": "query-status", "id": ' + b"[" * 33 + b"]" * 33 + b"}", "nested more than 32 deep"),
    (b'{"execute": "query-status", "id": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested more than 32 deep"),
    (b"[1]", "QMP input must be a JSON object"),
    (b'{"execute": "\x80"}', "not UTF-8"),
])
def test_json_pitfalls_are_generic_errors(raw: bytes, desc: str) -> None:
    with pytest.raises(CommandError) as e:
        controlsock._parse(raw)
    assert e.value.cls == "GenericError" and desc in e.value.desc, e.value.desc
    assert e.value.desc.startswith(("JSON parse error, ", "QMP input")), e.value.desc


def test_what_json_allows_still_parses() -> None:
    msg = controlsock._parse(b'{"execute": "query-status", "id": [1e308, -0.0, ' + b"9" * 4000
                             + b', "\\ud800", ' + b"[" * 30 + b"]" * 30 + b"]}")
    assert msg["execute"] == "query-status" and msg["id"][0] == 1e308
    # ... and the id goes back out as the client sent it (no inf, no recursion), in ASCII
    # with CRLF.
    line = controlsock._reply_line({}, msg["id"])
    assert line.endswith(b"\r\n") and line.isascii()


def _feed(*chunks: bytes) -> list[bytes | str]:
    """What a Framer makes of `chunks`: requests as bytes, errors as their desc."""
    f = Framer()
    out: list[bytes | str] = []
    for chunk in chunks:
        out += [x.desc if isinstance(x, CommandError) else x for x in f.feed(chunk)]
    return out


def test_framer_splits_requests_as_qemus_streamer() -> None:
    # Back to back without a newline (qemu.qmp), one per line (socat), CRLF, blank lines.
    assert _feed(b'{"execute":"a"}{"execute":"b"}\r\n\r\n \t{"execute":"c"}\n') == [
        b'{"execute":"a"}', b'{"execute":"b"}', b'{"execute":"c"}']
    # One request cut anywhere: across writes, across lines, inside a string and its escape.
    whole = b'{"execute": "x", "id": "}{\\"][\\\\"}'
    for cut in range(1, len(whole)):
        assert _feed(whole[:cut], whole[cut:]) == [whole], cut
    assert _feed(b'{"execute":\n "x",\n "id": 1\n}') == [b'{"execute":\n "x",\n "id": 1\n}']
    # A top-level value that is not an object or array is one request up to its newline.
    assert _feed(b"42\n", b"this is not json\n") == [b"42", b"this is not json"]
    assert _feed(b'[1, {"a": [2]}]x') == [b'[1, {"a": [2]}]']     # `x` waits for its newline


def test_framer_lexical_errors_reset_it() -> None:
    # qmp-spec.rst: a control character gets the parser back into a known state.
    out = _feed(b'{"execute": "query-status"\n', b"\x1b", b'{"execute": "y"}')
    assert len(out) == 2 and isinstance(out[0], str) and "invalid byte 0x1b" in out[0]
    assert out[1] == b'{"execute": "y"}'
    # One error for a run of them; 0xFF too; a raw newline or tab inside a string.
    out = _feed(b"\x00\x01\x02\xff\xfe")
    assert len(out) == 1 and "0x00" in str(out[0])
    for raw in (b'{"a": "\n"}\n', b'{"a": "\t"}\n', b'{"a": "\xff"}\n'):
        out = _feed(raw, b'{"execute": "z"}')
        assert isinstance(out[0], str) and out[-1] == b'{"execute": "z"}', (raw, out)


def test_framer_bounds() -> None:
    # Too long: one error as soon as it is, then skipped to the end of the request or line.
    big = b'{"execute": "x", "id": "' + b"a" * controlsock.MAX_LINE + b'"}'
    out = _feed(big[:40000], big[40000:], b'{"execute": "y"}')
    assert len(out) == 2 and "longer than 65536 bytes" in str(out[0]) and out[1] == b'{"execute": "y"}'
    out = _feed(b"x" * (1 << 20), b'tail"}\n', b'{"execute": "y"}')
    assert len(out) == 2 and "longer than" in str(out[0]) and out[1] == b'{"execute": "y"}'
    # Too deep: one error at depth 33, then skipped where its brackets close or at a newline.
    out = _feed(b"[" * 40 + b"]" * 40 + b'{"execute": "y"}')
    assert len(out) == 2 and "nested more than 32 deep" in str(out[0]) and out[1] == b'{"execute": "y"}'
    out = _feed(b"[" * 100_000 + b"\n" + b'{"execute": "y"}')
    assert len(out) == 2 and out[1] == b'{"execute": "y"}'
    f = Framer()
    f.feed(b"[" * 20 + b"a" * 1000)
    assert len(f.buf) <= controlsock.MAX_LINE


@pytest.mark.parametrize("raw,desc", [
    (b'{"execute": "query-status", "arguments": {"verbose": true}}', "Parameter 'verbose' is unexpected"),
    (b'{"execute": "vtl-subscribe", "arguments": {"trace": 1}}',
     "Invalid parameter type for 'trace', expected: boolean"),
    (b'{"execute": "vtl-subscribe", "arguments": {"kinds": "intercept"}}',
     "Invalid parameter type for 'kinds', expected: array"),
    (b'{"execute": "vtl-subscribe", "arguments": {"kinds": [true]}}',
     "Invalid parameter type for 'kinds[0]', expected: string"),
    (b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}',
     "Invalid parameter type for 'enable', expected: array"),
])
def test_argument_errors_are_one_line_in_qemus_words(raw: bytes, desc: str) -> None:
    with pytest.raises(CommandError) as e:
        controlsock._validate(controlsock._parse(raw), negotiated=True)
    assert (e.value.cls, e.value.desc) == ("GenericError", desc)


def test_before_negotiation_every_command_but_qmp_capabilities_is_not_found() -> None:
    for name in ("query-status", "quit", "no-such-command"):
        with pytest.raises(CommandError) as e:
            controlsock._validate({"execute": name}, negotiated=False)
        assert (e.value.cls, e.value.desc) == ("CommandNotFound", controlsock.NEGOTIATION_FIRST)
    cmd, _ = controlsock._validate({"execute": "qmp_capabilities", "arguments": {}}, negotiated=False)
    assert cmd.name == "qmp_capabilities"


def test_version_and_timestamps() -> None:
    v = controlsock.version_info()
    assert v["package"] == f"vtl-kvm {controlsock._version()}"
    assert all(isinstance(v["qemu"][k], int) for k in ("major", "minor", "micro"))
    assert controlsock.timestamp(1258551470.802384) == {"seconds": 1258551470, "microseconds": 802384}
    assert controlsock.timestamp(5.9999999) == {"seconds": 6, "microseconds": 0}
