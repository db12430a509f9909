"""`palisade mfa ...`: the dashboard's Security tab, from a terminal.

Exit codes: 0 done / valid, 1 refused / invalid (the reason is printed), 2 no answer in
time. Secrets shown here (the TOTP secret, recovery codes) come from request/reply
answers addressed to this process only.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import segno
import typer
from rich.console import Console

from palisade_events import Actor, Payload
from palisade_events.cli.commands import ask, run_with_client, send
from palisade_events.client import PalisadeClient
from palisade_events.contract import mfa as m

from .crypto import generate_key

app = typer.Typer(
    help="Multi-factor authentication of platform accounts: email codes, authenticator apps (TOTP).",
    no_args_is_help=True,
)
console = Console(highlight=False, soft_wrap=True)
USER = Actor(kind="user", id="cli")


async def _prompt(text: str, *, hide: bool = False) -> str:
    # In a thread: the broker connection keeps its heartbeats while the user types.
    answer: str = await asyncio.to_thread(typer.prompt, text, hide_input=hide, default="", show_default=False)
    return answer


async def _request(client: PalisadeClient, query: Any, account_id: str | None, timeout: float) -> Any:
    """The query's reply; exits 1 when refused, 2 on silence."""
    code, reply = await ask(client, query, account_id=account_id, timeout=timeout)
    if reply is None:
        raise typer.Exit(code)
    return reply


async def _command(
    client: PalisadeClient, payload: Payload, account_id: str, outcomes: tuple[type[Payload], ...], timeout: float
) -> Any:
    """Publish, then wait for the event it caused; exits 1 on a rejection, 2 on silence."""
    code, answer = await send(client, payload, outcomes, account_id=account_id, timeout=timeout)
    if code != 0 or answer is None:
        raise typer.Exit(code)
    return answer


@app.command("setup-totp")
def setup_totp(account_id: str, timeout: float = typer.Option(10.0, help="Seconds to wait for each answer")) -> None:
    """Set up an authenticator app: shows the QR code, secret and URI, then asks for a code."""

    async def body(client: PalisadeClient) -> int:
        setup: m.MfaTotpSetupReply = await _request(client, m.MfaTotpSetupRequested(), account_id, timeout)
        if not setup.accepted:
            console.print(f"[red]refused[/red]: {setup.reason}")
            return 1
        assert setup.otpauth_uri is not None
        segno.make(setup.otpauth_uri, error="m").terminal(out=sys.stdout, compact=True)
        sys.stdout.flush()
        console.print("Scan the QR code with your authenticator app, or enter the secret by hand.")
        console.print(f"Secret: {setup.secret}")
        console.print(f"URI: {setup.otpauth_uri}")
        console.print("Please save this secret for recovering in case you lose or delete your authenticator app.")
        code = (await _prompt("Code from your authenticator app")).strip()
        confirm: m.MfaTotpConfirmReply = await _request(
            client, m.MfaTotpConfirmRequested(code=code or "-"), account_id, timeout
        )
        if not confirm.enabled:
            console.print(f"[red]not enabled[/red]: {confirm.reason}")
            return 1
        console.print("[green]Authenticator app enabled.[/green] Recovery codes (each works once; shown only now):")
        for recovery in confirm.recovery_codes:
            console.print(f"  {recovery}")
        return 0

    run_with_client(body, actor=USER)


@app.command()
def email(
    account_id: str,
    enable: bool = typer.Option(False, "--enable", help="Use email codes (the default mode)"),
    code: str | None = typer.Option(None, help="Authenticator or recovery code, needed when leaving TOTP"),
    timeout: float = typer.Option(10.0),
) -> None:
    """Switch an account to email codes."""
    if not enable:
        console.print("Nothing to do: pass --enable (to turn MFA off, use `palisade mfa disable`).")
        raise typer.Exit(2)

    async def body(client: PalisadeClient) -> int:
        nonlocal code
        state: m.MfaStatusReply = await _request(client, m.MfaStatus(), account_id, timeout)
        if state.mode == "totp" and not code:
            code = (await _prompt("Code from your authenticator app (or a recovery code)", hide=True)).strip()
        outcomes = (m.MfaEmailEnabled, m.MfaChangeRejected)
        await _command(client, m.MfaEmailEnableRequested(code=code or None), account_id, outcomes, timeout)
        console.print("[green]Email codes enabled.[/green]")
        return 0

    run_with_client(body, actor=USER)


@app.command()
def disable(
    account_id: str,
    code: str | None = typer.Option(None, help="A current code (prompted for when missing)"),
    timeout: float = typer.Option(10.0),
) -> None:
    """Turn MFA off: asks for the word `disable` and a current code."""

    async def body(client: PalisadeClient) -> int:
        nonlocal code
        word = await _prompt("Type the word disable to confirm")
        state: m.MfaStatusReply = await _request(client, m.MfaStatus(), account_id, timeout)
        if state.mode == "email" and not code:
            sent = (m.MfaEmailCodeSent, m.MfaChangeRejected)
            await _command(client, m.MfaEmailCodeRequested(), account_id, sent, timeout)
            console.print("A code was sent to the account's email address.")
        if not code:
            code = (await _prompt("Code", hide=True)).strip()
        outcomes = (m.MfaDisabled, m.MfaChangeRejected)
        await _command(
            client, m.MfaDisableRequested(confirmation=word, code=code or None), account_id, outcomes, timeout
        )
        console.print("[green]MFA disabled.[/green]")
        return 0

    run_with_client(body, actor=USER)


@app.command()
def verify(
    login_id: str,
    code: str,
    account: str | None = typer.Option(None, help="The login's account, if known"),
    timeout: float = typer.Option(10.0),
) -> None:
    """Is CODE valid for the login LOGIN_ID? (What the dashboard asks.)"""

    async def body(client: PalisadeClient) -> int:
        reply: m.VerifyLoginCodeReply = await _request(
            client, m.VerifyLoginCode(login_id=login_id, code=code), account, timeout
        )
        if reply.valid:
            console.print("[green]valid[/green]")
            return 0
        console.print(f"[red]invalid[/red]: {reply.reason}")
        return 1

    run_with_client(body, actor=USER)


@app.command()
def status(account_id: str, timeout: float = typer.Option(10.0)) -> None:
    """Show an account's MFA mode, lock and recovery codes left."""

    async def body(client: PalisadeClient) -> int:
        s: m.MfaStatusReply = await _request(client, m.MfaStatus(), account_id, timeout)
        locked = f", locked until {s.locked_until.isoformat()}" if s.locked_until else ""
        console.print(
            f"{s.account_id}: mode {s.mode}, email {'known' if s.email_known else 'unknown'},"
            f" {s.recovery_codes_left} recovery codes left{locked}"
        )
        return 0

    run_with_client(body, actor=USER)


@app.command()
def reset(
    account_id: str,
    ticket: str = typer.Option(..., help="The support ticket"),
    operator: str = typer.Option(..., help="Who resets (the support operator)"),
    timeout: float = typer.Option(10.0),
) -> None:
    """Support: turn MFA off after checking the owner's identity (audited with ticket and operator)."""

    async def body(client: PalisadeClient) -> int:
        outcomes = (m.MfaDisabled, m.MfaChangeRejected)
        await _command(client, m.MfaResetBySupport(ticket=ticket, operator=operator), account_id, outcomes, timeout)
        console.print("[green]MFA reset.[/green]")
        return 0

    run_with_client(body, actor=Actor(kind="support", id=operator))


@app.command("generate-key")
def generate_key_command(key_id: str = typer.Argument(..., help="An id for the key, e.g. k-2026-11")) -> None:
    """Print a new key for PALISADE_MFA_KEY (keep it in your secret store, not in a file in git)."""
    typer.echo(generate_key(key_id))


if __name__ == "__main__":
    app()
