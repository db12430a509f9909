"""MFA's SQL. Every function takes the handler's connection (its transaction)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from palisade_events.db import Connection

from .domain import Account, Challenge, Lockout, Mode


def _account(row: asyncpg.Record) -> Account:
    return Account(
        account_id=row["account_id"],
        mode=row["mode"],
        email=row["email"],
        totp_key_id=row["totp_key_id"],
        totp_secret=row["totp_secret"],
        totp_last_step=row["totp_last_step"],
        pending_key_id=row["pending_key_id"],
        pending_secret=row["pending_secret"],
        pending_expires_at=row["pending_expires_at"],
        lockout=Lockout(tuple(row["failures"]), row["locked_until"]),
        email_codes_sent=tuple(row["email_codes_sent"]),
    )


def _challenge(row: asyncpg.Record | None) -> Challenge | None:
    if row is None:
        return None
    return Challenge(
        login_id=row["login_id"],
        account_id=row["account_id"],
        mode=row["mode"],
        expires_at=row["expires_at"],
        code_key_id=row["code_key_id"],
        code_hash=row["code_hash"],
        verified_at=row["verified_at"],
    )


# ------------------------------------------------------------------ accounts


async def lock_account(db: Connection, account_id: str, now: datetime) -> Account:
    """The account's row, created on first sight (email mode), locked for this
    transaction: one account's codes and counters never interleave across replicas."""
    await db.execute(
        "INSERT INTO accounts (account_id, created_at, updated_at) VALUES ($1, $2, $2)"
        " ON CONFLICT (account_id) DO NOTHING",
        account_id,
        now,
    )
    row = await db.fetchrow("SELECT * FROM accounts WHERE account_id = $1 FOR UPDATE", account_id)
    assert row is not None
    return _account(row)


async def get_account(db: Connection, account_id: str) -> Account | None:
    row = await db.fetchrow("SELECT * FROM accounts WHERE account_id = $1", account_id)
    return _account(row) if row is not None else None


async def set_email(db: Connection, account_id: str, email: str, now: datetime) -> None:
    await db.execute(
        "INSERT INTO accounts (account_id, email, created_at, updated_at) VALUES ($1, $2, $3, $3)"
        " ON CONFLICT (account_id) DO UPDATE SET email = $2, updated_at = $3",
        account_id,
        email,
        now,
    )


async def save_lockout(db: Connection, account_id: str, lockout: Lockout, now: datetime) -> None:
    await db.execute(
        "UPDATE accounts SET failures = $2, locked_until = $3, updated_at = $4 WHERE account_id = $1",
        account_id,
        list(lockout.failures),
        lockout.locked_until,
        now,
    )


async def record_email_code_sent(db: Connection, account_id: str, sent: Sequence[datetime], now: datetime) -> None:
    await db.execute(
        "UPDATE accounts SET email_codes_sent = $2, updated_at = $3 WHERE account_id = $1",
        account_id,
        list(sent),
        now,
    )


async def set_pending_totp(
    db: Connection, account_id: str, key_id: str, ciphertext: bytes, expires_at: datetime, now: datetime
) -> None:
    await db.execute(
        "UPDATE accounts SET pending_key_id = $2, pending_secret = $3, pending_expires_at = $4, updated_at = $5"
        " WHERE account_id = $1",
        account_id,
        key_id,
        ciphertext,
        expires_at,
        now,
    )


async def enable_totp(db: Connection, account_id: str, last_step: int, now: datetime) -> None:
    """The pending secret becomes the account's secret; the confirming step is spent."""
    await db.execute(
        "UPDATE accounts SET mode = 'totp', totp_key_id = pending_key_id, totp_secret = pending_secret,"
        " totp_last_step = $2, pending_key_id = NULL, pending_secret = NULL, pending_expires_at = NULL,"
        " updated_at = $3 WHERE account_id = $1",
        account_id,
        last_step,
        now,
    )


async def set_totp_last_step(db: Connection, account_id: str, step: int, now: datetime) -> None:
    await db.execute(
        "UPDATE accounts SET totp_last_step = $2, updated_at = $3 WHERE account_id = $1", account_id, step, now
    )


async def set_mode(db: Connection, account_id: str, mode: Mode, now: datetime) -> None:
    """Switch to email or disabled: the TOTP secret, a pending one and the recovery codes go."""
    assert mode != "totp", "TOTP is enabled with enable_totp"
    await db.execute(
        "UPDATE accounts SET mode = $2, totp_key_id = NULL, totp_secret = NULL, totp_last_step = NULL,"
        " pending_key_id = NULL, pending_secret = NULL, pending_expires_at = NULL, updated_at = $3"
        " WHERE account_id = $1",
        account_id,
        mode,
        now,
    )
    await db.execute("DELETE FROM recovery_codes WHERE account_id = $1", account_id)
    await db.execute("DELETE FROM action_codes WHERE account_id = $1", account_id)


# ------------------------------------------------------------------ login challenges


async def get_challenge(db: Connection, login_id: str, *, lock: bool = False) -> Challenge | None:
    sql = "SELECT * FROM login_challenges WHERE login_id = $1" + (" FOR UPDATE" if lock else "")
    return _challenge(await db.fetchrow(sql, login_id))


async def put_challenge(
    db: Connection,
    login_id: str,
    account_id: str,
    mode: Mode,
    code: tuple[str, bytes] | None,
    now: datetime,
    expires_at: datetime,
) -> None:
    """Open (or reopen, with a new code) the challenge of a login."""
    key_id, code_hash = code if code is not None else (None, None)
    await db.execute(
        "INSERT INTO login_challenges (login_id, account_id, mode, code_key_id, code_hash, issued_at, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT (login_id) DO UPDATE SET mode = $3, code_key_id = $4, code_hash = $5,"
        " issued_at = $6, expires_at = $7",
        login_id,
        account_id,
        mode,
        key_id,
        code_hash,
        now,
        expires_at,
    )


async def mark_challenge_verified(db: Connection, login_id: str, now: datetime) -> None:
    await db.execute("UPDATE login_challenges SET verified_at = $2 WHERE login_id = $1", login_id, now)


async def prune_challenges(db: Connection, before: datetime) -> int:
    result = await db.execute("DELETE FROM login_challenges WHERE expires_at < $1", before)
    return int(result.split()[-1])


# ------------------------------------------------------------------ account-action codes


async def put_action_code(
    db: Connection, account_id: str, code: tuple[str, bytes], now: datetime, expires_at: datetime
) -> None:
    await db.execute(
        "INSERT INTO action_codes (account_id, code_key_id, code_hash, issued_at, expires_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id) DO UPDATE SET code_key_id = $2, code_hash = $3,"
        " issued_at = $4, expires_at = $5, used_at = NULL",
        account_id,
        code[0],
        code[1],
        now,
        expires_at,
    )


async def get_action_code(db: Connection, account_id: str) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM action_codes WHERE account_id = $1", account_id)


async def mark_action_code_used(db: Connection, account_id: str, now: datetime) -> None:
    await db.execute("UPDATE action_codes SET used_at = $2 WHERE account_id = $1", account_id, now)


# ------------------------------------------------------------------ recovery codes


async def replace_recovery_codes(
    db: Connection, account_id: str, hashes: Sequence[tuple[str, bytes]], now: datetime
) -> None:
    await db.execute("DELETE FROM recovery_codes WHERE account_id = $1", account_id)
    await db.executemany(
        "INSERT INTO recovery_codes (account_id, code_key_id, code_hash, issued_at) VALUES ($1, $2, $3, $4)",
        [(account_id, key_id, digest, now) for key_id, digest in hashes],
    )


async def unused_recovery_codes(db: Connection, account_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT id, code_key_id, code_hash FROM recovery_codes WHERE account_id = $1 AND used_at IS NULL ORDER BY id",
        account_id,
    )


async def use_recovery_code(db: Connection, code_id: int, now: datetime) -> None:
    await db.execute("UPDATE recovery_codes SET used_at = $2 WHERE id = $1", code_id, now)


async def count_unused_recovery_codes(db: Connection, account_id: str) -> int:
    n = await db.fetchval("SELECT count(*) FROM recovery_codes WHERE account_id = $1 AND used_at IS NULL", account_id)
    return int(n)


# ------------------------------------------------------------------ keys and gauges


async def claim_stale_ciphertexts(db: Connection, current_key_id: str, limit: int = 100) -> list[asyncpg.Record]:
    """Accounts whose TOTP secrets (active or pending) are under another key than the
    current one, locked; other replicas skip them."""
    return await db.fetch(
        "SELECT account_id, totp_key_id, totp_secret, pending_key_id, pending_secret FROM accounts"
        " WHERE totp_key_id <> $1 OR pending_key_id <> $1 ORDER BY account_id LIMIT $2 FOR UPDATE SKIP LOCKED",
        current_key_id,
        limit,
    )


async def replace_ciphertexts(
    db: Connection,
    account_id: str,
    totp: tuple[str, bytes] | None,
    pending: tuple[str, bytes] | None,
) -> None:
    if totp is not None:
        await db.execute(
            "UPDATE accounts SET totp_key_id = $2, totp_secret = $3 WHERE account_id = $1", account_id, *totp
        )
    if pending is not None:
        await db.execute(
            "UPDATE accounts SET pending_key_id = $2, pending_secret = $3 WHERE account_id = $1", account_id, *pending
        )


async def key_ids_in_use(db: Connection, now: datetime) -> set[str]:
    """Key ids that still protect something that can be needed: TOTP secrets, unused
    recovery codes, live email codes."""
    rows = await db.fetch(
        "SELECT totp_key_id AS k FROM accounts WHERE totp_key_id IS NOT NULL"
        " UNION SELECT pending_key_id FROM accounts WHERE pending_key_id IS NOT NULL AND pending_expires_at > $1"
        " UNION SELECT code_key_id FROM recovery_codes WHERE used_at IS NULL"
        " UNION SELECT code_key_id FROM login_challenges WHERE code_key_id IS NOT NULL AND expires_at > $1"
        " AND verified_at IS NULL"
        " UNION SELECT code_key_id FROM action_codes WHERE expires_at > $1 AND used_at IS NULL",
        now,
    )
    return {r["k"] for r in rows}


async def accounts_by_mode(db: Connection) -> dict[str, int]:
    rows = await db.fetch("SELECT mode, count(*) AS n FROM accounts GROUP BY mode")
    counts = {"disabled": 0, "email": 0, "totp": 0}
    counts.update({r["mode"]: int(r["n"]) for r in rows})
    return counts


async def stored_secrets_by_key(db: Connection) -> dict[tuple[str, str], int]:
    """(kind, key id) -> how many stored secrets and code hashes use that key."""
    rows = await db.fetch(
        "SELECT 'totp_secret' AS kind, totp_key_id AS k, count(*) AS n FROM accounts"
        " WHERE totp_key_id IS NOT NULL GROUP BY totp_key_id"
        " UNION ALL SELECT 'pending_totp_secret', pending_key_id, count(*) FROM accounts"
        " WHERE pending_key_id IS NOT NULL GROUP BY pending_key_id"
        " UNION ALL SELECT 'recovery_code', code_key_id, count(*) FROM recovery_codes"
        " WHERE used_at IS NULL GROUP BY code_key_id"
    )
    return {(r["kind"], r["k"]): int(r["n"]) for r in rows}
