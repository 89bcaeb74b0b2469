#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/).

layer_apply: two stacked tar layers in one input, split where the target
splits them (its first byte b puts the split at b * len / 256), each aiming
at the absolute sentinel /tmp/banger-fuzz-sentinel: directly, through "..",
through a symlink the lower layer makes and the upper writes through, and
through a hard link. frame_decode: request lines, good and bad. dispatch:
frames of the daemon's real methods with their params (a create that fails
and rolls back, its delete, lists, shows, gc, forwards, a session hold, bad
params, two frames on one connection).

Run it from anywhere; the files are committed, so CI needs no Python.
"""
import io
import json
import os
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
SENTINEL = "/tmp/banger-fuzz-sentinel"


def tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for e in entries:
            t.addfile(e[0], io.BytesIO(e[1]) if len(e) > 1 else None)
    # tarfile pads to 10 KiB records; the end-of-archive blocks are enough.
    data = buf.getvalue().rstrip(b"\0")
    return data + b"\0" * (-len(data) % 512 + 1024)


def file(name, data=b"guest"):
    i = tarfile.TarInfo(name)
    i.size = len(data)
    return (i, data)


def link(name, target, kind):
    i = tarfile.TarInfo(name)
    i.type = kind
    i.linkname = target
    return (i,)


def stacked(lower_entries, upper_entries):
    """lower + upper, with a first entry whose name's first byte splits the
    input exactly between them (padding the upper layer to fit)."""
    for first in range(ord("0"), ord("z") + 1):
        lower = tar([file(chr(first) + "pad")] + lower_entries)
        upper = tar(upper_entries)
        for pad in range(0, 200):
            data = lower + upper + b"\0" * (512 * pad)
            if first * len(data) // 256 == len(lower):
                return data
    raise SystemExit("no split byte fits")


def main():
    out = os.path.join(HERE, "corpus", "layer_apply")
    os.makedirs(out, exist_ok=True)
    seeds = {
        "absolute": stacked([file(SENTINEL + "/secret")], [file(SENTINEL + "/new")]),
        "dotdot": stacked(
            [file("../../../../../../.." + SENTINEL + "/secret")],
            [file("a/../../.." + SENTINEL + "/new")],
        ),
        "symlink_then_write": stacked(
            [link("escape", SENTINEL, tarfile.SYMTYPE)], [file("escape/secret")]
        ),
        "relative_symlink": stacked(
            [link("up", "../../../../../../../tmp", tarfile.SYMTYPE)],
            [file("up/banger-fuzz-sentinel/secret")],
        ),
        "hardlink": stacked(
            [link("hard", SENTINEL + "/secret", tarfile.LNKTYPE)], [file("hard")]
        ),
        "whiteout": stacked(
            [file("etc/keep")], [file("../banger-fuzz-sentinel/.wh.secret", b"")]
        ),
    }
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)

    out = os.path.join(HERE, "corpus", "frame_decode")
    os.makedirs(out, exist_ok=True)
    frames = {
        "status": b'{"v":1,"id":1,"method":"daemon.status"}\n',
        "with_op": b'{"v":1,"id":2,"op_id":"op-abc123","method":"vm.list","params":{}}\n',
        "two_frames": b'{"v":1,"id":1,"method":"a"}\n{"v":2,"id":9,"method":"b"}\n',
        "bad_version": b'{"v":9,"id":3,"method":"vm.show","params":{"name":"x"}}\n',
        "not_object": b"[1,2,3]\n",
        "null_params": b'{"v":1,"id":4,"method":"vm.show","params":null}\n',
    }
    for name, data in frames.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)

    out = os.path.join(HERE, "corpus", "dispatch")
    os.makedirs(out, exist_ok=True)

    def frame(i, method, params=None):
        f = {"v": 1, "id": i, "op_id": "op-fuzz%02d" % i, "method": method}
        if params is not None:
            f["params"] = params
        return (json.dumps(f, separators=(",", ":")) + "\n").encode()

    calls = {
        "daemon_status": [("daemon.status", {})],
        "helper_ping": [("helper.ping", {})],
        "vm_list": [("vm.list", {})],
        "vm_show": [("vm.show", {"name": "fz"})],
        "vm_create_then_delete": [
            ("vm.create", {"name": "fz", "vcpus": 1, "memory_mib": 256, "wait": "agent"}),
            ("vm.show", {"name": "fz"}),
            ("vm.delete", {"names": ["fz"], "force": True}),
        ],
        # The hold ends when the next frame (or the end) arrives; the
        # create in it rolls back, and the session's end deletes its row.
        "session_hold": [
            ("session.hold", {"session": "fz-session"}),
            ("vm.create", {"name": "fs", "session": "fz-session", "wait": "agent"}),
        ],
        "vm_create_bad_sizes": [("vm.create", {"name": "fz", "vcpus": 0, "disk_mib": 1})],
        "vm_create_ports": [
            ("vm.create", {"name": "fp", "ports": [{"host_port": 8080, "guest_port": 80}]})
        ],
        "vm_start_stop": [
            ("vm.start", {"names": ["fz"], "no_ssh_wait": True}),
            ("vm.stop", {"names": ["fz"]}),
            ("vm.restart", {"names": []}),
        ],
        "vm_set": [("vm.set", {"name": "fz", "vcpus": 2, "memory_mib": 512, "disk_mib": 8192})],
        "vm_guest": [
            ("vm.exec", {"name": "fz", "argv": ["true"], "env": {}, "stdin": False}),
            ("vm.exec_input", {"session": "s1", "data": "aGk=", "eof": True}),
            ("vm.exec_signal", {"session": "s1", "signal": 15}),
            ("vm.ports", {"name": "fz"}),
            ("vm.stats", {"name": "fz"}),
            ("vm.authsync", {"name": "fz"}),
        ],
        "images": [
            ("image.list", {}),
            ("image.show", {"name": "debian-12"}),
            ("image.build", {"name": "debian-12"}),
            ("image.promote", {"name": "nosuch"}),
            ("image.delete", {"name": "nosuch"}),
        ],
        "image_register_bad": [
            ("image.register", {"name": "x", "vmlinux": "/nonexistent", "rootfs": "r", "work_seed": "w"})
        ],
        "gc": [("host.gc", {"dry_run": True}), ("op.status", {"op_id": "op-fuzz00"})],
        "forwards": [
            ("vm.port_forward.add", {"name": "fz", "forwards": [{"host_port": 1, "guest_port": 2}]}),
            ("vm.port_forward.list", {}),
            ("vm.port_forward.remove", {"name": "fz", "host_port": 1}),
        ],
        "dns_status": [("network.dns_status", {})],
        "secrets": [
            ("secret.set", {"name": "FZ", "value": "v"}),
            ("secret.list", {}),
            ("vm.create", {"name": "fk", "secrets": [{"name": "FZ", "hosts": ["api.test"]}]}),
            ("secret.rm", {"name": "FZ"}),
        ],
        "workspaces": [
            ("workspace.prepare", {"vm": "fz", "path": ".", "include_ignored": False}),
            ("workspace.status", {"vm": "fz"}),
        ],
        "unknown_method": [("vm.nosuch", {})],
        "no_params": [("vm.show", None)],
    }
    for name, frames in calls.items():
        data = b"".join(frame(i, m, p) for i, (m, p) in enumerate(frames))
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


main()
