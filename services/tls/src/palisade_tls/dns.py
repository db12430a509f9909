"""DNS lookups (dnspython), through the configured resolver. What the answers mean is
`domain.judge_dns`'s business."""

from __future__ import annotations

import asyncio

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from .domain import DnsAnswer


class Resolver:
    def __init__(self, servers: list[str], port: int = 53, timeout: float = 3.0) -> None:
        if servers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = list(servers)
            self._resolver.port = port
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.cache = None  # a re-check must see the record the user just created
        self._timeout = timeout

    async def lookup(self, domain: str) -> DnsAnswer:
        """The domain's CNAME target (if any) and its A/AAAA addresses, CNAMEs followed."""
        cname, v4, v6 = await asyncio.gather(
            self._query(domain, "CNAME"), self._query(domain, "A"), self._query(domain, "AAAA")
        )
        errors = [r for r in (cname, v4, v6) if isinstance(r, str)]
        target = None
        if isinstance(cname, list) and cname:
            target = cname[0]
        addresses = [a for r in (v4, v6) if isinstance(r, list) for a in r]
        return DnsAnswer(cname=target, addresses=tuple(addresses), error="; ".join(errors) or None)

    async def _query(self, domain: str, rdtype: str) -> list[str] | str:
        """The answer's values, [] when there are none, or the error text."""
        try:
            answer = await self._resolver.resolve(
                domain, rdtype, raise_on_no_answer=False, lifetime=self._timeout, search=False
            )
        except dns.resolver.NXDOMAIN:
            return []
        except dns.resolver.NoNameservers as exc:
            return f"{rdtype}: no name server answered ({exc.msg})"[:200]
        except dns.exception.Timeout:
            return f"{rdtype}: timed out"
        except dns.exception.DNSException as exc:
            return f"{rdtype}: {type(exc).__name__}"
        if answer.rrset is None:
            return []
        if rdtype == "CNAME":
            return [str(r.target).rstrip(".").lower() for r in answer.rrset]
        return [str(r.address) for r in answer.rrset]
