"""The official MCP Python SDK (`mcp` 2.x) as a client of Countersign's /mcp, driven by the integration
test `mcp_gateway::the_official_python_mcp_client_works_with_a_minted_session`.

It mints a session over REST with the agent's key and connects with the session's `mcp.url` and
`mcp.headers` exactly as given: lists the tools (Countersign's own and the upstream's `web__…`), calls an
upstream tool and submits an allowed and a held action, subscribes to the held action's resource, approves
it over REST with the admin key and receives `notifications/resources/updated`. Then the scopes: an action
and an upstream tool outside them are refused; after revocation, and after expiry, the session gets 401.

Prints `ok <case>` for every case that passed; any failure raises (and the exit status says so).

Environment: COUNTERSIGN_URL, COUNTERSIGN_AGENT_KEY, COUNTERSIGN_ADMIN_KEY.
"""

import json
import os
import time
import urllib.error
import urllib.request

import anyio
import httpx2
import mcp.types as types
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

BASE = os.environ["COUNTERSIGN_URL"].rstrip("/")
AGENT_KEY = os.environ["COUNTERSIGN_AGENT_KEY"]
ADMIN_KEY = os.environ["COUNTERSIGN_ADMIN_KEY"]


def rest(method, path, key, body=None):
    """One REST call; answers (status, parsed JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
            return response.status, (json.loads(text) if text else None)
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, text.decode(errors="replace")


def mint_session(ttl_seconds, scopes):
    status, body = rest("POST", "/v1/sessions", AGENT_KEY, {"ttl_seconds": ttl_seconds, "scopes": scopes})
    assert status == 201, (status, body)
    assert body["mcp"]["url"].endswith("/mcp"), body
    return body


def raw_mcp_status(session):
    """The HTTP status of a bare `initialize` with the session's own headers."""
    message = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
               "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
    request = urllib.request.Request(session["mcp"]["url"], data=json.dumps(message).encode(), method="POST")
    for name, value in session["mcp"]["headers"].items():
        request.add_header(name, value)
    request.add_header("Content-Type", "application/json")
    request.add_header("Accept", "application/json, text/event-stream")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def text_of(result):
    return "\n".join(block.text for block in result.content if isinstance(block, types.TextContent))


def approve_pending_for(action_id):
    status, page = rest("GET", "/v1/approvals?status=pending", ADMIN_KEY)
    assert status == 200, (status, page)
    mine = [a for a in page["items"] if a["action_id"] == action_id]
    assert len(mine) == 1, page
    status, body = rest("POST", f"/v1/approvals/{mine[0]['id']}/approve", ADMIN_KEY, {"note": "approved from Python"})
    assert status == 200, (status, body)


async def main():
    short = mint_session(1, ["payments.*"])
    short_minted = time.monotonic()
    session = mint_session(600, ["payments.*", "mcp.web.echo"])
    updated = {}
    resource_updated = anyio.Event()

    async def on_message(message):
        if isinstance(message, types.ResourceUpdatedNotification):
            updated[str(message.params.uri)] = True
            resource_updated.set()

    revoked = False
    try:
        await governed_calls(session, on_message, updated, resource_updated)
    except Exception:
        # The session was revoked mid-connection: the transport reports the 401 its own way (possibly as
        # an exception group out of its task group).
        if not REVOKED.is_set():
            raise
        revoked = True
    assert REVOKED.is_set()
    assert raw_mcp_status(session) == 401
    print(f"ok revoked_401 (client cut off: {revoked})", flush=True)

    # The one-second session: once its TTL has passed on the wall clock, 401.
    time.sleep(max(0.0, 1.2 - (time.monotonic() - short_minted)))
    assert raw_mcp_status(short) == 401
    print("ok expired_401", flush=True)


class _Flag:
    def __init__(self):
        self.value = False

    def set(self):
        self.value = True

    def is_set(self):
        return self.value


REVOKED = _Flag()


async def governed_calls(session, on_message, updated, resource_updated):
    async with httpx2.AsyncClient(headers=session["mcp"]["headers"], timeout=httpx2.Timeout(30, read=120)) as http:
        async with streamable_http_client(session["mcp"]["url"], http_client=http) as (read, write):
            async with ClientSession(read, write, message_handler=on_message) as client:
                await client.initialize()

                names = {tool.name for tool in (await client.list_tools()).tools}
                for expected in ("submit_action", "wait_action", "web__echo", "web__transfer"):
                    assert expected in names, names
                print("ok list_tools", flush=True)

                echoed = await client.call_tool("web__echo", {"text": "from python"})
                assert not echoed.is_error and text_of(echoed) == "echo: from python", echoed
                print("ok upstream_allowed", flush=True)

                allowed = await client.call_tool(
                    "submit_action",
                    {"capability": "payments.refund.small", "params": {"amount_cents": 100},
                     "reasoning": {"goal": "refund a customer"}},
                )
                assert not allowed.is_error, allowed
                assert allowed.structured_content["state"] == "approved", allowed.structured_content
                print("ok allowed", flush=True)

                held = await client.call_tool(
                    "submit_action",
                    {"capability": "payments.charge.card", "params": {"amount_cents": 5000},
                     "reasoning": {"goal": "charge a customer"}},
                )
                assert not held.is_error, held
                assert held.structured_content["state"] == "pending_approval", held.structured_content
                action_id = held.structured_content["id"]
                uri = f"countersign://actions/{action_id}"
                assert held.structured_content["next"]["resource"] == uri, held.structured_content
                print("ok held", flush=True)

                await client.subscribe_resource(uri)
                approve_pending_for(action_id)
                with anyio.fail_after(30):
                    await resource_updated.wait()
                assert updated.get(uri), updated
                read_back = await client.read_resource(uri)
                state = json.loads(read_back.contents[0].text)["state"]
                assert state == "approved", state
                print("ok resource_updated", flush=True)

                outside = await client.call_tool(
                    "submit_action", {"capability": "finance.issue.card", "reasoning": {"goal": "out of scope"}}
                )
                assert outside.is_error, outside
                assert "scopes" in text_of(outside), text_of(outside)
                print("ok scope_refused", flush=True)

                upstream_outside = await client.call_tool("web__transfer", {"to": "bob", "amount_cents": 1})
                assert upstream_outside.is_error, upstream_outside
                assert "scopes" in text_of(upstream_outside), text_of(upstream_outside)
                print("ok upstream_scope_refused", flush=True)

                status, _ = rest("DELETE", f"/v1/sessions/{session['id']}", AGENT_KEY)
                assert status in (200, 204), status
                REVOKED.set()
                try:
                    await client.list_tools()
                except Exception:  # the transport reports the 401 its own way
                    pass
                else:
                    raise AssertionError("a revoked session could still list tools")


if __name__ == "__main__":
    anyio.run(main)
