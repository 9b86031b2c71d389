"""Head → route: normalisation, longest prefix, hosts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdhandoff.errors import ProtocolError
from fdhandoff.routing import Router, normalize_path


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        (b"/events", b"/events"),
        (b"/a/b/", b"/a/b/"),
        (b"/a//b", b"/a/b"),
        (b"/a/./b", b"/a/b"),
        (b"/a/../b", b"/b"),
        (b"/a/b/..", b"/a/"),
        (b"/public/../admin", b"/admin"),
        (b"/%61dmin", b"/admin"),
        (b"/a%2F..%2Fadmin", b"/admin"),
        (b"/caf%C3%A9", "/café".encode()),
        (b"/..a/b", b"/..a/b"),
        (b"*", b"*"),
    ],
)
def test_normalize_path(raw: bytes, normal: bytes) -> None:
    assert normalize_path(raw) == normal


@pytest.mark.parametrize("raw", [b"/..", b"/a/../..", b"/%2e%2e/x", b"/%zz", b"/%4", b"/a%00b"])
def test_normalize_path_rejects(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        normalize_path(raw)
    assert info.value.status_hint == 400


def make_router() -> Router[str]:
    return Router(
        [
            ("/", None, "root"),
            ("/events", None, "events"),
            ("/events/admin", None, "events-admin"),
            ("/ws", None, "ws"),
            ("/ws", "example.com", "ws-example"),
            ("/api", "example.com", "api-example"),
        ]
    )


@pytest.mark.parametrize(
    ("path", "host", "value"),
    [
        (b"/", b"", "root"),
        (b"/x", b"other", "root"),
        (b"/events", b"", "events"),
        (b"/events2", b"", "events"),  # a plain string prefix, as nginx locations
        (b"/events/admin/x", b"", "events-admin"),
        (b"/ws/chat", b"", "ws"),
        (b"/ws/chat", b"example.com", "ws-example"),  # tie: the host's own route wins
        (b"/api/v1", b"example.com", "api-example"),
        (b"/api/v1", b"other.com", "root"),
        (b"/events", b"example.com", "events"),  # host-less routes still apply
    ],
)
def test_longest_prefix_and_host(path: bytes, host: bytes, value: str) -> None:
    match = make_router().match(path, host)
    assert match is not None
    assert match.value == value


def test_no_route() -> None:
    router = Router([("/events", None, "events")])
    assert router.match(b"/other") is None
    assert router.match(b"*") is None


def test_invalid_routes() -> None:
    with pytest.raises(ValueError, match="start with"):
        Router([("events", None, 1)])
    with pytest.raises(ValueError, match="twice"):
        Router([("/a", None, 1), ("/a", None, 2)])
    Router([("/a", None, 1), ("/a", "h", 2)])  # same prefix on another host is fine


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"..", b".", b"", b"%2e", b"%2F", b"b"]), max_size=8))
def test_fuzz_normalized_paths_never_climb_or_contain_dots(segments: list[bytes]) -> None:
    raw = b"/" + b"/".join(segments)
    try:
        normal = normalize_path(raw)
    except ProtocolError:
        return
    assert normal.startswith(b"/")
    parts = normal.split(b"/")
    assert b".." not in parts and b"." not in parts
    assert b"//" not in normal
