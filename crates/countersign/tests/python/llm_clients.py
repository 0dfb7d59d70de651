"""The real `openai` (3.x) and `anthropic` (2.x) Python clients against the Countersign LLM proxy.

Driven by the Rust test `llm_python` (crates/countersign/tests/it/llm_python.rs), which starts a real
server and the fake provider and passes COUNTERSIGN_URL, COUNTERSIGN_AGENT_KEY and COUNTERSIGN_ADMIN_KEY.
Each case prints `ok <name>`; the first failure raises and exits non-zero. Only the base URL and the API
key differ from calling the provider directly.

Usage: python llm_clients.py [case ...]   (default: every case)
"""

import json
import os
import sys
import threading
import time
import urllib.request

import anthropic
import openai

URL = os.environ["COUNTERSIGN_URL"]
AGENT_KEY = os.environ["COUNTERSIGN_AGENT_KEY"]
ADMIN_KEY = os.environ["COUNTERSIGN_ADMIN_KEY"]
# The fake provider pauses this long before each streamed chunk.
CHUNK_DELAY = float(os.environ.get("FAKE_CHUNK_DELAY", "0.3"))

oai = openai.OpenAI(base_url=f"{URL}/llm/openai/v1", api_key=AGENT_KEY, max_retries=0, timeout=60)
# The base URL the design and the README give for both clients; the SDK adds /v1 itself, and the proxy
# answers there too. `ant_root` is the provider's base without /v1, as with api.anthropic.com.
ant = anthropic.Anthropic(base_url=f"{URL}/llm/anthropic/v1", api_key=AGENT_KEY, max_retries=0, timeout=60)
ant_root = anthropic.Anthropic(base_url=f"{URL}/llm/anthropic", api_key=AGENT_KEY, max_retries=0, timeout=60)


def admin(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{URL}{path}", data=data, method=method)
    request.add_header("Authorization", f"Bearer {ADMIN_KEY}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def approve_in_background():
    """Approves the next pending approval from another thread, as a human would while the call is held."""
    outcome = {}

    def run():
        for _ in range(200):
            items = admin("GET", "/v1/approvals?status=pending")["items"]
            if items:
                decided = admin("POST", f"/v1/approvals/{items[0]['id']}/approve", {"note": "from python"})
                outcome["approval"] = decided
                return
            time.sleep(0.05)
        outcome["error"] = "no approval became pending"

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def allowed():
    reply = oai.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hello from python"}])
    check(reply.choices[0].message.content == "echo: hello from python", reply)
    check(reply.usage.prompt_tokens == 7, reply.usage)
    message = ant.messages.create(
        model="claude-fake", max_tokens=64, system="be brief", messages=[{"role": "user", "content": "hi claude"}]
    )
    check(message.content[0].text == "echo: hi claude", message)
    check(message.usage.output_tokens == 6, message.usage)
    message = ant_root.messages.create(model="claude-fake", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    check(message.content[0].text == "echo: hi", message)
    vectors = oai.embeddings.create(model="fake-embed", input="embed me")
    check(len(vectors.data[0].embedding) == 3, vectors)
    models = oai.models.list()
    check("gpt-fake" in [m.id for m in models.data], models)


def streamed():
    started = time.monotonic()
    arrivals, text = [], []
    stream = oai.chat.completions.create(
        model="gpt-fake",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    ended = time.monotonic() - started
    check("".join(text) == "part0 part1 part2 part3 part4 ", text)
    check(usage is not None and usage.completion_tokens == 3, usage)
    check(arrivals[0] + 2 * CHUNK_DELAY < ended, f"openai: first chunk at {arrivals[0]:.2f}s, end at {ended:.2f}s")

    started = time.monotonic()
    arrivals, text = [], []
    with ant.messages.stream(
        model="claude-fake", max_tokens=64, messages=[{"role": "user", "content": "stream please"}]
    ) as stream:
        for piece in stream.text_stream:
            arrivals.append(time.monotonic() - started)
            text.append(piece)
        final = stream.get_final_message()
    ended = time.monotonic() - started
    check("".join(text) == "part0 part1 part2 part3 part4 ", text)
    check(final.usage.output_tokens == 6, final.usage)
    check(arrivals[0] + 2 * CHUNK_DELAY < ended, f"anthropic: first chunk at {arrivals[0]:.2f}s, end at {ended:.2f}s")


def denied():
    try:
        oai.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "the launch codes, now"}])
    except openai.PermissionDeniedError as error:
        check(error.status_code == 403, error)
        check("llm-no-launch-codes" in str(error), str(error))
    else:
        raise AssertionError("openai: a denied call returned normally")
    try:
        ant.messages.create(
            model="claude-fake", max_tokens=10, messages=[{"role": "user", "content": "tell me the launch codes"}]
        )
    except anthropic.PermissionDeniedError as error:
        check(error.status_code == 403, error)
        check("llm-no-launch-codes" in str(error), str(error))
    else:
        raise AssertionError("anthropic: a denied call returned normally")


def held_approved():
    thread, outcome = approve_in_background()
    reply = oai.chat.completions.create(model="gpt-premium", messages=[{"role": "user", "content": "worth it"}])
    thread.join(timeout=10)
    check("approval" in outcome, outcome)
    check(reply.choices[0].message.content == "echo: worth it", reply)

    thread, outcome = approve_in_background()
    message = ant.messages.create(
        model="claude-opus-9", max_tokens=64, messages=[{"role": "user", "content": "opus please"}]
    )
    thread.join(timeout=10)
    check("approval" in outcome, outcome)
    check(message.content[0].text == "echo: opus please", message)


def held_expired():
    started = time.monotonic()
    try:
        oai.chat.completions.create(model="review-fast-1", messages=[{"role": "user", "content": "anyone there?"}])
    except openai.PermissionDeniedError as error:
        check("expired" in str(error) and "llm-quick-review" in str(error), str(error))
    else:
        raise AssertionError("openai: an expired call returned normally")
    check(time.monotonic() - started >= 1.5, "held until the rule's 2 s approval timeout")
    try:
        ant.messages.create(
            model="review-fast-2", max_tokens=10, messages=[{"role": "user", "content": "anyone there?"}]
        )
    except anthropic.PermissionDeniedError as error:
        check("expired" in str(error), str(error))
    else:
        raise AssertionError("anthropic: an expired call returned normally")


def held_past_client_timeout():
    """A hold nobody decides ends before the SDK's own timeout (which it sends as x-stainless-timeout), with an
    error the SDK raises and does not retry (x-should-retry: false): one action, not one per retry."""
    before = len(admin("GET", "/v1/approvals?status=pending&limit=1000")["items"])
    # Default retries; the hold ends 1 s before the 4 s timeout.
    impatient = openai.OpenAI(base_url=f"{URL}/llm/openai/v1", api_key=AGENT_KEY, timeout=4)
    started = time.monotonic()
    try:
        impatient.chat.completions.create(model="gpt-premium", messages=[{"role": "user", "content": "in time?"}])
    except openai.InternalServerError as error:
        check(error.status_code == 504, error)
        check("no one has decided yet" in str(error) and "llm-premium-models" in str(error), str(error))
        check(error.response.json()["approval_token"].startswith("cs_ap_"), error.response.text)
        check(error.response.headers["x-should-retry"] == "false", error.response.headers)
    else:
        raise AssertionError("openai: a hold that ran out returned normally")
    check(time.monotonic() - started < 4, "answered before the client's 4 s timeout")
    terse = anthropic.Anthropic(base_url=f"{URL}/llm/anthropic/v1", api_key=AGENT_KEY, timeout=4)
    try:
        terse.messages.create(model="claude-opus-9", max_tokens=8, messages=[{"role": "user", "content": "in time?"}])
    except anthropic.InternalServerError as error:
        check(error.status_code == 504 and "no one has decided yet" in str(error), str(error))
    else:
        raise AssertionError("anthropic: a hold that ran out returned normally")
    pending = admin("GET", "/v1/approvals?status=pending&limit=1000")["items"]
    check(len(pending) == before + 2, f"one approval a call, none for retries: {len(pending)} after {before}")
    for approval in pending:
        admin("POST", f"/v1/approvals/{approval['id']}/deny", {"note": "cleanup"})


CASES = {
    "allowed": allowed,
    "streamed": streamed,
    "denied": denied,
    "held_approved": held_approved,
    "held_expired": held_expired,
    "held_past_client_timeout": held_past_client_timeout,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(CASES):
        CASES[name]()
        print(f"ok {name}", flush=True)
