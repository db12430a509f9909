"""A VM cut off from the network (the host's end of its veth pair down) while firewall,
SSH-key and rate-limit changes for it arrive.

Back within the retry ladder: every change is retried, then applied once the link is
up, and nothing is parked. Gone for longer: each apply is parked with the reason, and
`palisade dead replay` puts it in force once the VM is reachable again.

The workers keep a pooled SSH connection to the VM from the first applies; a cut link
leaves it silently dead (no RST, no FIN), so what ends it is asyncssh's keepalive
(0.5 s here, 3 missed) — the ladder then meets a fast "network unreachable".
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.fixtures import wait_until
from tests.hardening.fault_vm import (
    APPLIED,
    APPLY_TYPES,
    VM_WORKERS,
    VmWorkers,
    hostctl,
    palisade_cli,
    parked_messages,
    set_link,
    vm_state,
)
from tests.vms import MakeVms, VmSession

pytestmark = pytest.mark.root

# Short, but with room: the last attempt comes 6.5 s after the first failure.
RETRY_DELAYS = [0.5, 2.0, 4.0]


def retried(worker: str) -> float:
    labels = {"worker": worker, "type": APPLY_TYPES[worker], "outcome": "retried"}
    return REGISTRY.get_sample_value("palisade_messages_total", labels) or 0.0


@pytest.fixture
async def workers(run_worker: Any, client: Any, collect: Any, testvms: VmSession) -> VmWorkers:
    settings = hostctl(testvms, keepalive_seconds=0.5)
    return await VmWorkers.start(run_worker, client, collect, settings, retry_delays=RETRY_DELAYS, db_pool_size=20)


@pytest.mark.timeout(120)
async def test_a_cut_off_vm_gets_its_changes_once_the_link_is_back_and_parked_ones_apply_on_replay(
    workers: VmWorkers, make_vms: MakeVms, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    back_vm, lost_vm = await make_vms(2)
    back_service = await workers.provision(back_vm)
    lost_service = await workers.provision(lost_vm)
    lines = []

    # ---- back within the ladder
    before = {w: retried(w) for w in VM_WORKERS}
    await set_link(back_vm, up=False)
    cut_at = time.perf_counter()
    change = await workers.change(back_service, 5002, 37)
    assert not any((await vm_state(back_vm, change)).values())
    await wait_until(
        lambda: all(retried(w) > before[w] for w in VM_WORKERS), timeout=15, what="every apply retried once"
    )
    await set_link(back_vm, up=True)
    up_at = time.perf_counter()
    outcomes = {w: await workers.outcome(w, change.envs[w], timeout=20) for w in VM_WORKERS}
    applied_after = time.perf_counter() - up_at
    assert {w: o["type"] for w, o in outcomes.items()} == APPLIED
    assert await vm_state(back_vm, change) == dict.fromkeys(VM_WORKERS, True)
    retries = {w: round(retried(w) - before[w]) for w in VM_WORKERS}
    assert not [w for w in VM_WORKERS if workers.failed_audits(w, change.envs[w])], "an apply was parked"
    assert [len(await parked_messages(w)) for w in VM_WORKERS] == [0, 0, 0]
    applied_twice = sum(
        len([e for e in workers.of(correlation_id=str(change.envs[w].correlation_id)) if e["type"] == APPLIED[w]]) - 1
        for w in VM_WORKERS
    )
    assert applied_twice == 0
    lines.append(
        f"[fault] VM link down {up_at - cut_at:.2f}s (back within the ladder): 3 changes in flight, lost=0, parked=0,"
        f" duplicated=0, retries={retries}, applied {applied_after:.2f}s after the link came back"
    )

    # ---- gone for longer than the ladder: parked with the reason, then replayed
    await set_link(lost_vm, up=False)
    cut_at = time.perf_counter()
    change = await workers.change(lost_service, 5003, 41)
    await wait_until(
        lambda: all(workers.failed_audits(w, change.envs[w]) for w in VM_WORKERS),
        timeout=30,
        what="every apply parked after the ladder",
    )
    parked_after = time.perf_counter() - cut_at
    reasons = {}
    for worker in VM_WORKERS:
        [audit] = workers.failed_audits(worker, change.envs[worker])
        mine = [p for p in await parked_messages(worker) if p.correlation_id == str(change.envs[worker].correlation_id)]
        assert len(mine) == 1, f"{worker}: {len(mine)} parked"
        headers = mine[0].headers or {}
        error = str(headers["x-palisade-error"])
        # The reason names the fault and the host, the same in the header and the audit record.
        assert error.startswith("TransientError: "), error
        assert lost_vm.address in error, error
        assert any(s in error for s in ("cannot reach", "connection lost", "unreachable")), error
        assert headers["x-palisade-attempts"] == len(RETRY_DELAYS) + 1
        assert audit["reason"] == error
        reasons[worker] = error
    assert not any((await vm_state(lost_vm, change)).values()), "something was applied to a cut-off VM"

    await set_link(lost_vm, up=True)
    replay_at = time.perf_counter()
    # What an operator does: look at the reason, then replay (the three workers at once).
    for listing in await asyncio.gather(*(palisade_cli("dead", "list", w) for w in VM_WORKERS)):
        assert "TransientError" in listing, listing
    for out in await asyncio.gather(*(palisade_cli("dead", "replay", w) for w in VM_WORKERS)):
        assert "replayed" in out, out
    replayed_at = time.perf_counter()
    outcomes = {w: await workers.outcome(w, change.envs[w], timeout=20) for w in VM_WORKERS}
    cli_seconds, replayed_after = replayed_at - replay_at, time.perf_counter() - replayed_at
    assert {w: o["type"] for w, o in outcomes.items()} == APPLIED
    assert await vm_state(lost_vm, change) == dict.fromkeys(VM_WORKERS, True)
    assert [len(await parked_messages(w)) for w in VM_WORKERS] == [0, 0, 0]
    lines.append(
        f"[fault] VM link down past the ladder: 3 changes in flight, parked=3 after {parked_after:.2f}s"
        f" (reason e.g. {reasons['sshkeys']!r}), lost=0, applied {replayed_after:.2f}s after"
        f" `palisade dead list/replay` (the CLI took {cli_seconds:.2f}s)"
    )
    record_property("fault_figures", " | ".join(lines))
    with capsys.disabled():
        print("\n" + "\n".join(lines))
