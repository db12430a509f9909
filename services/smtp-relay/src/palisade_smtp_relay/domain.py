"""The relay's rules as pure functions: who may connect, which sender, what is
marketing mail, the quota arithmetic and the suspension rule. No I/O here; the
SMTP session (`relay`) and the SQL (`store`) call these.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import format_datetime
from typing import Literal

# ------------------------------------------------------------------ the product's numbers

QUOTA_LIMIT = 300  # emails (recipients) per service ...
QUOTA_WINDOW = timedelta(seconds=3600)  # ... in any rolling window of this length
# 7200 a day is not a rule of its own: any 24 h holds 24 disjoint hours of at most 300 each.
DAILY_LIMIT = QUOTA_LIMIT * 24
QUOTA_WARN_AT = QUOTA_LIMIT * 4 // 5  # EmailQuotaWarning when a reservation reaches 80 %
MAX_RECIPIENTS = 50  # more in one message is a mailing, not a notification
VIOLATIONS_TO_SUSPEND = 5
VIOLATION_WINDOW = timedelta(hours=24)

Stage = Literal["connect", "mail", "rcpt", "data", "upstream"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Refusal:
    """A decision to refuse, with the exact SMTP reply. `text` never echoes what the
    client sent beyond addresses the relay itself computed."""

    reason: str
    code: str  # basic and enhanced status, e.g. "550 5.7.1"
    text: str
    stage: Stage
    marketing: bool = False  # counts towards suspension
    retry_after_seconds: int | None = None

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


# ------------------------------------------------------------------ connection


def parse_networks(spec: str) -> tuple[IPNetwork, ...]:
    """`"10.0.0.0/8, fd00::/8"` -> networks; raises ValueError on a bad entry."""
    nets = tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())
    if not nets:
        raise ValueError("the private network list is empty")
    return nets


def normalize_ip(address: str) -> str:
    """The canonical text of an address; an IPv4-mapped IPv6 peer (dual-stack
    listener) is its IPv4 address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def in_networks(address: str, networks: Iterable[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(normalize_ip(address))
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


def refuse_connection(
    address: str, networks: Sequence[IPNetwork], service_known: bool, suspended: bool
) -> Refusal | None:
    if not in_networks(address, networks):
        return Refusal(
            "outside_private_network",
            "554 5.7.1",
            f"Relay access denied: {address} is not on the private network",
            "connect",
        )
    if not service_known:
        return Refusal(
            "unknown_service", "554 5.7.1", f"Relay access denied: {address} is not a known service", "connect"
        )
    if suspended:
        return refusal_suspended("connect")
    return None


def refusal_suspended(stage: Stage) -> Refusal:
    return Refusal(
        "relay_suspended", "554 5.7.1", "Relay access suspended after repeated marketing mail; contact support", stage
    )


# ------------------------------------------------------------------ sender


def slug_of(hostname: str) -> str:
    """The service part of the sender address: the first label of its hostname."""
    return hostname.split(".", 1)[0].lower()


def sender_address(slug: str, sender_domain: str) -> str:
    return f"{slug}@{sender_domain.lower()}"


def same_address(given: str, expected: str) -> bool:
    """The local part exactly, the domain case-insensitively."""
    g_local, g_at, g_domain = given.rpartition("@")
    e_local, _, e_domain = expected.rpartition("@")
    return bool(g_at) and g_local == e_local and g_domain.lower() == e_domain.lower()


def refuse_envelope_sender(mail_from: str, expected: str) -> Refusal | None:
    if same_address(mail_from, expected):
        return None
    return Refusal("sender_not_allowed", "550 5.7.1", f"Sender address must be <{expected}>", "mail")


def refuse_recipient(accepted_so_far: int) -> Refusal | None:
    if accepted_so_far < MAX_RECIPIENTS:
        return None
    return _marketing("marketing_too_many_recipients", f"more than {MAX_RECIPIENTS} recipients", "rcpt")


def _marketing(reason: str, marker: str, stage: Stage) -> Refusal:
    return Refusal(reason, "550 5.7.1", f"Marketing mail is not permitted ({marker})", stage, marketing=True)


# ------------------------------------------------------------------ the message

_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+):(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Headers:
    """The header fields in order: (lower-cased name, unfolded value)."""

    fields: tuple[tuple[str, str], ...]

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.fields if n == name]


def _malformed(what: str) -> Refusal:
    return Refusal("header_injection", "550 5.6.0", f"Malformed message header: {what}", "data")


def parse_headers(content: bytes) -> Headers | Refusal:
    """The header block (up to the first empty line), strictly: every line is a
    field or the continuation of one. A line that is neither is what header
    injection leaves behind, so the message is refused rather than guessed at."""
    end = content.find(b"\r\n\r\n")
    block = content[:end] if end >= 0 else content.removesuffix(b"\r\n")
    fields: list[tuple[str, str]] = []
    for line in block.split(b"\r\n") if block else []:
        if b"\x00" in line:
            return _malformed("NUL byte")
        if line[:1] in (b" ", b"\t"):
            if not fields:
                return _malformed("continuation line before the first field")
            name, value = fields[-1]
            fields[-1] = (name, value + line.decode("utf-8", "surrogateescape"))
            continue
        m = _FIELD.match(line)
        if m is None:
            return _malformed("line without a field name")
        fields.append((m.group(1).decode("ascii").lower(), m.group(2).decode("utf-8", "surrogateescape")))
    return Headers(tuple(fields))


_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_ADDR = (
    rf"(?P<addr>[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)"
)
_BARE_ADDR = re.compile(rf"^[ \t]*{_ADDR}[ \t]*$")
_NAME_ADDR = re.compile(rf'^[ \t]*(?P<name>"[^"\\]*"|[^"<>\\]*?)[ \t]*<{_ADDR}>[ \t]*$')
_PHRASE = re.compile(rf"^[{_ATEXT}. \t]*$")


def header_address(value: str) -> str:
    """The one address of a From/Sender value, or raise ValueError saying why not.

    Accepted: `addr`, `<addr>`, `Plain Name <addr>`, `"Quoted Name" <addr>`. Refused:
    more than one address, groups, comments, encoded words (they can render as
    anything), non-ASCII, and display names holding an address ("you@bank" <x@y>)."""
    m = _BARE_ADDR.match(value)
    if m is not None:
        return m.group("addr")
    m = _NAME_ADDR.match(value)
    if m is None:
        raise ValueError("it must hold exactly one address")
    name = m.group("name")
    quoted = name.startswith('"')
    inner = name[1:-1] if quoted else name
    if any(not (" " <= ch <= "~") and ch != "\t" for ch in inner):
        raise ValueError("the display name must be plain ASCII")
    if "=?" in inner:
        raise ValueError("encoded words are not allowed in the display name")
    if "@" in inner:
        raise ValueError("the display name must not contain an address")
    if "(" in inner or ")" in inner or "<" in inner or ">" in inner:
        raise ValueError("comments and brackets are not allowed in the display name")
    if not quoted and not _PHRASE.match(inner):
        raise ValueError("the display name must be plain words or quoted")
    return m.group("addr")


# The parser also takes the white space after ">" (and comments: those go to the parser).
_PLAIN_PATH = re.compile(rf"<{_ADDR}>[ \t]*+(?!\()")


def plain_path(arg: str) -> tuple[str, str] | None:
    """The address and the rest of a MAIL FROM or RCPT TO argument in its everyday
    form, `<dot-atom@host.name> PARAMS`; None for any other form (quoted local part,
    source route, address literal, null sender, spaces), which goes to the full RFC
    5322 parser. For the forms it takes, the answer is the full parser's (a test
    compares both on generated arguments)."""
    m = _PLAIN_PATH.match(arg)
    return None if m is None else (m.group("addr"), arg[m.end() :])


def refuse_identity_headers(headers: Headers, expected: str) -> Refusal | None:
    """`From:` (and `Sender:`, when present) must be exactly the service's address."""

    def refused(what: str) -> Refusal:
        return Refusal("from_header_mismatch", "550 5.7.1", f"{what}; it must be <{expected}>", "data")

    froms = headers.all("from")
    if len(froms) != 1:
        return refused("Missing From header" if not froms else "More than one From header")
    for field, values in (("From", froms), ("Sender", headers.all("sender"))):
        if len(values) > 1:
            return refused(f"More than one {field} header")
        for value in values:
            try:
                address = header_address(value)
            except ValueError as exc:
                return refused(f"{field} header refused: {exc}")
            if not same_address(address, expected):
                return refused(f"{field} header address is not the service's sender address")
    return None


def refuse_marketing(headers: Headers) -> Refusal | None:
    for value in headers.all("precedence"):
        marker = value.strip().lower()
        if marker in ("bulk", "list", "junk"):
            return _marketing("marketing_precedence", f"Precedence: {marker}", "data")
    if headers.all("list-unsubscribe"):
        return _marketing("marketing_list_unsubscribe", "List-Unsubscribe header", "data")
    return None


def refuse_line_endings(content: bytes) -> Refusal | None:
    # A bare LF (or CR) is how SMTP smuggling hides a second message in the first;
    # the relay passes on only what every server downstream reads the same way.
    # Counted rather than searched for (a regular expression with a look-around was ~8 us a
    # message): every CRLF pairs one CR with one LF, so a lone one shows as a surplus.
    crlf = content.count(b"\r\n")
    if content.count(b"\n") > crlf:
        return Refusal("bare_lf", "550 5.6.0", "Bare LF in message; lines must end with CRLF", "data")
    if content.count(b"\r") > crlf:
        return Refusal("bare_cr", "550 5.6.0", "Bare CR in message; lines must end with CRLF", "data")
    return None


@dataclass(frozen=True)
class Screened:
    """A message that passed every content check."""

    headers: Headers

    @property
    def message_id(self) -> str | None:
        ids = self.headers.all("message-id")
        return ids[0].strip() if ids and ids[0].strip() else None


def screen_message(content: bytes, expected_sender: str) -> Screened | Refusal:
    """Every check on the message itself, in order: line endings, header syntax,
    marketing markers (which count towards suspension), then the sender headers."""
    refusal = refuse_line_endings(content)
    if refusal is not None:
        return refusal
    headers = parse_headers(content)
    if isinstance(headers, Refusal):
        return headers
    refusal = refuse_marketing(headers) or refuse_identity_headers(headers, expected_sender)
    return refusal if refusal is not None else Screened(headers)


def refusal_too_large(limit: int, stage: Stage) -> Refusal:
    return Refusal("message_too_large", "552 5.3.4", f"Message exceeds the size limit of {limit} bytes", stage)


def refusal_line_too_long() -> Refusal:
    return Refusal("line_too_long", "500 5.5.2", "Line too long (more than 998 characters)", "data")


def refusal_upstream(permanent: bool, upstream_code: int | None) -> Refusal:
    if permanent:
        return Refusal(
            "upstream_refused", "554 5.0.0", f"The upstream relay refused the message ({upstream_code})", "upstream"
        )
    return Refusal("upstream_unavailable", "451 4.3.0", "Upstream relay unavailable; try again later", "upstream")


_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.:\[\]_-]")


def trace_headers(
    *,
    helo: str | None,
    peer_ip: str,
    hostname: str,
    relay_id: str,
    when: datetime,
    tls: bool,
    add_message_id: str | None,
) -> bytes:
    """The `Received:` line every relay adds (RFC 5321 4.4), and a Message-ID when
    the message had none. `helo` is the client's word, so it is sanitized."""
    name = _HELO_UNSAFE.sub("", helo or "")[:100] or "unknown"
    lines = [
        f"Received: from {name} ([{peer_ip}])\r\n\tby {hostname} (Palisade smtp-relay)"
        f" with ESMTP{'S' if tls else ''} id {relay_id};\r\n\t{format_datetime(when)}\r\n"
    ]
    if add_message_id is not None:
        lines.append(f"Message-ID: {add_message_id}\r\n")
    return "".join(lines).encode("ascii")


# ------------------------------------------------------------------ quota
#
# The exact rolling window. A service's state is the ring of its send times: one
# entry per recipient, sorted, holding only entries still inside the window and
# never more than QUOTA_LIMIT of them. That is all the state an exact answer needs:
# an entry leaves the window for good once it is older than the window, and if the
# newest QUOTA_LIMIT entries are all inside it the service is full whatever older
# ones exist. So "how many in (now - 3600 s, now]" is a count over at most 300
# timestamps of this one service, independent of every other service's traffic.
# `store` keeps the ring in the service's row and changes it only under that row's
# lock (SELECT ... FOR UPDATE), one transaction per reservation, which makes it
# exact across relay processes.


@dataclass(frozen=True)
class QuotaDecision:
    granted: bool
    sends: tuple[datetime, ...]  # the ring after the decision
    used: int  # entries in the window after the decision
    retry_after_seconds: int | None  # when refused: until enough entries left the window
    warn: bool  # this reservation reached QUOTA_WARN_AT


def window_sends(sends: Iterable[datetime], now: datetime, window: timedelta = QUOTA_WINDOW) -> list[datetime]:
    """The entries that still count at `now`, oldest first. An entry at `t` counts
    while now < t + window, i.e. it frees its slot exactly `window` after it was taken."""
    cutoff = now - window
    return sorted(s for s in sends if s > cutoff)


def reserve(
    sends: Iterable[datetime],
    now: datetime,
    count: int,
    *,
    limit: int = QUOTA_LIMIT,
    window: timedelta = QUOTA_WINDOW,
) -> QuotaDecision:
    """Take `count` slots at `now`, all or none."""
    if count < 1:
        raise ValueError("a reservation takes at least one slot")
    live = window_sends(sends, now, window)[-limit:]
    used = len(live)
    if used + count <= limit:
        warn_at = limit * 4 // 5
        # Sorted insert: another relay's clock may be a little ahead of ours.
        ring = tuple(sorted([*live, *([now] * count)]))
        return QuotaDecision(True, ring, used + count, None, used < warn_at <= used + count)
    if count > limit:
        return QuotaDecision(False, tuple(live), used, math.ceil(window.total_seconds()), False)
    # The (used + count - limit)-th oldest entry must leave before `count` slots are free.
    frees_at = live[used + count - limit - 1] + window
    retry = max(1, math.ceil((frees_at - now).total_seconds()))
    return QuotaDecision(False, tuple(live), used, retry, False)


def release(sends: Iterable[datetime], at: datetime, count: int) -> tuple[datetime, ...]:
    """Give back `count` slots taken at `at` (the upstream refused the message)."""
    out: list[datetime] = []
    left = count
    for s in sorted(sends):
        if left and s == at:
            left -= 1
            continue
        out.append(s)
    return tuple(out)


def quota_used(sends: Iterable[datetime], now: datetime, window: timedelta = QUOTA_WINDOW) -> int:
    return len(window_sends(sends, now, window))


def next_slot_seconds(sends: Iterable[datetime], now: datetime, *, limit: int = QUOTA_LIMIT) -> int | None:
    """Seconds until one slot frees, or None when one is free now."""
    decision = reserve(sends, now, 1, limit=limit)
    return None if decision.granted else decision.retry_after_seconds


def refusal_quota(retry_after_seconds: int, limit: int = QUOTA_LIMIT) -> Refusal:
    return Refusal(
        "quota_exceeded",
        "451 4.7.1",
        f"Quota of {limit} emails per hour reached; retry in {retry_after_seconds} seconds",
        "data",
        retry_after_seconds=retry_after_seconds,
    )


# ------------------------------------------------------------------ suspension


def record_violation(violations: Iterable[datetime], now: datetime) -> tuple[tuple[datetime, ...], bool]:
    """Add a marketing violation; returns the violations to keep (the newest ones
    inside 24 h, at most VIOLATIONS_TO_SUSPEND) and whether they reach suspension."""
    recent = sorted([*(v for v in violations if v > now - VIOLATION_WINDOW), now])[-VIOLATIONS_TO_SUSPEND:]
    return tuple(recent), len(recent) >= VIOLATIONS_TO_SUSPEND


def violations_in_window(violations: Iterable[datetime], now: datetime) -> int:
    return sum(1 for v in violations if v > now - VIOLATION_WINDOW)
