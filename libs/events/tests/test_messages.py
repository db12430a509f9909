"""Pure tests of the contract: envelopes, strict decoding, the x-death attempt count."""

from __future__ import annotations

import json

import pytest

from palisade_events.contract import CONTRACT
from palisade_events.contract.platform import ServiceDeprovisioned, ServiceProvisioned, SshEndpoint
from palisade_events.messages import DecodeError, encode, new_envelope
from palisade_events.topology import attempts_from_x_death

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3W3XqvGSHjZOLA1c5m6pY9bW2sF0H7n1d8oZk5y1Q"


def provisioned(**kw: object) -> ServiceProvisioned:
    base: dict[str, object] = {
        "service_id": "svc-1",
        "name": "redis-bgrkj",
        "software": "redis",
        "account_id": "acc-1",
        "hostname": "redis-bgrkj-u76.vm.example.net",
        "ipv4": "23.88.47.208",
        "private_ip": "10.0.0.5",
        "ssh": SshEndpoint(host="10.0.0.5", port=22, host_key=KEY),
    }
    base.update(kw)
    return ServiceProvisioned(**base)  # type: ignore[arg-type]


def test_envelope_round_trips_through_json() -> None:
    env = new_envelope(provisioned(), service_id="svc-1")
    back = CONTRACT.decode(encode(env))
    assert back == env
    assert back.correlation_id == env.message_id  # a fresh action correlates to itself
    assert ServiceProvisioned.routing_key() == "platform.ServiceProvisioned"


def test_strict_decoding_refuses_coercion_and_extra_fields() -> None:
    body = json.loads(encode(new_envelope(ServiceDeprovisioned(service_id="svc-1"))))
    body["payload"]["surprise"] = True
    with pytest.raises(DecodeError, match=r"payload.surprise: Extra inputs are not permitted"):
        CONTRACT.decode(json.dumps(body).encode())
    body = json.loads(encode(new_envelope(provisioned())))
    body["payload"]["ssh"]["port"] = "22"
    with pytest.raises(DecodeError, match=r"payload.ssh.port: Input should be a valid integer"):
        CONTRACT.decode(json.dumps(body).encode())


def test_decode_errors_do_not_echo_input_values() -> None:
    body = json.loads(encode(new_envelope(provisioned())))
    body["payload"]["name"] = "SECRET-VALUE-123!"
    with pytest.raises(DecodeError) as exc:
        CONTRACT.decode(json.dumps(body).encode())
    assert "SECRET-VALUE-123" not in str(exc.value)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not a Palisade envelope"),
        (b"[1,2]", "not a Palisade envelope"),
        (json.dumps({"type": "Nope"}).encode(), "unknown message type 'Nope'"),
        (json.dumps({"type": "ServiceDeprovisioned"}).encode(), "invalid ServiceDeprovisioned"),
    ],
)
def test_garbage_gets_a_readable_reason(body: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        CONTRACT.decode(body)


def test_bounds_are_enforced() -> None:
    with pytest.raises(ValueError, match="at most 64 characters"):
        ServiceDeprovisioned(service_id="x" * 65)
    with pytest.raises(ValueError, match="Octet 300"):
        provisioned(ipv4="300.1.1.1")


def test_attempts_are_counted_from_the_retry_queues_in_x_death() -> None:
    headers = {
        "x-death": [
            {"queue": "palisade.w.retry.1000ms", "count": 1, "reason": "expired"},
            {"queue": b"palisade.w.retry.10000ms", "count": 1, "reason": "expired"},
            {"queue": "palisade.other.retry.1000ms", "count": 5, "reason": "expired"},
            {"queue": "palisade.w", "count": 1, "reason": "rejected"},
        ]
    }
    assert attempts_from_x_death(headers, "w") == 2
    assert attempts_from_x_death({}, "w") == 0
    assert attempts_from_x_death({"x-death": "garbage"}, "w") == 0


def test_every_contract_type_documents_its_fields() -> None:
    for cls in CONTRACT:
        assert cls.__doc__, f"{cls.__name__} has no docstring"
        for name, field in cls.model_fields.items():
            assert field.description or field.annotation is not None, f"{cls.__name__}.{name}"
