"""A real MCP client (the `mcp` package from PyPI, not banger's types) that
drives `banger mcp` over stdio for crates/banger/tests/mcp.rs.

    python mcp_client.py SCENARIO -- SERVER_COMMAND...

Prints one JSON line, `RESULT {...}`, with what the Rust test checks; any
failed expectation raises (non-zero exit).
"""

import asyncio
import json
import os
import sys
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

ALL_TOOLS = {
    "vm_create", "vm_exec", "file_read", "file_write", "file_list",
    "workspace_export", "port_forward_add", "port_forward_list",
    "port_forward_remove", "vm_list", "vm_stop", "vm_delete",
}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def call(s, tool, args):
    """A tool that must succeed: its structured result."""
    r = await s.call_tool(tool, args)
    text = r.content[0].text if r.content else ""
    check(not r.isError, f"{tool} {args} failed: {text}")
    out = r.structuredContent
    check(out is not None and out.get("op_id", "").startswith("op-"), f"{tool}: no op id in {out}")
    return out


async def refused(s, tool, args):
    """A tool that must fail as a tool error: its message."""
    r = await s.call_tool(tool, args)
    text = r.content[0].text if r.content else ""
    check(r.isError, f"{tool} {args} was expected to fail, got {r.structuredContent}")
    check("op-" in text, f"{tool}: no op id in the error {text!r}")
    return text


async def main_scenario(s, out):
    tools = (await s.list_tools()).tools
    names = {t.name for t in tools}
    check(names == ALL_TOOLS, f"tools: {sorted(names)}")
    for t in tools:
        check(t.inputSchema.get("type") == "object", f"{t.name} has no object schema")
    create = next(t for t in tools if t.name == "vm_create")
    check("vcpus" in create.inputSchema.get("properties", {}), "vm_create schema lacks vcpus")

    # Bad arguments: tool errors naming the argument, no VM made.
    out["bad_vcpus"] = await refused(s, "vm_create", {"name": "mcp-bad", "vcpus": "many"})
    out["bad_unknown"] = await refused(s, "vm_create", {"name": "mcp-bad", "colour": "red"})
    out["bad_wait"] = await refused(s, "vm_create", {"name": "mcp-bad", "wait": "forever"})

    t0 = time.monotonic()
    created = await call(s, "vm_create", {"name": "mcp-a", "workspace": os.environ["MCP_REPO"]})
    out["create_s"] = time.monotonic() - t0
    out["ready_ms"] = created["ready_ms"]
    check(created["vm"]["state"] == "running", f"created: {created}")

    t0 = time.monotonic()
    u = await call(s, "vm_exec", {"vm": "mcp-a", "argv": ["uname", "-a"]})
    out["exec_s"] = time.monotonic() - t0
    check(u["exit_code"] == 0, f"uname: {u}")
    out["uname"] = u["stdout"]["text"]
    out["exec_op_id"] = u["op_id"]

    # The default image has ping and dig: ping works (on the guest's own
    # loopback: host protection keeps guests' pings off the host), and the
    # daemon's DNS knows the VM's name.
    net = await call(s, "vm_exec", {
        "vm": "mcp-a",
        "command": "ping -c 1 -W 5 127.0.0.1 >/dev/null && dig +short mcp-a.vm",
    })
    check(net["exit_code"] == 0, f"ping/dig: {net}")
    check(net["stdout"]["text"].strip() == created["vm"]["guest_ip"], f"dig: {net}")

    sh = await call(s, "vm_exec", {
        "vm": "mcp-a", "command": "cd \"$D\" && pwd; echo oops >&2; exit 3",
        "env": {"D": "/tmp"},
    })
    check(sh["exit_code"] == 3 and sh["stdout"]["text"] == "/tmp\n", f"sh: {sh}")
    check(sh["stderr"]["text"] == "oops\n", f"sh stderr: {sh}")

    big = await call(s, "vm_exec", {
        "vm": "mcp-a", "argv": ["head", "-c", "100000", "/dev/zero"], "max_output_bytes": 1000,
    })
    check(big["stdout"]["truncated"] and big["stdout"]["bytes"] == 100000, f"cap: {big['stdout']['bytes']}")
    check(big["output_cap_bytes"] == 1000, "cap reported")
    check(len(big["stdout"]["text"]) == 1000, "kept up to the cap")

    # A command that is not there ends as in a shell: 127, why on stderr.
    missing = await call(s, "vm_exec", {"vm": "mcp-a", "argv": ["no-such-command-banger"]})
    check(missing["exit_code"] == 127, f"missing command: {missing}")
    check("command not found" in missing["stderr"]["text"], f"missing command: {missing}")

    slow = await call(s, "vm_exec", {"vm": "mcp-a", "argv": ["sleep", "600"], "timeout_secs": 1})
    check(slow["timed_out"] and slow["exit_code"] != 0, f"timeout: {slow}")

    out["bad_exec"] = await refused(s, "vm_exec", {"vm": "mcp-a"})
    out["bad_cwd"] = await refused(s, "vm_exec", {"vm": "mcp-a", "argv": ["true"], "cwd": "tmp"})
    out["no_vm"] = await refused(s, "vm_exec", {"vm": "nosuchvm", "argv": ["true"]})

    # A path a shell would expand: it must arrive as it is.
    odd = "/root/dir one/$(echo pwned) `x`;.txt"
    content = "hello from mcp\nline two é\n"
    w = await call(s, "file_write", {"vm": "mcp-a", "path": odd, "content": content})
    check(w["bytes"] == len(content.encode()), f"write: {w}")
    r = await call(s, "file_read", {"vm": "mcp-a", "path": odd})
    check(r["content"] == content and not r["truncated"], f"read back: {r}")
    check(r["size"] == len(content.encode()), f"size: {r}")
    part = await call(s, "file_read", {"vm": "mcp-a", "path": odd, "max_bytes": 5})
    check(part["content"] == "hello" and part["truncated"], f"partial read: {part}")
    binary = await call(s, "file_write", {
        "vm": "mcp-a", "path": "/root/dir one/bin", "content": "AAEC/w==", "encoding": "base64",
    })
    check(binary["bytes"] == 4, f"binary write: {binary}")
    rb = await call(s, "file_read", {"vm": "mcp-a", "path": "/root/dir one/bin"})
    check(rb["encoding"] == "base64" and rb["content"] == "AAEC/w==", f"binary read: {rb}")

    ls = await call(s, "file_list", {"vm": "mcp-a", "path": "/root/dir one"})
    listed = {e["name"]: e for e in ls["entries"]}
    check(set(listed) == {"$(echo pwned) `x`;.txt", "bin"}, f"list: {ls}")
    check(listed["bin"]["type"] == "f" and listed["bin"]["size"] == 4, f"entry: {listed['bin']}")
    out["bad_path"] = await refused(s, "file_read", {"vm": "mcp-a", "path": "etc/passwd"})
    out["missing_file"] = await refused(s, "file_read", {"vm": "mcp-a", "path": "/nonexistent"})

    fwd = await call(s, "port_forward_add", {"vm": "mcp-a", "host_port": 18080, "guest_port": 80})
    check(fwd["forwards"][0]["host_port"] == 18080, f"forward: {fwd}")
    listed = await call(s, "port_forward_list", {"vm": "mcp-a"})
    check(len(listed["forwards"]) == 1, f"forwards: {listed}")
    await call(s, "port_forward_remove", {"vm": "mcp-a", "host_port": 18080})
    check((await call(s, "port_forward_list", {}))["forwards"] == [], "forward removed")

    vms = await call(s, "vm_list", {})
    check([v["name"] for v in vms["vms"]] == ["mcp-a"], f"list: {vms}")

    resources = {r.uri for r in (await s.list_resources()).resources}
    check({"banger://vms", "banger://vm/mcp-a/console", "banger://vm/mcp-a/stats"} <= {str(u) for u in resources},
          f"resources: {resources}")
    stats = json.loads((await s.read_resource("banger://vm/mcp-a/stats")).contents[0].text)
    check(stats["memory"]["total_bytes"] > 0, f"stats: {stats}")
    console = (await s.read_resource("banger://vm/mcp-a/console")).contents[0].text
    check("banger-initramfs" in console, "console tail")
    listed = json.loads((await s.read_resource("banger://vms")).contents[0].text)
    check(listed[0]["name"] == "mcp-a", "vm list resource")

    # The workspace: edit it in the guest, bring the change out.
    ws = created["workspace"]["dest"]
    await call(s, "file_write", {"vm": "mcp-a", "path": ws + "/hello.txt", "content": "two\n"})
    patch = await call(s, "workspace_export", {"vm": "mcp-a", "format": "patch"})
    check("-one" in patch["patch"] and "+two" in patch["patch"], f"patch: {patch}")
    check(patch["files_changed"] == 1, f"patch: {patch}")
    branch = await call(s, "workspace_export", {"vm": "mcp-a", "format": "branch", "branch": "mcp-work"})
    check(branch["branch"].endswith("mcp-work"), f"branch: {branch}")
    out["bad_format"] = await refused(s, "workspace_export", {"vm": "mcp-a", "format": "zip"})

    d = await call(s, "vm_delete", {"vm": "mcp-a"})
    check(d["deleted"] == ["mcp-a"], f"delete: {d}")


async def allow_scenario(s, out):
    names = {t.name for t in (await s.list_tools()).tools}
    out["tools"] = sorted(names)


async def ephemeral_scenario(s, out):
    await call(s, "vm_create", {"name": os.environ["MCP_VM"]})
    over = await refused(s, "vm_create", {"name": "mcp-over"})
    check("--max-vms 1" in over, f"over the cap: {over}")
    # The test kills the server (and this client) with SIGKILL now.
    print("READY", flush=True)
    await asyncio.sleep(3600)


async def ephemeral_exit_scenario(s, out):
    """Returns at once: the client closes the server's stdin."""
    await call(s, "vm_create", {"name": os.environ["MCP_VM"]})


SCENARIOS = {
    "main": main_scenario,
    "allow": allow_scenario,
    "ephemeral": ephemeral_scenario,
    "ephemeral-exit": ephemeral_exit_scenario,
}


async def run():
    scenario = sys.argv[1]
    check(sys.argv[2] == "--", "usage: mcp_client.py SCENARIO -- SERVER_COMMAND...")
    cmd = sys.argv[3:]
    params = StdioServerParameters(command=cmd[0], args=cmd[1:], env=dict(os.environ))
    out = {}
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            await s.initialize()
            await SCENARIOS[scenario](s, out)
    print("RESULT " + json.dumps(out), flush=True)


asyncio.run(run())
