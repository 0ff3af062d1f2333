"""The desk API through aiohttp's test client, on a real SQLite store: read, link, undo, refuse."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from connectors.api import ApiConnector
from core.errors import ConfigError, StoreError
from core.model import CanonicalMessage, Identity, Placement
from core.settings import Settings
from dedupe import graph
from dedupe.tx import TxWork
from gateway.channels import Registry
from gateway.control import Applied, apply_control
from gateway.desk import DeskApi
from gateway.store.base import Store
from gateway.store.sqlite import SQLiteStore
from tests.connectors.form.fake_ingest import FakeIngest
from tests.gateway.store.storekit import POLICY, build_event, envelope, outbox_settings, store_settings
from tests.support.channels import set_up
from tests.support.schema import validate_event

Client = TestClient[web.Request, web.Application]
DESK_KEY = "desk-key-0123456789abcdef"
ROTATED_KEY = "desk-key-rotated-0123456789"
GLOBEX_KEY = "globex-desk-key-0123456789"
API_KEY = "api-key-0123456789abcdef"
T = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)


def make_settings(**identity: Any) -> Settings:
    channel: dict[str, Any] = {"keys": [DESK_KEY, ROTATED_KEY], "tenants": {"globex": {"keys": [GLOBEX_KEY]}}}
    channel.update(identity)
    return Settings.model_validate(
        {
            "tenants": {"acme": {}, "globex": {}},
            "inboxes": {"support": {"tenant": "acme"}, "g": {"tenant": "globex"}},
            "channels": {"identity": channel, "api": {"inboxes": {"support": {"keys": [API_KEY]}}}},
        }
    )


def auth(key: str = DESK_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    instance = SQLiteStore(store_settings(tmp_path), outbox_settings())
    await instance.open()
    yield instance
    await instance.close()


MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def client_for(aiohttp_client: Callable[..., Awaitable[Client]]) -> MakeClient:
    async def make(store: Store, settings: Settings | None = None) -> Client:
        desk = DeskApi.from_settings(settings or make_settings())
        assert desk is not None
        app = web.Application()
        desk.setup(app, store)
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(client_for: MakeClient, store: SQLiteStore) -> Client:
    return await client_for(store)


def msg(
    external_id: str, *identities: Identity, tenant: str = "acme", inbox: str = "support", name: str = "Ada"
) -> CanonicalMessage:
    return CanonicalMessage(
        channel="form",
        tenant=tenant,
        inbox=inbox,
        external_id=external_id,
        received_at=T,
        identities=identities,
        display_name=name,
        subject="Order 1234",
        text=f"message {external_id}",
    )


async def accept(store: Store, message: CanonicalMessage) -> Placement:
    (placement,) = await store.accept(
        envelope(tenant=message.tenant, inbox=message.inbox),
        [message],
        policies=[POLICY],
        build_event=build_event,
    )
    return placement


def email(value: str, *, verified: bool = False) -> Identity:
    return Identity(kind="email", value=value, verified=verified)


async def events_of(store: Store, kind: str) -> list[dict[str, Any]]:
    rows = await store.outbox_fetch(1000)
    return [validate_event(r.body) for r in rows if r.type == kind]


# -- configuration --------------------------------------------------------------------------------


def test_absent_table_builds_nothing_and_the_desk_api_is_not_a_channel() -> None:
    bare = Settings.model_validate({"tenants": {"acme": {}}})
    assert DeskApi.from_settings(bare) is None
    configured = Registry.installed().configured(make_settings())
    assert [descriptor.name for descriptor, _ in configured] == ["api"]


@pytest.mark.parametrize(
    ("identity", "fragment"),
    [
        ({"keys": ["short"], "tenants": {}}, "at least 8 characters"),
        ({"keys": [], "tenants": {}}, "at least one key"),
        ({"tenants": {"nope": {"keys": [GLOBEX_KEY]}}}, "channels.identity.tenants.nope"),
        ({"tenants": {"globex": {"keys": [DESK_KEY]}}}, "used twice"),
    ],
)
def test_misconfiguration_fails_closed(identity: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as raised:
        DeskApi.from_settings(make_settings(**identity))
    assert fragment in str(raised.value)
    assert DESK_KEY not in str(raised.value)


# -- authentication -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": DESK_KEY}]
)
async def test_missing_or_wrong_key_is_401_with_a_challenge(client: Client, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/api/v1/customers/cus_x"), ("POST", "/api/v1/merges/mrg_x/undo")]:
        response = await client.request(method, path, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="ticketgate-desk"')
        assert (await response.json())["error"] == "unauthorized"


async def test_repeated_failures_are_throttled(client_for: MakeClient, store: SQLiteStore) -> None:
    client = await client_for(store, make_settings(auth_failures_burst=2, auth_failures_per_minute=1))
    statuses = [(await client.get("/api/v1/customers/cus_x")).status for _ in range(3)]
    assert statuses == [401, 401, 429]
    assert (await client.get("/api/v1/customers/cus_x", headers=auth())).status == 404


# -- reading --------------------------------------------------------------------------------------


async def test_customer_shows_identities_and_claimed_links(client: Client, store: SQLiteStore) -> None:
    a = await accept(store, msg("1", email("ada@example.com"), Identity(kind="phone", value="+41791234567")))
    b = await accept(store, msg("2", email("ada.l@example.com")))
    # Claimed evidence that a and b are one person: recorded, not merged.
    c = await accept(store, msg("3", email("ada@example.com"), email("ada.l@example.com")))

    response = await client.get(f"/api/v1/customers/{a.customer_id}", headers=auth(ROTATED_KEY))

    assert response.status == 200
    body = await response.json()
    assert (body["id"], body["tenant"], body["display_name"], body["merged_into"]) == (
        a.customer_id,
        "acme",
        "Ada",
        None,
    )
    assert body["identities"] == [
        {"kind": "email", "value": "ada@example.com", "verified": False},
        {"kind": "phone", "value": "+41791234567", "verified": False},
    ]
    assert body["merges"] == []
    [link] = body["claimed_links"]
    assert (link["customer_id"], link["other_customer_id"], link["message_id"]) == (
        c.customer_id,
        b.customer_id,
        c.message_id,
    )
    assert {i["value"] for i in link["identities"]} == {"ada@example.com", "ada.l@example.com"}


async def test_unknown_ids_are_404(client: Client) -> None:
    for method, path in [
        ("GET", "/api/v1/customers/cus_nobody"),
        ("GET", f"/api/v1/customers/{'x' * 201}"),
        ("GET", "/api/v1/threads/thr_nothing"),
        ("POST", "/api/v1/merges/mrg_nothing/undo"),
    ]:
        response = await client.request(method, path, headers=auth())
        assert response.status == 404, path
        assert (await response.json())["error"] == "not_found"
    response = await client.post(
        "/api/v1/customers/cus_nobody/link", json={"customer_id": "cus_other"}, headers=auth()
    )
    assert response.status == 404


async def test_thread_status_follows_the_control_queue(client: Client, store: SQLiteStore) -> None:
    placed = await accept(store, msg("1", email("ada@example.com")))
    path = f"/api/v1/threads/{placed.thread_id}"
    opened = await (await client.get(path, headers=auth())).json()
    assert (opened["status"], opened["customer_id"], opened["number"]) == ("open", placed.customer_id, 1)

    close = {"type": "thread.closed", "thread_id": placed.thread_id, "tenant": "acme", "at": T.isoformat()}
    assert await apply_control(store, orjson.dumps(close)) is Applied.APPLIED

    closed = await (await client.get(path, headers=auth())).json()
    assert (closed["status"], closed["merged_into"], closed["previous_id"]) == ("closed", None, None)


async def test_a_tenant_key_sees_only_its_tenant(client: Client, store: SQLiteStore) -> None:
    acme = await accept(store, msg("1", email("ada@example.com")))
    globex = await accept(store, msg("2", email("ada@example.com"), tenant="globex", inbox="g"))

    assert (await client.get(f"/api/v1/customers/{acme.customer_id}", headers=auth(GLOBEX_KEY))).status == 404
    assert (await client.get(f"/api/v1/threads/{acme.thread_id}", headers=auth(GLOBEX_KEY))).status == 404
    assert (
        await client.get(f"/api/v1/customers/{globex.customer_id}", headers=auth(GLOBEX_KEY))
    ).status == 200
    # Linking across tenants is refused by the graph, whoever asks.
    response = await client.post(
        f"/api/v1/customers/{acme.customer_id}/link", json={"customer_id": globex.customer_id}, headers=auth()
    )
    assert response.status == 404
    assert await events_of(store, "customer.merged") == []


# -- linking and undoing --------------------------------------------------------------------------


async def test_link_two_customers_then_undo(client: Client, store: SQLiteStore) -> None:
    a = await accept(store, msg("1", email("ada@example.com")))
    b = await accept(store, msg("2", email("ada.lovelace@work.example"), name="A. Lovelace"))

    response = await client.post(
        f"/api/v1/customers/{a.customer_id}/link",
        json={"customer_id": b.customer_id, "note": "same person, confirmed by phone", "actor": "agent-7"},
        headers=auth(),
    )

    assert response.status == 200
    linked = await response.json()
    assert (linked["customer_id"], linked["merged_customers"], linked["added"]) == (
        a.customer_id,
        [b.customer_id],
        [],
    )
    [merged] = await events_of(store, "customer.merged")
    assert merged["customer"] == {"id": a.customer_id, "merged": [b.customer_id]}
    assert merged["merge"]["id"] == linked["merge_id"]
    evidence = merged["merge"]["evidence"]
    assert (evidence["source"], evidence["actor"]) == ("desk", "agent-7")
    summary = await (await client.get(f"/api/v1/customers/{a.customer_id}", headers=auth())).json()
    assert {i["value"] for i in summary["identities"]} == {"ada@example.com", "ada.lovelace@work.example"}
    assert [m["id"] for m in summary["merges"]] == [linked["merge_id"]]
    gone = await (await client.get(f"/api/v1/customers/{b.customer_id}", headers=auth())).json()
    assert gone["merged_into"] == a.customer_id

    undone = await client.post(f"/api/v1/merges/{linked['merge_id']}/undo", headers=auth())

    assert undone.status == 200
    record = await undone.json()
    assert (record["id"], record["surviving_customer"], record["merged_customers"]) == (
        linked["merge_id"],
        a.customer_id,
        [b.customer_id],
    )
    assert record["undone_at"] is not None
    [unmerged] = await events_of(store, "customer.unmerged")
    assert unmerged["merge"]["id"] == linked["merge_id"]
    back = await (await client.get(f"/api/v1/customers/{b.customer_id}", headers=auth())).json()
    assert (back["merged_into"], [i["value"] for i in back["identities"]]) == (
        None,
        ["ada.lovelace@work.example"],
    )
    again = await client.post(f"/api/v1/merges/{linked['merge_id']}/undo", headers=auth())
    assert again.status == 409
    assert (await again.json())["error"] == "already_undone"
    assert len(await events_of(store, "customer.unmerged")) == 1


async def test_link_identities_adds_verified_ones_and_merges_their_owners(
    client: Client, store: SQLiteStore
) -> None:
    a = await accept(store, msg("1", email("ada@example.com")))
    b = await accept(store, msg("2", Identity(kind="phone", value="+41791234567")))

    response = await client.post(
        f"/api/v1/customers/{a.customer_id}/link",
        json={
            "identities": [
                {"kind": "phone", "value": "0041 79 123 45 67"},
                {"kind": "email", "value": "ADA@Home.example"},
            ]
        },
        headers=auth(),
    )

    assert response.status == 200
    linked = await response.json()
    assert linked["merged_customers"] == [b.customer_id]
    assert linked["added"] == [{"kind": "email", "value": "ada@home.example", "verified": True}]
    summary = await (await client.get(f"/api/v1/customers/{a.customer_id}", headers=auth())).json()
    assert {(i["value"], i["verified"]) for i in summary["identities"]} == {
        ("ada@example.com", False),
        ("+41791234567", True),  # the desk's word made the claimed phone verified
        ("ada@home.example", True),
    }
    assert len(await events_of(store, "customer.merged")) == 1


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "invalid_json"),
        (b'{"customer_id": "cus_x"}', "text/plain", 415, "unsupported_media_type"),
        (b"{}", "application/json", 422, "invalid_request"),
        (b'{"identities": [{"kind": "fax", "value": "1"}]}', "application/json", 422, "invalid_request"),
        (
            b'{"identities": [{"kind": "email", "value": "not-an-address"}]}',
            "application/json",
            422,
            "invalid_request",
        ),
        (b'{"customer_id": "cus_x", "surprise": 1}', "application/json", 422, "invalid_request"),
        (b'{"note": "' + b"x" * 70_000 + b'"}', "application/json", 413, "too_large"),
    ],
)
async def test_bad_link_requests_get_a_clear_4xx_and_change_nothing(
    client: Client, store: SQLiteStore, body: bytes, content_type: str, status: int, code: str
) -> None:
    a = await accept(store, msg("1", email("ada@example.com")))

    response = await client.post(
        f"/api/v1/customers/{a.customer_id}/link", data=body, headers={**auth(), "Content-Type": content_type}
    )

    assert response.status == status
    answer = await response.json()
    assert (answer["error"], bool(answer["reason"])) == (code, True)
    summary = await (await client.get(f"/api/v1/customers/{a.customer_id}", headers=auth())).json()
    assert [i["value"] for i in summary["identities"]] == ["ada@example.com"]
    assert await events_of(store, "customer.merged") == []


class DownStore(SQLiteStore):
    """A store whose transactions fail as a full disk or a lost database would."""

    async def transact(self, work: TxWork[Any]) -> Any:
        raise StoreError("the database is unavailable", retry_after=7)


async def test_store_fault_is_503_with_retry_after(client_for: MakeClient, tmp_path: Path) -> None:
    client = await client_for(DownStore(store_settings(tmp_path), outbox_settings()))

    for method, path, body in [
        ("GET", "/api/v1/customers/cus_x", None),
        ("POST", "/api/v1/customers/cus_x/link", {"customer_id": "cus_y"}),
        ("POST", "/api/v1/merges/mrg_x/undo", None),
    ]:
        response = await client.request(method, path, json=body, headers=auth())
        assert response.status == 503, path
        assert response.headers["Retry-After"] == "7"
        assert (await response.json())["error"] == "unavailable"


async def test_desk_routes_live_beside_the_api_channel(
    aiohttp_client: Callable[..., Awaitable[Client]], store: SQLiteStore
) -> None:
    settings = make_settings()
    app = web.Application()
    # The API channel owns /api/v1, the desk API the longer prefixes beside it.
    desk_api, api_channel = DeskApi.from_settings(settings), ApiConnector.from_settings(settings)
    assert desk_api is not None
    assert api_channel is not None
    ingest = FakeIngest()
    desk_api.setup(app, store)
    set_up(app, api_channel, ingest, settings=settings)
    client = await aiohttp_client(app)

    api = await client.post(
        "/api/v1/messages",
        json={"customer": {"email": "ada@example.com"}, "text": "hello"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    desk = await client.get("/api/v1/customers/cus_x", headers=auth())

    assert api.status == 202
    assert len(ingest.envelopes) == 1
    assert (desk.status, (await desk.json())["error"]) == (404, "not_found")
    assert (await store.transact(graph.customer_summary("cus_x"))) is None


# -- erasure --------------------------------------------------------------------------------------


async def test_erase_with_a_tenant_key_and_again(client: Client, store: SQLiteStore) -> None:
    acme = await accept(store, msg("1", email("ada@example.com", verified=True)))
    globex = await accept(store, msg("2", email("ada@example.com"), tenant="globex", inbox="g"))
    path = f"/api/v1/customers/{acme.customer_id}/erase"

    refused = await client.post(path, headers=auth(GLOBEX_KEY))
    assert refused.status == 404  # another tenant's customer: as if unknown
    assert (await client.post(path, data=b"actor=x", headers=auth())).status == 415
    bad = await client.post(path, json={"actor": "x", "extra": 1}, headers=auth())
    assert bad.status == 422

    response = await client.post(path, json={"actor": "privacy-team ticket 42"}, headers=auth())
    assert response.status == 200
    answer = await response.json()
    assert answer["customer_id"] == acme.customer_id
    assert answer["threads"] == [acme.thread_id]
    assert answer["counts"]["messages"] == 1
    assert answer["requested_by"] == "desk-api actor=privacy-team ticket 42"
    (erased,) = await events_of(store, "customer.erased")
    assert erased["customer"]["id"] == acme.customer_id
    assert erased["erasure"]["digest"] == answer["digest"]
    summary = await (await client.get(f"/api/v1/customers/{acme.customer_id}", headers=auth())).json()
    assert (summary["identities"], summary["display_name"]) == ([], None)
    # Erasing again is fine (nothing more to remove); the other tenant's customer is untouched.
    again = await client.post(path, headers=auth())
    assert again.status == 200
    assert (await again.json())["counts"]["messages"] == 0
    other = await (await client.get(f"/api/v1/customers/{globex.customer_id}", headers=auth())).json()
    assert other["identities"] == [{"kind": "email", "value": "ada@example.com", "verified": False}]
    scoped = await client.post(f"/api/v1/customers/{globex.customer_id}/erase", headers=auth(GLOBEX_KEY))
    assert scoped.status == 200
    assert (await scoped.json())["requested_by"] == "desk-api tenant=globex"
