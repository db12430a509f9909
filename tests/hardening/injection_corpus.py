"""The injection corpus of the hardening tests: what could end or extend a line, a directive, a
header or a command in the files and protocols Palisade writes (nftables, nginx, authorized_keys,
SMTP), plus confusables, overlong strings and oversized lists."""

# ruff: noqa: RUF001 - look-alike characters are the point of this corpus

from __future__ import annotations

# Inserted into otherwise valid values ("shop" + X + ".example.com", "22" + X, a title + X).
BREAKERS = [
    "\n",
    "\r",
    "\r\n",
    "\x00",
    ";",
    "{",
    "}",
    "'",
    '"',
    "$",
    "`",
    " ",
    "\t",
    "#",
    "/",
    "\\",
    "\u2028",  # line separator
    "\u2029",  # paragraph separator
    "\u0085",  # next line
    "\u200b",  # zero-width space
    "\u202e",  # right-to-left override
    "\ufeff",  # byte order mark
]
# Whole values aimed at a renderer: each tries to close what it is in and open something else.
PAYLOADS = [
    "x; include /etc/passwd;",
    "x { return 200; }",
    "x}\nserver { listen 80; }",
    "$(id)",
    "`id`",
    "${HOME}",
    "x\ntable inet evil { }",
    "0.0.0.0/0 accept",
    "x\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3W3XqvGSHjZOLA1c5m6pY9bW2sF0H7n1d8oZk5y1Q evil",
]
OVERLONG = "a" * 5000
# Look-alike digits people (or attackers) might type where six ASCII digits are expected.
CONFUSABLE_DIGITS = [
    "１２３４５６",  # fullwidth
    "١٢٣٤٥٦",  # Arabic-Indic
    "۱۲۳۴۵۶",  # extended Arabic-Indic
    "߁߂߃߄߅߆",  # NKo
    "𝟏𝟐𝟑𝟒𝟓𝟔",  # mathematical bold
    "12345６",
    "¹²³⁴⁵⁶",  # superscripts (str.isdigit() says True)
]


def inserted(prefix: str, suffix: str) -> list[str]:
    return [prefix + b + suffix for b in BREAKERS]
