-- Migration 9: the host repository each workspace of a VM came from, as
-- the daemon recorded it at prepare: export writes there when not told
-- where, and never where the guest says (a hostile guest could name
-- another of the user's repositories). A snapshot keeps its source VM's,
-- and every VM restored from it gets them, as with secrets.
CREATE TABLE vm_workspaces (
    vm_id     TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    dest      TEXT NOT NULL CHECK (dest <> ''),
    host_path TEXT NOT NULL CHECK (host_path <> ''),
    PRIMARY KEY (vm_id, dest)
) STRICT;

CREATE TABLE snapshot_workspaces (
    snapshot_id TEXT NOT NULL REFERENCES snapshots (id) ON DELETE CASCADE,
    dest        TEXT NOT NULL CHECK (dest <> ''),
    host_path   TEXT NOT NULL CHECK (host_path <> ''),
    PRIMARY KEY (snapshot_id, dest)
) STRICT;
