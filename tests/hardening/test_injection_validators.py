"""The injection corpus against every pure check and renderer, directly: cheap, so it covers
every breaker in every position; test_injection_vms.py sends a sample through the workers."""

# ruff: noqa: RUF001 - look-alike characters are the point of this corpus

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime

import asyncssh
import pytest

from palisade_firewall import domain as fw
from palisade_mfa import domain as mfa
from palisade_smtp_relay import domain as smtp
from palisade_sshkeys import domain as keys
from palisade_tls import domain as tls
from tests.hardening.injection_corpus import BREAKERS, CONFUSABLE_DIGITS, OVERLONG, PAYLOADS, inserted

PLATFORM = ["vm.example.net"]
KEY = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
SENDER = "shop-1@vm.example.app"


# ------------------------------------------------------------------ tls: domains -> nginx server_name


@pytest.mark.parametrize(
    "raw",
    [*inserted("shop", ".example.com"), *inserted("shop.example.com", ""), *PAYLOADS, OVERLONG + ".com", "*.x.com"],
)
def test_a_domain_with_a_breaker_is_refused(raw: str) -> None:
    if raw.endswith(" ") or raw.endswith("\t"):
        raw += "x"  # surrounding blanks are trimmed (typed input); inside a name they are not
    with pytest.raises(tls.DomainRefused):
        tls.check_domain(raw, platform_domains=PLATFORM)


@pytest.mark.parametrize(
    "raw", ["раураl.com", "ѕhop.example.com", "shop.ехample.com", "ｓｈｏｐ.example.com", "Ⓢhop.com"]
)
def test_a_confusable_domain_reaches_nginx_only_as_ascii(raw: str) -> None:
    """Look-alike letters are IDNA's business: whatever is accepted is its A-label (xn--), ASCII only."""
    try:
        name = tls.check_domain(raw, platform_domains=PLATFORM).name
    except tls.DomainRefused:
        return
    assert re.fullmatch(r"[a-z0-9.-]+", name), name


# ------------------------------------------------------------------ firewall: ports and sources -> nft


def refused_or_canonical(make: Callable[[], fw.Rule], clean: fw.Rule) -> None:
    """A hostile value is refused, or parsed into exactly the clean rule (blanks around a port are
    trimmed, a case is lowered): the nftables text is rendered from parsed values, never from input."""
    try:
        parsed = make()
    except fw.RuleSetRefused:
        return
    assert parsed == clean
    assert fw.render_nftables([parsed]) == fw.render_nftables([clean])


@pytest.mark.parametrize(
    "ports", [*inserted("22", ""), *inserted("", "22"), *inserted("22", "-22"), *PAYLOADS, "1" * 400]
)
def test_a_port_with_a_breaker_is_refused_or_canonical(ports: str) -> None:
    refused_or_canonical(
        lambda: fw.rule("tcp", ports, None, ["10.0.0.0/8"]), fw.rule("tcp", "22", None, ["10.0.0.0/8"])
    )


@pytest.mark.parametrize(
    "ports",
    [*(d[1] * 2 for d in CONFUSABLE_DIGITS if not d[1].isascii()), "2\uff12", "\uff12\uff12-8080", "8000-\u0668\u0660"],
)
def test_a_port_in_look_alike_digits_is_refused(ports: str) -> None:
    with pytest.raises(fw.RuleSetRefused):
        fw.rule("tcp", ports, None, ["10.0.0.0/8"])


@pytest.mark.parametrize("source", [*inserted("10.0.0.0/8", ""), *inserted("10.0.0.0", "/8"), *PAYLOADS, OVERLONG])
def test_a_source_with_a_breaker_is_refused_or_canonical(source: str) -> None:
    refused_or_canonical(lambda: fw.rule("tcp", "22", None, [source]), fw.rule("tcp", "22", None, ["10.0.0.0/8"]))


@pytest.mark.parametrize("value", [*BREAKERS, *PAYLOADS, ";", " accept", "; accept"])
def test_a_protocol_or_icmp_type_with_a_breaker_is_refused_or_canonical(value: str) -> None:
    refused_or_canonical(lambda: fw.rule("tcp" + value, "22"), fw.rule("tcp", "22"))
    refused_or_canonical(lambda: fw.rule("icmp", None, "echo-request" + value), fw.rule("icmp", None, "echo-request"))


def test_an_oversized_rule_set_is_refused() -> None:
    rules = [
        {"protocol": "tcp", "ports": str(1000 + i), "sources": [f"10.{i // 250}.{i % 250}.0/24"]} for i in range(600)
    ]
    with pytest.raises(fw.RuleSetRefused):
        fw.judge_rule_set(
            rules, automation_sources=fw.ANYWHERE, port_80_was_open=False, tls_domains=0, acknowledge_tls_impact=False
        )


# ------------------------------------------------------------------ sshkeys: titles and keys -> authorized_keys


@pytest.mark.parametrize(
    "title", [t for t in inserted("laptop", "x") if not t[6:-1].isprintable() and t[6:-1] != "\t"] + ["x" * 101]
)
def test_a_title_that_could_break_a_line_is_refused(title: str) -> None:
    with pytest.raises(keys.KeyRefused):
        keys.clean_title(title)


@pytest.mark.parametrize("title", ["laptop;x", "a{b}c", 'it\'s "mine"', "$HOME `id`", "x # y", "laptop\tx"])
def test_a_title_with_shell_or_config_characters_stays_one_comment(title: str) -> None:
    """authorized_keys has no syntax after the key blob: these stay a comment on one line."""
    cleaned = keys.clean_title(title)
    parsed = keys.parse_public_key(KEY)
    stored = keys.StoredKey(parsed.fingerprint, cleaned, parsed.algorithm, parsed.bits, parsed.line, datetime.now(UTC))
    text = keys.render_authorized_keys(KEY, [stored])
    lines = text.decode().splitlines()
    assert len(lines) == 3
    assert lines[2].startswith("ssh-ed25519 ")


@pytest.mark.parametrize(
    "line",
    [
        *(KEY + b + "x" for b in ("\n", "\r", "\x00")),
        *(KEY + b + PAYLOADS[-1] for b in ("\n", "\r\n")),
        'command="id" ' + KEY,
        'from="*",no-pty ' + KEY,
        'environment="LD_PRELOAD=/x" ' + KEY,
        KEY.replace("ssh-ed25519", "ssh-ed25519\x00"),
        OVERLONG,
        "",
    ],
)
def test_a_public_key_line_with_options_or_a_second_line_is_refused(line: str) -> None:
    with pytest.raises(keys.KeyRefused):
        keys.parse_public_key(line)


def test_a_key_comment_never_reaches_the_file() -> None:
    """The stored line is re-exported from the parsed key: the user's comment is dropped."""
    parsed = keys.parse_public_key(KEY + " $(id);{x}")
    assert parsed.line.split() == KEY.split()[:2]


# ------------------------------------------------------------------ smtp: headers and addresses


@pytest.mark.parametrize(
    "value",
    [
        *(f"Shop{b}x <{SENDER}>" for b in ("\x00", "\u2028", "é", "\u202e")),
        f"=?utf-8?b?c2hvcEBiYW5rLmNvbQ==?= <{SENDER}>",
        f'"ceo@bank.com" <{SENDER}>',
        f"Shop (comment) <{SENDER}>",
        f"{SENDER} (ceo@bank.com)",
        f"<{SENDER}>, <ceo@bank.com>",
        f"Shop <{SENDER}> <ceo@bank.com>",
        f"group: {SENDER};",
        f"Shop <{SENDER}\n>",
        OVERLONG,
    ],
)
def test_a_from_value_that_could_spoof_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        smtp.header_address(value)


@pytest.mark.parametrize(
    "content",
    [
        f"From: {SENDER}\r\nTo: a@b.c\r\nSubject: x\nBcc: victim@x.y\r\n\r\nbody\r\n".encode(),
        f"From: {SENDER}\r\nTo: a@b.c\r\nSubject: x\rBcc: victim@x.y\r\n\r\nbody\r\n".encode(),
        f"From: {SENDER}\r\nTo: a@b.c\r\nSubject: x\x00y\r\n\r\nbody\r\n".encode(),
        f"From: {SENDER}\r\nnot a header line\r\n\r\nbody\r\n".encode(),
        f"From: {SENDER}\r\nFrom: ceo@bank.com\r\n\r\nbody\r\n".encode(),
        f"From: {SENDER}\r\n\r\nbody\n.\nMAIL FROM:<ceo@bank.com>\r\n".encode(),  # SMTP smuggling
    ],
)
def test_a_message_with_injected_headers_or_line_endings_is_refused(content: bytes) -> None:
    assert isinstance(smtp.screen_message(content, SENDER), smtp.Refusal)


# ------------------------------------------------------------------ mfa: codes


@pytest.mark.parametrize(
    "code", [*CONFUSABLE_DIGITS, *inserted("123", "456"), "12345", "1234567", OVERLONG, "", "\uff10"]
)
def test_a_code_that_is_not_six_ascii_digits_is_refused(code: str) -> None:
    if code in ("123 456", "123\t456"):
        return  # people type spaces inside codes: normalised by design
    assert not mfa.is_six_digits(code)
