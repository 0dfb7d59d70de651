"""An upstream MCP server for the MCP gateway tests, written with the official `mcp` package (2.x).

Tools: `echo`, `transfer` and `delete_repo` (the policy allows, holds and denies them), `flood`, which
answers with as much text as asked for, `grow`, which
adds the tool `extra` and tells its client that its tools changed, and `vanish`, which dies mid-call. Every call is appended as one JSON line
to the file named by MCP_UPSTREAM_LOG, so a test can count what the upstream really saw.

    python mcp_upstream.py                # over stdio (the gateway spawns it)
    python mcp_upstream.py --http PORT    # Streamable HTTP on 127.0.0.1:PORT/mcp
"""

import argparse
import json
import os

from mcp.server import MCPServer
from mcp.server.mcpserver import Context

server = MCPServer("countersign-test-upstream")


def record(tool: str, arguments: dict) -> None:
    path = os.environ.get("MCP_UPSTREAM_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"tool": tool, "arguments": arguments, "secret": os.environ.get("UPSTREAM_SECRET")}) + "\n")


@server.tool(description="Echoes the text back.", structured_output=False)
def echo(text: str) -> str:
    record("echo", {"text": text})
    return f"echo: {text}"


@server.tool(description="Transfers money to someone.", structured_output=False)
def transfer(to: str, amount_cents: int) -> str:
    record("transfer", {"to": to, "amount_cents": amount_cents})
    return f"transferred {amount_cents} cents to {to}"


@server.tool(description="Deletes a repository for good.", structured_output=False)
def delete_repo(name: str) -> str:
    record("delete_repo", {"name": name})
    return f"deleted {name}"


@server.tool(description="Answers with `size` bytes of text.", structured_output=False)
def flood(size: int) -> str:
    record("flood", {"size": size})
    return "x" * size


@server.tool(description="Records the call, then the server process dies before it answers.", structured_output=False)
def vanish() -> str:
    record("vanish", {})
    os._exit(3)


def extra(note: str = "") -> str:
    """A tool that exists only after `grow` was called."""
    record("extra", {"note": note})
    return f"extra: {note}"


@server.tool(description="Adds the tool `extra` and says the tool list changed.", structured_output=False)
async def grow(ctx: Context) -> str:
    record("grow", {})
    if "extra" not in {tool.name for tool in await server.list_tools()}:
        server.add_tool(extra, structured_output=False)
    await ctx.session.send_tool_list_changed()
    return "grown"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, metavar="PORT", help="serve Streamable HTTP on 127.0.0.1:PORT/mcp")
    parser.add_argument("--tag", help="ignored: lets a test find this process")
    args = parser.parse_args()
    if args.http is None:
        server.run()
    else:
        server.run("streamable-http", host="127.0.0.1", port=args.http)
