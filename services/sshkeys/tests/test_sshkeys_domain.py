"""The pure key rules: parsing, refusals with their reasons, titles, rendering."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncssh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palisade_sshkeys import domain
from palisade_sshkeys.domain import KeyRefused, StoredKey

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def _public(key: asyncssh.SSHKey, comment: str = "") -> str:
    line = key.export_public_key("openssh").decode().strip()
    return f"{line} {comment}".strip()


@pytest.fixture(scope="module")
def keys() -> dict[str, asyncssh.SSHKey]:
    return {
        "ssh-ed25519": asyncssh.generate_private_key("ssh-ed25519"),
        "ecdsa-sha2-nistp256": asyncssh.generate_private_key("ecdsa-sha2-nistp256"),
        "ecdsa-sha2-nistp384": asyncssh.generate_private_key("ecdsa-sha2-nistp384"),
        "ecdsa-sha2-nistp521": asyncssh.generate_private_key("ecdsa-sha2-nistp521"),
        "ssh-rsa": asyncssh.generate_private_key("ssh-rsa", key_size=2048),
        "rsa-1024": asyncssh.generate_private_key("ssh-rsa", key_size=1024),
        "ssh-dss": asyncssh.generate_private_key("ssh-dss"),
    }


def _refused(text: str, title: str = "laptop", **kw: object) -> KeyRefused:
    options: dict[str, object] = {"existing": set(), "automation_fingerprint": "SHA256:none", "max_keys": 10}
    options.update(kw)
    with pytest.raises(KeyRefused) as refused:
        domain.accept_key(title, text, **options)  # type: ignore[arg-type]
    return refused.value


@pytest.mark.parametrize(
    ("name", "bits"),
    [
        ("ssh-ed25519", 256),
        ("ecdsa-sha2-nistp256", 256),
        ("ecdsa-sha2-nistp384", 384),
        ("ecdsa-sha2-nistp521", 521),
        ("ssh-rsa", 2048),
    ],
)
def test_accepted_key_types_with_openssh_fingerprints(
    keys: dict[str, asyncssh.SSHKey], name: str, bits: int, tmp_path: Path
) -> None:
    text = _public(keys[name], "me@laptop") + "\n"
    parsed = domain.parse_public_key(text)
    assert (parsed.algorithm, parsed.bits) == (name, bits)
    assert parsed.line == _public(keys[name])  # the user's comment is dropped
    # The fingerprint is exactly what OpenSSH prints.
    (tmp_path / "k.pub").write_text(text)
    printed = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "k.pub")], capture_output=True, text=True)
    assert printed.stdout.split()[:2] == [str(bits), parsed.fingerprint]


def test_refusals_each_have_their_reason(keys: dict[str, asyncssh.SSHKey]) -> None:
    ed = _public(keys["ssh-ed25519"])
    kind, blob = ed.split()
    short = keys["rsa-1024"]
    cert = keys["ssh-ed25519"].generate_user_certificate(keys["ssh-ed25519"], "root")
    cases = {
        "": "key_empty",
        "  \n": "key_empty",
        f"{ed}\n{ed}": "key_contains_newline",
        f"{kind}\r{blob}": "key_contains_newline",
        f"{ed}\x00": "key_contains_nul",
        f'command="/bin/sh" {ed}': "key_options_not_allowed",
        f'from="10.0.0.0/8" {ed}': "key_options_not_allowed",
        f"no-pty {ed}": "key_options_not_allowed",
        f'restrict,command="echo a b" {ed}': "key_options_not_allowed",
        f"environment=X=1 {ed}": "key_options_not_allowed",
        _public(keys["ssh-dss"]): "dsa_key_refused",
        _public(short): "rsa_key_too_short",
        cert.export_certificate("openssh").decode(): "key_certificate_not_supported",
        f"sk-ssh-ed25519@openssh.com {blob}": "key_type_unsupported",
        f"ssh-ed448 {blob}": "key_type_unsupported",
        f"ssh-rsa {blob}": "key_invalid",  # the blob is an ed25519 key
        f"{kind} AAAAC3NzaC1lZDI1NTE5AAAA": "key_invalid",
        f"{kind} not-base64!": "key_invalid",
        "hello world": "key_invalid",
        kind: "key_invalid",
    }
    got = {text: _refused(text).reason for text in cases}
    assert got == cases
    assert _refused(_public(short)).fingerprint == short.get_fingerprint("sha256")


def test_title_rules(keys: dict[str, asyncssh.SSHKey]) -> None:
    ed = _public(keys["ssh-ed25519"])
    assert domain.accept_key("  my   laptop\t", ed, existing=set(), automation_fingerprint="x", max_keys=1)[1] == (
        "my laptop"
    )
    assert domain.clean_title("é" * 100) == "é" * 100
    assert _refused(ed, title="x" * 101).reason == "title_too_long"
    assert _refused(ed, title="   ").reason == "title_empty"
    for bad in ("a\nb", "a\rb", "a\x00b", "a\x1bb", "right\u202eleft", "a\u2028b"):
        assert _refused(ed, title=bad).reason == "title_invalid_characters", repr(bad)


def test_duplicates_the_automation_key_and_the_limit_are_refused(keys: dict[str, asyncssh.SSHKey]) -> None:
    ed = _public(keys["ssh-ed25519"])
    fingerprint = keys["ssh-ed25519"].get_fingerprint("sha256")
    assert _refused(ed, existing={fingerprint}).reason == "duplicate_fingerprint"
    assert _refused(ed, automation_fingerprint=fingerprint).reason == "automation_key_reserved"
    assert _refused(ed, existing={"SHA256:a", "SHA256:b"}, max_keys=2).reason == "too_many_keys"


def _stored(key: asyncssh.SSHKey, title: str, minutes: int) -> StoredKey:
    parsed = domain.parse_public_key(_public(key))
    added = T0 + timedelta(minutes=minutes)
    return StoredKey(parsed.fingerprint, title, parsed.algorithm, parsed.bits, parsed.line, added)


def test_render_puts_the_automation_key_first_and_titles_as_comments(
    keys: dict[str, asyncssh.SSHKey], tmp_path: Path
) -> None:
    automation = asyncssh.generate_private_key("ssh-ed25519")
    later = _stored(keys["ssh-rsa"], "build server", 5)
    earlier = _stored(keys["ecdsa-sha2-nistp256"], "laptop", 1)
    content = domain.render_authorized_keys(_public(automation, "whatever comment"), [earlier, later])
    lines = content.decode().splitlines()
    assert lines == [
        domain.HEADER.strip(),
        f"{_public(automation)} palisade-automation",
        f"{earlier.line} laptop",
        f"{later.line} build server",
    ]
    assert content.endswith(b"\n")
    assert domain.checksum(content) == domain.checksum(bytes(content))
    assert len(domain.checksum(content)) == 64
    # OpenSSH reads it as three keys, in that order.
    (tmp_path / "authorized_keys").write_bytes(content)
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(tmp_path / "authorized_keys")], capture_output=True, text=True
    )

    assert [line.split()[1] for line in listed.stdout.splitlines()] == [
        automation.get_fingerprint("sha256"),
        earlier.fingerprint,
        later.fingerprint,
    ]


@settings(max_examples=300, deadline=None)
@given(title=st.text(min_size=1, max_size=120))
def test_no_title_can_add_a_line_or_an_option_to_the_file(title: str) -> None:
    automation = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3W3XqvGSHjZOLA1c5m6pY9bW2sF0H7n1d8oZk5y1Q"
    try:
        cleaned = domain.clean_title(title)
    except KeyRefused:
        return
    key = StoredKey("SHA256:x", cleaned, "ssh-ed25519", 256, automation, T0)
    lines = domain.render_authorized_keys(automation, [key]).decode().split("\n")
    assert len(lines) == 4
    assert lines[3] == ""
    kind, blob, comment = lines[2].split(" ", 2)
    assert (kind, blob, comment) == (*automation.split(), cleaned)
    assert len(cleaned) <= domain.MAX_TITLE_LENGTH


def test_only_the_form_of_a_fingerprint_is_one(keys: dict[str, asyncssh.SSHKey]) -> None:
    printed = next(iter(keys.values())).get_fingerprint("sha256")
    assert domain.is_fingerprint(printed)
    for text in (f"{printed}\x00", f"{printed} ", printed[:-1], printed.replace("SHA256", "MD5"), "", "my laptop"):
        assert not domain.is_fingerprint(text), text
