-- Migration 2: port forwards, the operation journal, VM labels.

CREATE TABLE port_forwards (
    vm_id      TEXT    NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    proto      TEXT    NOT NULL CHECK (proto IN ('tcp', 'udp')),
    bind_addr  TEXT    NOT NULL,
    host_port  INTEGER NOT NULL CHECK (host_port BETWEEN 1 AND 65535),
    guest_port INTEGER NOT NULL CHECK (guest_port BETWEEN 1 AND 65535),
    UNIQUE (bind_addr, proto, host_port)
) STRICT;

CREATE INDEX port_forwards_vm_id ON port_forwards (vm_id);

-- Long operations in flight. A row exists from the first durable step of an
-- operation until it is finished, so after a crash (kill -9) the daemon finds
-- every operation it must complete or undo. `kind` is checked by the Rust
-- enum, not here, so new kinds need no table rebuild.
CREATE TABLE operations (
    op_id      TEXT    PRIMARY KEY NOT NULL,
    kind       TEXT    NOT NULL,
    subject_id TEXT    NOT NULL,
    stage      TEXT    NOT NULL,
    -- unix milliseconds
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;

ALTER TABLE vms ADD COLUMN labels_json TEXT NOT NULL DEFAULT '{}';
