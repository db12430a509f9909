"""The TLS worker's SQL. Every function takes the caller's connection (its transaction)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from palisade_events.db import Connection

# States a domain is in while it belongs on the certificate.
ON_CERTIFICATE = ("issuing", "active")


@dataclass(frozen=True)
class Service:
    service_id: str
    hostname: str
    ipv4: str | None
    ipv6: str | None
    ssh_host: str
    ssh_port: int
    host_key: str
    next_attempt_at: datetime | None
    attempt_reason: str | None
    issue_requested_at: datetime | None
    force_issue: bool
    reset_requested: bool
    failures: int
    retry_not_before: datetime | None
    last_error: str | None
    applied_checksum: str | None
    applied_serial: str | None

    @property
    def addresses(self) -> list[str]:
        return [a for a in (self.ipv4, self.ipv6) if a]


@dataclass(frozen=True)
class DomainRow:
    service_id: str
    domain: str
    kind: str
    state: str
    added_at: datetime
    pending_since: datetime | None
    dns_checks: int
    next_dns_check_at: datetime | None
    last_error: str | None


@dataclass(frozen=True)
class Certificate:
    id: int
    service_id: str
    serial: str
    domains: list[str]
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    renew_at: datetime
    fullchain_pem: str
    key_id: str
    key_ciphertext: bytes
    status: str


def _service(row: asyncpg.Record | None) -> Service | None:
    if row is None:
        return None
    return Service(
        row["service_id"],
        row["hostname"],
        row["ipv4"],
        row["ipv6"],
        row["ssh_host"],
        row["ssh_port"],
        row["host_key"],
        row["next_attempt_at"],
        row["attempt_reason"],
        row["issue_requested_at"],
        row["force_issue"],
        row["reset_requested"],
        row["failures"],
        row["retry_not_before"],
        row["last_error"],
        row["applied_checksum"],
        row["applied_serial"],
    )


def _domain(row: asyncpg.Record) -> DomainRow:
    return DomainRow(
        row["service_id"],
        row["domain"],
        row["kind"],
        row["state"],
        row["added_at"],
        row["pending_since"],
        row["dns_checks"],
        row["next_dns_check_at"],
        row["last_error"],
    )


def _certificate(row: asyncpg.Record | None) -> Certificate | None:
    if row is None:
        return None
    return Certificate(
        row["id"],
        row["service_id"],
        row["serial"],
        list(row["domains"]),
        row["not_before"],
        row["not_after"],
        row["issued_at"],
        row["renew_at"],
        row["fullchain_pem"],
        row["key_id"],
        bytes(row["key_ciphertext"]),
        row["status"],
    )


# ------------------------------------------------------------------ services


async def upsert_service(
    db: Connection,
    service_id: str,
    *,
    hostname: str,
    ipv4: str | None,
    ipv6: str | None,
    ssh_host: str,
    ssh_port: int,
    host_key: str,
    now: datetime,
) -> Service | None:
    """Record a service's identity and addresses; returns what was known before."""
    before = await lock_service(db, service_id)
    await db.execute(
        "INSERT INTO services (service_id, hostname, ipv4, ipv6, ssh_host, ssh_port, host_key, created_at, updated_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)"
        " ON CONFLICT (service_id) DO UPDATE SET hostname = $2, ipv4 = $3, ipv6 = $4, ssh_host = $5, ssh_port = $6,"
        " host_key = $7, updated_at = $8",
        service_id,
        hostname,
        ipv4,
        ipv6,
        ssh_host,
        ssh_port,
        host_key,
        now,
    )
    return before


async def delete_service(db: Connection, service_id: str) -> bool:
    status = await db.execute("DELETE FROM services WHERE service_id = $1", service_id)
    await db.execute("DELETE FROM firewall WHERE service_id = $1", service_id)
    return bool(status == "DELETE 1")


async def lock_service(db: Connection, service_id: str, *, skip_locked: bool = False) -> Service | None:
    """The service row, locked for this transaction: one service's domain changes never interleave.
    With `skip_locked`, None when another transaction holds it."""
    lock = "FOR UPDATE SKIP LOCKED" if skip_locked else "FOR UPDATE"
    return _service(await db.fetchrow(f"SELECT * FROM services WHERE service_id = $1 {lock}", service_id))


async def get_service(db: Connection, service_id: str) -> Service | None:
    return _service(await db.fetchrow("SELECT * FROM services WHERE service_id = $1", service_id))


async def lock_vm(db: Connection, service_id: str) -> None:
    """Work on one service's VM and CA order happens one at a time across replicas (a
    transaction-scoped advisory lock; domain changes, which lock the row, never wait for it)."""
    await db.execute("SELECT pg_advisory_xact_lock(hashtextextended('tls.vm:' || $1, 0))", service_id)


# ------------------------------------------------------------------ port 80


async def port_80_open(db: Connection, service_id: str) -> bool:
    """As the firewall last said; open until it says otherwise (a disabled firewall opens everything)."""
    value = await db.fetchval("SELECT port_80_open FROM firewall WHERE service_id = $1", service_id)
    return True if value is None else bool(value)


async def record_firewall(db: Connection, service_id: str, is_open: bool, version: int, now: datetime) -> bool | None:
    """Project a FirewallApplied; returns whether port 80 was open before, or None when the
    event is older than what is known (a redelivered or overtaken event changes nothing)."""
    row = await db.fetchrow("SELECT port_80_open, version FROM firewall WHERE service_id = $1 FOR UPDATE", service_id)
    if row is not None and version < row["version"]:
        return None
    await db.execute(
        "INSERT INTO firewall (service_id, port_80_open, version, updated_at) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (service_id) DO UPDATE SET port_80_open = $2, version = $3, updated_at = $4",
        service_id,
        is_open,
        version,
        now,
    )
    return True if row is None else bool(row["port_80_open"])


# ------------------------------------------------------------------ domains


async def domains(db: Connection, service_id: str) -> list[DomainRow]:
    """The service's domains: its hostname first, then in the order they were added."""
    rows = await db.fetch(
        "SELECT * FROM domains WHERE service_id = $1 ORDER BY kind = 'custom', seq",
        service_id,
    )
    return [_domain(r) for r in rows]


async def get_domain(db: Connection, service_id: str, domain: str) -> DomainRow | None:
    row = await db.fetchrow("SELECT * FROM domains WHERE service_id = $1 AND domain = $2", service_id, domain)
    return _domain(row) if row else None


async def add_domain(
    db: Connection,
    service_id: str,
    domain: str,
    *,
    kind: str,
    state: str,
    now: datetime,
    next_dns_check_at: datetime | None = None,
    dns_checks: int = 0,
    last_error: str | None = None,
) -> None:
    await db.execute(
        "INSERT INTO domains (service_id, domain, kind, state, added_at, pending_since, dns_checks,"
        " next_dns_check_at, last_error, updated_at)"
        " VALUES ($1, $2, $3, $4, $5::timestamptz, CASE WHEN $4 IN ('pending_dns', 'proxied') THEN $5::timestamptz END,"
        " $6, $7, $8, $5::timestamptz)",
        service_id,
        domain,
        kind,
        state,
        now,
        dns_checks,
        next_dns_check_at,
        last_error,
    )


async def remove_domain(db: Connection, service_id: str, domain: str) -> DomainRow | None:
    row = await db.fetchrow("DELETE FROM domains WHERE service_id = $1 AND domain = $2 RETURNING *", service_id, domain)
    return _domain(row) if row else None


async def set_domain_state(
    db: Connection,
    service_id: str,
    domain: str,
    state: str,
    now: datetime,
    *,
    last_error: str | None = None,
) -> None:
    """A new state; leaving the DNS states clears their schedule."""
    await db.execute(
        "UPDATE domains SET state = $3, last_error = $4, updated_at = $5,"
        " pending_since = CASE WHEN $3 IN ('pending_dns', 'proxied') THEN coalesce(pending_since, $5) END,"
        " next_dns_check_at = CASE WHEN $3 IN ('pending_dns', 'proxied') THEN next_dns_check_at END,"
        " dns_checks = CASE WHEN $3 IN ('pending_dns', 'proxied') THEN dns_checks ELSE 0 END"
        " WHERE service_id = $1 AND domain = $2",
        service_id,
        domain,
        state,
        last_error,
        now,
    )


async def record_dns_pending(
    db: Connection,
    service_id: str,
    domain: str,
    state: str,
    *,
    checks: int,
    next_check_at: datetime,
    error: str | None,
    now: datetime,
    restart: bool = False,
) -> None:
    """The domain's DNS is not right yet (pending_dns or proxied): when to look again.
    `restart` starts the 7-day limit afresh (the user asked for another chance)."""
    await db.execute(
        "UPDATE domains SET state = $3, dns_checks = $4, next_dns_check_at = $5, last_error = $6, updated_at = $7,"
        " pending_since = CASE WHEN $8 THEN $7 ELSE coalesce(pending_since, $7) END"
        " WHERE service_id = $1 AND domain = $2",
        service_id,
        domain,
        state,
        checks,
        next_check_at,
        error,
        now,
        restart,
    )


async def move_domains(
    db: Connection, service_id: str, from_state: str, to_state: str, now: datetime, kinds: tuple[str, ...] = ()
) -> list[str]:
    """Every domain of the service in `from_state` moves to `to_state`; returns them."""
    rows = await db.fetch(
        "UPDATE domains SET state = $3, updated_at = $4, last_error = NULL"
        " WHERE service_id = $1 AND state = $2 AND (cardinality($5::text[]) = 0 OR kind = ANY($5::text[]))"
        " RETURNING domain",
        service_id,
        from_state,
        to_state,
        now,
        list(kinds),
    )
    return sorted(r["domain"] for r in rows)


async def activate_domains(db: Connection, service_id: str, names: list[str], now: datetime) -> None:
    """The names of a new certificate that still belong on it are active."""
    await db.execute(
        "UPDATE domains SET state = 'active', last_error = NULL, updated_at = $3"
        " WHERE service_id = $1 AND domain = ANY($2::text[]) AND state IN ('issuing', 'active')",
        service_id,
        names,
        now,
    )


async def count_domains(db: Connection, service_id: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM domains WHERE service_id = $1", service_id))


async def services_with_due_dns_checks(db: Connection, now: datetime, limit: int) -> list[str]:
    """Services with a pending or proxied domain whose next check is due (not locked)."""
    rows = await db.fetch(
        "SELECT service_id FROM domains WHERE state IN ('pending_dns', 'proxied') AND next_dns_check_at <= $1"
        " GROUP BY service_id ORDER BY min(next_dns_check_at) LIMIT $2",
        now,
        limit,
    )
    return [r["service_id"] for r in rows]


async def lock_due_dns_checks(db: Connection, service_id: str, now: datetime) -> list[DomainRow]:
    """The service's domains whose check is due, locked (after the service row)."""
    rows = await db.fetch(
        "SELECT * FROM domains WHERE service_id = $1 AND state IN ('pending_dns', 'proxied')"
        " AND next_dns_check_at <= $2 ORDER BY seq FOR UPDATE",
        service_id,
        now,
    )
    return [_domain(r) for r in rows]


async def domain_state_counts(db: Connection) -> dict[str, int]:
    rows = await db.fetch("SELECT state, count(*) AS n FROM domains GROUP BY state")
    return {r["state"]: int(r["n"]) for r in rows}


# ------------------------------------------------------------------ issuance schedule


async def schedule_issue(
    db: Connection,
    service_id: str,
    now: datetime,
    reason: str,
    *,
    force: bool = False,
    reset: bool = False,
    clear_failures: bool = False,
) -> None:
    """An issuance is due now and asked for (its request is emitted by the caller)."""
    await db.execute(
        "UPDATE services SET next_attempt_at = $2, attempt_reason = $3, issue_requested_at = $2, updated_at = $2,"
        " force_issue = force_issue OR $4, reset_requested = reset_requested OR $5,"
        " failures = CASE WHEN $6 THEN 0 ELSE failures END,"
        " last_error = CASE WHEN $6 THEN NULL ELSE last_error END"
        " WHERE service_id = $1",
        service_id,
        now,
        reason,
        force,
        reset,
        clear_failures,
    )


async def claim_due_issues(
    db: Connection, now: datetime, stale_before: datetime, limit: int
) -> list[tuple[str, str | None]]:
    """Services whose next attempt is due and not already asked for (or asked for so long ago
    that the request must have been parked): claimed and marked as asked for."""
    rows = await db.fetch(
        "UPDATE services SET issue_requested_at = $1 WHERE service_id IN ("
        " SELECT service_id FROM services WHERE next_attempt_at <= $1"
        " AND (issue_requested_at IS NULL OR issue_requested_at < $2)"
        " ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED)"
        " RETURNING service_id, attempt_reason",
        now,
        stale_before,
        limit,
    )
    return [(r["service_id"], r["attempt_reason"]) for r in rows]


async def record_attempt_done(
    db: Connection, service_id: str, *, next_attempt_at: datetime | None, reason: str | None, now: datetime
) -> None:
    """A request was handled (issued, or nothing was due): the next attempt is a renewal."""
    await db.execute(
        "UPDATE services SET issue_requested_at = NULL, next_attempt_at = $2, attempt_reason = $3,"
        " force_issue = false, reset_requested = false, failures = 0, retry_not_before = NULL, last_error = NULL,"
        " updated_at = $4 WHERE service_id = $1",
        service_id,
        next_attempt_at,
        reason,
        now,
    )


async def record_attempt_idle(
    db: Connection, service_id: str, *, next_attempt_at: datetime | None, reason: str | None, now: datetime
) -> None:
    """A request found nothing to do (or could not act yet); failures and flags stay."""
    await db.execute(
        "UPDATE services SET issue_requested_at = NULL, next_attempt_at = $2, attempt_reason = $3, updated_at = $4"
        " WHERE service_id = $1",
        service_id,
        next_attempt_at,
        reason,
        now,
    )


async def record_attempt_failed(
    db: Connection,
    service_id: str,
    *,
    failures: int,
    next_attempt_at: datetime,
    retry_not_before: datetime | None,
    error: str,
    now: datetime,
) -> None:
    await db.execute(
        "UPDATE services SET issue_requested_at = NULL, next_attempt_at = $2, attempt_reason = 'retry',"
        " failures = $3, retry_not_before = $4, last_error = $5, updated_at = $6 WHERE service_id = $1",
        service_id,
        next_attempt_at,
        failures,
        retry_not_before,
        error[:500],
        now,
    )


# ------------------------------------------------------------------ certificates


async def current_certificate(db: Connection, service_id: str) -> Certificate | None:
    return _certificate(
        await db.fetchrow("SELECT * FROM certificates WHERE service_id = $1 AND status = 'current'", service_id)
    )


async def store_certificate(
    db: Connection,
    service_id: str,
    *,
    serial: str,
    domains: list[str],
    not_before: datetime,
    not_after: datetime,
    issued_at: datetime,
    renew_at: datetime,
    fullchain_pem: str,
    key_id: str,
    key_ciphertext: bytes,
    set_aside_previous: bool,
) -> str | None:
    """The new current certificate; the previous one is kept as replaced (or set aside by a
    reset). Returns the previous serial."""
    previous = await db.fetchval(
        "UPDATE certificates SET status = $2 WHERE service_id = $1 AND status = 'current' RETURNING serial",
        service_id,
        "set_aside" if set_aside_previous else "replaced",
    )
    await db.execute(
        "INSERT INTO certificates (service_id, serial, domains, not_before, not_after, issued_at, renew_at,"
        " fullchain_pem, key_id, key_ciphertext, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'current')",
        service_id,
        serial,
        domains,
        not_before,
        not_after,
        issued_at,
        renew_at,
        fullchain_pem,
        key_id,
        key_ciphertext,
    )
    # Old replaced certificates and their keys are of no further use.
    await db.execute(
        "DELETE FROM certificates WHERE service_id = $1 AND status = 'replaced' AND id NOT IN ("
        " SELECT id FROM certificates WHERE service_id = $1 AND status = 'replaced' ORDER BY id DESC LIMIT 1)",
        service_id,
    )
    return str(previous) if previous is not None else None


async def claim_expiring(db: Connection, horizon: datetime, limit: int) -> list[Certificate]:
    """Current certificates expiring before `horizon` that were not warned about yet."""
    rows = await db.fetch(
        "SELECT * FROM certificates WHERE status = 'current' AND not_after < $1 AND expiry_warned_at IS NULL"
        " ORDER BY not_after LIMIT $2 FOR UPDATE SKIP LOCKED",
        horizon,
        limit,
    )
    return [c for c in (_certificate(r) for r in rows) if c is not None]


async def mark_warned(db: Connection, certificate_id: int, now: datetime) -> None:
    await db.execute("UPDATE certificates SET expiry_warned_at = $2 WHERE id = $1", certificate_id, now)


async def current_expiries(db: Connection) -> list[tuple[str, datetime]]:
    rows = await db.fetch("SELECT service_id, not_after FROM certificates WHERE status = 'current'")
    return [(r["service_id"], r["not_after"]) for r in rows]


# ------------------------------------------------------------------ the VM's configuration


async def mark_apply_requested(db: Connection, service_id: str, now: datetime) -> None:
    await db.execute(
        "UPDATE services SET apply_requested_at = $2, updated_at = $2 WHERE service_id = $1", service_id, now
    )


async def mark_applied(db: Connection, service_id: str, checksum: str, serial: str | None, now: datetime) -> None:
    await db.execute(
        "UPDATE services SET apply_requested_at = NULL, applied_checksum = $2, applied_serial = $3, apply_error = NULL,"
        " updated_at = $4 WHERE service_id = $1",
        service_id,
        checksum,
        serial,
        now,
    )


async def mark_apply_failed(db: Connection, service_id: str, error: str, now: datetime) -> None:
    await db.execute(
        "UPDATE services SET apply_requested_at = NULL, apply_error = $2, updated_at = $3 WHERE service_id = $1",
        service_id,
        error[:500],
        now,
    )


async def claim_stale_applies(db: Connection, requested_before: datetime, now: datetime, limit: int) -> list[str]:
    """VM writes still due long after they were asked for (their message was parked): claimed
    and marked as asked for again."""
    rows = await db.fetch(
        "UPDATE services SET apply_requested_at = $3 WHERE service_id IN ("
        " SELECT service_id FROM services WHERE apply_requested_at < $1"
        " ORDER BY apply_requested_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING service_id",
        requested_before,
        limit,
        now,
    )
    return [r["service_id"] for r in rows]


# ------------------------------------------------------------------ the ACME account


@dataclass(frozen=True)
class Account:
    directory_url: str
    account_uri: str | None
    key_id: str
    key_ciphertext: bytes


async def get_account(db: Connection, directory_url: str, *, lock: bool = False) -> Account | None:
    """The account at this CA; with `lock`, under an advisory lock held until the transaction
    ends (so only one replica creates it)."""
    if lock:
        await db.execute("SELECT pg_advisory_xact_lock(hashtextextended('tls.acme-account:' || $1, 0))", directory_url)
    row = await db.fetchrow("SELECT * FROM acme_accounts WHERE directory_url = $1", directory_url)
    if row is None:
        return None
    return Account(row["directory_url"], row["account_uri"], row["key_id"], bytes(row["key_ciphertext"]))


async def save_account(
    db: Connection, directory_url: str, account_uri: str, key_id: str, key_ciphertext: bytes, now: datetime
) -> None:
    await db.execute(
        "INSERT INTO acme_accounts (directory_url, account_uri, key_id, key_ciphertext, created_at)"
        " VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (directory_url) DO UPDATE SET account_uri = $2, key_id = $3, key_ciphertext = $4",
        directory_url,
        account_uri,
        key_id,
        key_ciphertext,
        now,
    )


# ------------------------------------------------------------------ key rotation


@dataclass(frozen=True)
class Sealed:
    """One ciphertext and what it is bound to."""

    table: str  # certificates | acme_accounts
    row: str  # certificates.id or acme_accounts.directory_url
    owner: tuple[str, str]  # (service_id, serial) or (directory_url, "")
    key_id: str
    ciphertext: bytes


async def claim_sealed_under_old_keys(db: Connection, current_key_id: str, limit: int) -> list[Sealed]:
    """Ciphertexts under any key but the current one, claimed for this transaction."""
    certs = await db.fetch(
        "SELECT id, service_id, serial, key_id, key_ciphertext FROM certificates WHERE key_id <> $1"
        " ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        current_key_id,
        limit,
    )
    accounts = await db.fetch(
        "SELECT directory_url, key_id, key_ciphertext FROM acme_accounts WHERE key_id <> $1 FOR UPDATE SKIP LOCKED",
        current_key_id,
    )
    return [
        Sealed("certificates", str(r["id"]), (r["service_id"], r["serial"]), r["key_id"], bytes(r["key_ciphertext"]))
        for r in certs
    ] + [
        Sealed("acme_accounts", r["directory_url"], (r["directory_url"], ""), r["key_id"], bytes(r["key_ciphertext"]))
        for r in accounts
    ]


async def reseal(db: Connection, sealed: Sealed, key_id: str, ciphertext: bytes) -> None:
    if sealed.table == "certificates":
        await db.execute(
            "UPDATE certificates SET key_id = $2, key_ciphertext = $3 WHERE id = $1",
            int(sealed.row),
            key_id,
            ciphertext,
        )
    else:
        await db.execute(
            "UPDATE acme_accounts SET key_id = $2, key_ciphertext = $3 WHERE directory_url = $1",
            sealed.row,
            key_id,
            ciphertext,
        )


async def sealed_counts(db: Connection) -> list[tuple[str, str, int]]:
    """(kind, key id, count) of every stored secret."""
    rows = await db.fetch(
        "SELECT 'certificate_key' AS kind, key_id, count(*) AS n FROM certificates GROUP BY key_id"
        " UNION ALL SELECT 'account_key', key_id, count(*) FROM acme_accounts GROUP BY key_id"
    )
    return [(r["kind"], r["key_id"], int(r["n"])) for r in rows]
