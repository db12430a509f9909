"""The code emails: rendered by a pure function, sent with aiosmtplib through the
platform's SMTP server (`PALISADE_PLATFORM_SMTP`)."""

from __future__ import annotations

import html
import logging
from datetime import datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from typing import Literal

import aiosmtplib

from palisade_events import TransientError

from .settings import SmtpTarget

log = logging.getLogger("palisade.mfa.mail")

Purpose = Literal["login", "account_action"]

_SUBJECTS: dict[Purpose, str] = {
    "login": "Your {issuer} login code",
    "account_action": "Your {issuer} security confirmation code",
}
_WHY: dict[Purpose, str] = {
    "login": "Someone (hopefully you) signed in to your {issuer} account with your password.",
    "account_action": "Someone (hopefully you) asked to change the two-factor authentication of your {issuer} account.",
}
_IF_NOT_YOU: dict[Purpose, str] = {
    "login": "If this was not you, do not share this code: change your password now, since someone knows it.",
    "account_action": "If this was not you, do not share this code, and change your password.",
}


def render_code_email(
    *,
    to: str,
    sender: str,
    code: str,
    purpose: Purpose,
    valid_for: timedelta,
    now: datetime,
    issuer: str,
) -> EmailMessage:
    """A clear plain-text email with an HTML alternative. The code is not in the subject
    (subjects end up in notifications and mail logs)."""
    minutes = int(valid_for.total_seconds() // 60)
    why = _WHY[purpose].format(issuer=issuer)
    if_not_you = _IF_NOT_YOU[purpose]
    text = (
        f"Hello,\n\n{why}\n\n"
        f"Your one-time code is:\n\n    {code}\n\n"
        f"It is valid for {minutes} minutes and works once.\n\n"
        f"{if_not_you}\n\n"
        f"-- {issuer}\n"
    )
    e = html.escape
    body_html = (
        '<!doctype html><html><body style="font-family: sans-serif; color: #222;">'
        f"<p>Hello,</p><p>{e(why)}</p>"
        "<p>Your one-time code is:</p>"
        '<p style="font-size: 28px; font-weight: bold; letter-spacing: 6px; font-family: monospace;">'
        f"{e(code)}</p>"
        f"<p>It is valid for {minutes} minutes and works once.</p>"
        f"<p>{e(if_not_you)}</p><p>&mdash; {e(issuer)}</p>"
        "</body></html>"
    )
    msg = EmailMessage()
    msg["Subject"] = _SUBJECTS[purpose].format(issuer=issuer)
    msg["From"] = sender
    msg["To"] = to
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=_domain_of(sender))
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(text)
    msg.add_alternative(body_html, subtype="html")
    return msg


def _domain_of(sender: str) -> str:
    address = parseaddr(sender)[1]
    try:
        return Address(addr_spec=address).domain or "palisade.localhost"
    except (ValueError, IndexError):
        return "palisade.localhost"


class UndeliverableError(Exception):
    """The SMTP server refused the recipient: retrying will not help."""


class Mailer:
    def __init__(self, target: SmtpTarget) -> None:
        self._target = target

    async def send(self, message: EmailMessage) -> None:
        t = self._target
        try:
            await aiosmtplib.send(
                message,
                hostname=t.hostname,
                port=t.port,
                username=t.username,
                password=t.password,
                use_tls=t.use_tls,
                start_tls=t.start_tls,
                timeout=t.timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused:
            raise UndeliverableError("recipient refused") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # Only the error class and the server's words: never the message being sent.
            raise TransientError(f"platform SMTP {t.hostname}:{t.port} unavailable: {type(exc).__name__}") from None
