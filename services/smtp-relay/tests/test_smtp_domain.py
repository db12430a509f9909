"""The relay's rules without I/O: connection, sender, headers, marketing, quota arithmetic, suspension."""

from __future__ import annotations

import re
from bisect import bisect_left
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palisade_smtp_relay import domain
from palisade_smtp_relay.domain import Refusal, Screened

T = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
SENDER = "redis-bgrkj@vm.example.app"
NETS = domain.parse_networks("10.0.0.0/8, fd00::/8")


def msg(*headers: str, body: str = "hello") -> bytes:
    return ("\r\n".join([*headers, "", body, ""])).encode()


def refusal(result: object) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


# ------------------------------------------------------------------ connection


def test_connections_are_decided_on_network_then_service_then_suspension() -> None:
    assert domain.refuse_connection("10.1.2.3", NETS, True, False) is None
    assert domain.refuse_connection("fd00::5", NETS, True, False) is None
    assert refusal(domain.refuse_connection("192.168.1.1", NETS, True, False)).reason == "outside_private_network"
    assert refusal(domain.refuse_connection("10.1.2.3", NETS, False, False)).reason == "unknown_service"
    suspended = refusal(domain.refuse_connection("10.1.2.3", NETS, True, True))
    assert (suspended.reason, suspended.reply[:9]) == ("relay_suspended", "554 5.7.1")


def test_ipv4_mapped_peers_of_a_dual_stack_listener_are_their_ipv4_address() -> None:
    assert domain.normalize_ip("::ffff:10.0.0.5") == "10.0.0.5"
    assert domain.in_networks("::ffff:10.0.0.5", NETS)
    assert not domain.in_networks("not-an-ip", NETS)
    with pytest.raises(ValueError, match="empty"):
        domain.parse_networks(" , ")


# ------------------------------------------------------------------ sender


def test_the_sender_is_the_first_hostname_label_at_the_sender_domain() -> None:
    slug = domain.slug_of("Redis-Bgrkj.vm.example.net")
    assert domain.sender_address(slug, "VM.Example.App") == SENDER


@pytest.mark.parametrize(
    ("mail_from", "allowed"),
    [
        (SENDER, True),
        ("redis-bgrkj@VM.EXAMPLE.APP", True),  # the domain is case-insensitive
        ("Redis-Bgrkj@vm.example.app", False),  # the local part is not
        ("redis-bgrkj@vm.example.app.evil.com", False),
        ("redis-bgrkj@example.app", False),
        ("admin@vm.example.app", False),
        ("redis-bgrkj", False),
    ],
)
def test_envelope_sender(mail_from: str, allowed: bool) -> None:
    result = domain.refuse_envelope_sender(mail_from, SENDER)
    assert (result is None) == allowed
    if result is not None:
        assert result.reply == f"550 5.7.1 Sender address must be <{SENDER}>"


def test_the_51st_recipient_is_marketing() -> None:
    assert domain.refuse_recipient(49) is None
    r = refusal(domain.refuse_recipient(50))
    assert (r.reason, r.code, r.marketing) == ("marketing_too_many_recipients", "550 5.7.1", True)
    assert "Marketing mail is not permitted" in r.text


# ------------------------------------------------------------------ headers


@pytest.mark.parametrize(
    "value",
    [
        SENDER,
        f"<{SENDER}>",
        f"  Redis Alerts <{SENDER}>  ",
        f'"Redis: alerts, nightly" <{SENDER}>',
        "redis-bgrkj@VM.example.app",
    ],
)
def test_from_values_that_show_only_the_sender(value: str) -> None:
    assert domain.same_address(domain.header_address(value), SENDER)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (f"{SENDER}, boss@example.com", "exactly one address"),
        (f"Team: {SENDER};", "exactly one address"),
        (f"{SENDER} (PayPal Support)", "exactly one address"),
        (f"(PayPal) <{SENDER}>", "comments"),
        (f'"service@paypal.com" <{SENDER}>', "must not contain an address"),
        (f"service@paypal.com <{SENDER}>", "must not contain an address"),
        (f"=?utf-8?b?UGF5UGFs?= <{SENDER}>", "encoded words"),
        (f'"=?utf-8?q?PayPal?=" <{SENDER}>', "encoded words"),
        (f"Caf\u00e9 <{SENDER}>", "plain ASCII"),
        (f'"a\\"b" <{SENDER}>', "exactly one address"),
        (f"<{SENDER}> <other@example.com>", "exactly one address"),
        ("", "exactly one address"),
    ],
)
def test_from_values_with_display_tricks_are_refused(value: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        domain.header_address(value)


# ------------------------------------------------------------------ MAIL FROM / RCPT TO paths

_PATH_CHARS = "aZ9.-_+=!#{|}~'/?^`$%&*" + '<>@" \\()[]:;,'


def _stock_getaddr(arg: str) -> tuple[str | None, str | None]:
    from aiosmtpd.smtp import SMTP

    return SMTP(handler=object())._getaddr(arg)


def test_the_everyday_path_form_is_read_without_the_full_parser() -> None:
    assert domain.plain_path(f"<{SENDER}> SIZE=1200 BODY=8BITMIME") == (SENDER, "SIZE=1200 BODY=8BITMIME")
    assert domain.plain_path("<o'hara+tag@mail.example.com>") == ("o'hara+tag@mail.example.com", "")
    # Every other form is left to aiosmtpd's parser.
    others = ["<>", '<"a b"@example.com>', "<@relay.example:a@example.com>", "<a@[10.0.0.1]>", "a@example.com"]
    others += [" <a@example.com>", "<a..b@example.com>", "<a@example..com>", "<a@-x.com>", "<a@b.c> (comment)"]
    for arg in [*others, "<a@b.c>\t(c) SIZE=1"]:
        assert domain.plain_path(arg) is None, arg


@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(
        st.builds(
            lambda local, host, rest: f"<{local}@{host}>{rest}",
            st.text(_PATH_CHARS, min_size=1, max_size=12),
            st.text("aZ9.-_[]:\\ ", min_size=1, max_size=12),
            st.sampled_from(["", " SIZE=100", "  BODY=8BITMIME", "x", ">", " <b@c.d>", " (c) SIZE=1", "(c)", " \t "]),
        ),
        st.text(_PATH_CHARS, max_size=30),
    )
)
def test_the_everyday_path_form_is_read_as_aiosmtpd_reads_it(arg: str) -> None:
    plain = domain.plain_path(arg)
    if plain is not None:
        assert plain == _stock_getaddr(arg)


def test_identity_headers() -> None:
    def check(*headers: str) -> Refusal | None:
        parsed = domain.parse_headers(msg(*headers))
        assert isinstance(parsed, domain.Headers)
        return domain.refuse_identity_headers(parsed, SENDER)

    assert check(f"From: {SENDER}", "To: a@b.c") is None
    assert check(f"From: {SENDER}", f"Sender: <{SENDER}>") is None
    assert check(f"FROM:\r\n\tRedis <{SENDER}>") is None  # folded
    assert "Missing From" in refusal(check("To: a@b.c")).text
    assert "More than one From" in refusal(check(f"From: {SENDER}", f"From: {SENDER}")).text
    r = refusal(check(f"From: {SENDER}", "Sender: ceo@bank.example"))
    assert (r.reason, r.code) == ("from_header_mismatch", "550 5.7.1")
    assert r.text == f"Sender header address is not the service's sender address; it must be <{SENDER}>"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Precedence: bulk", "marketing_precedence"),
        ("precedence:   JUNK  ", "marketing_precedence"),
        ("Precedence: list", "marketing_precedence"),
        ("List-Unsubscribe: <https://example.com/u>", "marketing_list_unsubscribe"),
    ],
)
def test_bulk_markers(header: str, reason: str) -> None:
    r = refusal(domain.screen_message(msg(f"From: {SENDER}", header), SENDER))
    assert (r.reason, r.code, r.marketing) == (reason, "550 5.7.1", True)
    assert r.text.startswith("Marketing mail is not permitted (")


def test_transactional_precedence_values_pass() -> None:
    screened = domain.screen_message(msg(f"From: {SENDER}", "Precedence: first-class", "Message-ID: <a@b>"), SENDER)
    assert isinstance(screened, Screened)
    assert screened.message_id == "<a@b>"


@pytest.mark.parametrize(
    ("content", "reason", "text"),
    [
        (b"From: " + SENDER.encode() + b"\r\nSubject: a\nBcc: x@y.z\r\n\r\nbody\r\n", "bare_lf", "Bare LF"),
        (b"From: " + SENDER.encode() + b"\r\n\r\nbody\n.\nMAIL FROM:<x@y>\r\n", "bare_lf", "Bare LF"),
        (b"From: " + SENDER.encode() + b"\r\nSubject: a\rBcc: x@y.z\r\n\r\nbody\r\n", "bare_cr", "Bare CR"),
        (b"From: " + SENDER.encode() + b"\r\nBcc everyone\r\n\r\nbody\r\n", "header_injection", "without a field"),
        (b" x: y\r\nFrom: " + SENDER.encode() + b"\r\n\r\nbody\r\n", "header_injection", "continuation"),
        (b"From: " + SENDER.encode() + b"\r\nX: a\x00b\r\n\r\nbody\r\n", "header_injection", "NUL"),
        (b"From : " + SENDER.encode() + b"\r\n\r\nbody\r\n", "header_injection", "without a field"),
    ],
)
def test_malformed_messages(content: bytes, reason: str, text: str) -> None:
    r = refusal(domain.screen_message(content, SENDER))
    assert (r.reason, r.stage) == (reason, "data")
    assert r.code == "550 5.6.0"
    assert text in r.text


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b".", b"\r\r\n", b"\n\r"]), max_size=12))
def test_a_bare_cr_or_lf_is_found_wherever_it_is(parts: list[bytes]) -> None:
    content = b"".join(parts)
    # The definition: an LF without a CR before it, a CR without an LF after it.
    bare_lf = re.search(rb"(?<!\r)\n", content) is not None
    bare_cr = re.search(rb"\r(?!\n)", content) is not None
    found = domain.refuse_line_endings(content)
    expected = "bare_lf" if bare_lf else "bare_cr" if bare_cr else None
    assert (found.reason if found else None) == expected


def test_a_message_without_body_is_all_headers() -> None:
    assert isinstance(domain.screen_message(f"From: {SENDER}\r\n".encode(), SENDER), Screened)


def test_marketing_is_checked_before_the_sender_so_it_always_counts() -> None:
    r = refusal(domain.screen_message(msg("From: ceo@bank.example", "Precedence: bulk"), SENDER))
    assert r.marketing


def test_trace_headers_sanitize_the_helo_name() -> None:
    trace = domain.trace_headers(
        helo="evil\r\nBcc: x", peer_ip="10.0.0.5", hostname="relay", relay_id="abc", when=T, tls=True,
        add_message_id="<abc@x>",
    )  # fmt: skip
    assert trace.startswith(
        b"Received: from evilBcc:x ([10.0.0.5])\r\n\tby relay (Palisade smtp-relay) with ESMTPS id abc;"
    )
    assert trace.endswith(b"\r\nMessage-ID: <abc@x>\r\n")
    assert trace.count(b"\r\n") == 4
    assert b"\n" not in trace.replace(b"\r\n", b"")


# ------------------------------------------------------------------ quota arithmetic


def sends_at(*offsets: float) -> list[datetime]:
    return [T + timedelta(seconds=o) for o in offsets]


def test_300_at_t_then_the_301st_waits_exactly_3600_seconds() -> None:
    ring: tuple[datetime, ...] = ()
    for i in range(300):
        d = domain.reserve(ring, T, 1)
        assert d.granted
        assert d.used == i + 1
        ring = d.sends
    refused = domain.reserve(ring, T, 1)
    assert (refused.granted, refused.retry_after_seconds, refused.used) == (False, 3600, 300)
    assert not domain.reserve(ring, T + timedelta(seconds=3599, microseconds=999999), 1).granted
    back = domain.reserve(ring, T + timedelta(seconds=3600), 300)
    assert back.granted
    assert back.used == 300


def test_one_slot_back_3600_s_after_the_first_send() -> None:
    ring = domain.reserve((), T, 1).sends
    ring = domain.reserve(ring, T + timedelta(seconds=10), 299).sends
    at = T + timedelta(seconds=3600)
    assert domain.reserve(ring, at, 2).retry_after_seconds == 10  # all or nothing
    d = domain.reserve(ring, at, 1)
    assert d.granted
    assert len(d.sends) == 300
    assert domain.reserve(d.sends, at, 1).retry_after_seconds == 10


def test_warning_when_a_reservation_reaches_80_percent_only() -> None:
    d = domain.reserve(sends_at(*[0] * 230), T, 9)
    assert not d.warn
    assert d.used == 239
    assert domain.reserve(d.sends, T, 1).warn
    assert domain.reserve(sends_at(*[0] * 230), T, 50).warn
    assert not domain.reserve(sends_at(*[0] * 240), T, 1).warn


def test_release_gives_back_exactly_what_one_reservation_took() -> None:
    ring = domain.reserve(sends_at(0, 1), T + timedelta(seconds=5), 3).sends
    assert domain.release(ring, T + timedelta(seconds=5), 3) == tuple(sends_at(0, 1))
    assert domain.release(ring, T + timedelta(seconds=5), 1) == tuple(sends_at(0, 1, 5, 5))
    assert domain.release(ring, T + timedelta(seconds=7), 3) == ring


def test_the_ring_never_holds_entries_outside_the_window_or_more_than_the_limit() -> None:
    old = sends_at(*range(-4000, -3600, 2))  # 200 entries, all expired
    d = domain.reserve([*old, *sends_at(*[-10] * 100)], T, 5)
    assert d.granted
    assert len(d.sends) == 105
    assert min(d.sends) == T - timedelta(seconds=10)


def test_a_relay_whose_clock_runs_behind_keeps_the_ring_sorted() -> None:
    d = domain.reserve(sends_at(5, 6), T, 1)
    assert d.sends == tuple(sends_at(0, 5, 6))


def test_more_than_the_limit_in_one_reservation_never_fits() -> None:
    d = domain.reserve((), T, 301)
    assert not d.granted
    assert d.retry_after_seconds == 3600


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(1, 50)), min_size=1, max_size=120))
def test_no_rolling_window_ever_holds_more_than_300(steps: list[tuple[int, int]]) -> None:
    """Against a brute-force model: granted iff the last hour plus this one fits."""
    ring: tuple[datetime, ...] = ()
    granted: list[datetime] = []
    now = T
    for gap, count in steps:
        now += timedelta(seconds=gap * 30)
        d = domain.reserve(ring, now, count)
        in_window = sum(1 for s in granted if s > now - timedelta(seconds=3600))
        assert d.granted == (in_window + count <= 300)
        if d.granted:
            ring = d.sends
            granted += [now] * count
        else:
            assert d.retry_after_seconds is not None
            assert d.retry_after_seconds >= 1
            later = now + timedelta(seconds=d.retry_after_seconds)
            assert domain.reserve(ring, later, count).granted  # the promised time is enough ...
            if d.retry_after_seconds > 1:  # ... and not longer than needed
                assert not domain.reserve(ring, later - timedelta(seconds=1), count).granted
    # Every window [s, s + 3600) that starts at a send holds at most 300 (the fullest ones start at a send).
    assert all(bisect_left(granted, s + timedelta(seconds=3600)) - i <= 300 for i, s in enumerate(granted))


def test_7200_a_day_follows_from_300_an_hour() -> None:
    ring: tuple[datetime, ...] = ()
    sent = 0
    for minute in range(24 * 60):  # a service trying 10 emails every minute for a day
        d = domain.reserve(ring, T + timedelta(minutes=minute), 10)
        if d.granted:
            ring, sent = d.sends, sent + 10
    assert sent == domain.DAILY_LIMIT == 7200


# ------------------------------------------------------------------ suspension


def test_the_fifth_violation_inside_24_hours_suspends() -> None:
    kept: tuple[datetime, ...] = ()
    for i in range(4):
        kept, suspend = domain.record_violation(kept, T + timedelta(hours=i))
        assert not suspend
    kept, suspend = domain.record_violation(kept, T + timedelta(hours=23, minutes=59))
    assert suspend
    assert len(kept) == 5


def test_violations_older_than_24_hours_are_forgotten() -> None:
    kept = tuple(T + timedelta(minutes=i) for i in range(4))
    kept, suspend = domain.record_violation(kept, T + timedelta(hours=24))
    assert not suspend
    assert kept == (
        T + timedelta(minutes=1),
        T + timedelta(minutes=2),
        T + timedelta(minutes=3),
        T + timedelta(hours=24),
    )
    assert domain.violations_in_window(kept, T + timedelta(hours=24)) == 4
