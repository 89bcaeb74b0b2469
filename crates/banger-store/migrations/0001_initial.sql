-- Migration 1: the initial schema.
--
-- Only durable intent lives here: what an image or a VM *is*. Anything that
-- dies with the host or the daemon (pids, tap devices, loop devices, sockets
-- in use) is rediscovered at runtime and never stored.

CREATE TABLE images (
    id             TEXT    PRIMARY KEY NOT NULL,
    name           TEXT    NOT NULL UNIQUE,
    state          TEXT    NOT NULL CHECK (state IN ('building', 'ready', 'failed')),
    source_kind    TEXT    NOT NULL CHECK (source_kind IN ('recipe', 'oci', 'import', 'register')),
    -- recipe name, OCI reference or import path, depending on source_kind
    source_ref     TEXT    NOT NULL,
    source_digest  TEXT,
    dir            TEXT    NOT NULL,
    kernel_path    TEXT    NOT NULL,
    vmlinux_path   TEXT,
    initrd_path    TEXT,
    rootfs_path    TEXT    NOT NULL,
    work_seed_path TEXT,
    -- JSON object: file name -> sha256 (hex)
    manifest_json  TEXT    NOT NULL DEFAULT '{}',
    size_bytes     INTEGER NOT NULL DEFAULT 0 CHECK (size_bytes >= 0),
    default_init   TEXT    NOT NULL CHECK (default_init IN ('fast', 'systemd')),
    is_default     INTEGER NOT NULL DEFAULT 0 CHECK (is_default IN (0, 1)),
    last_error     TEXT,
    -- unix milliseconds
    created_at     INTEGER NOT NULL
) STRICT;

-- At most one image is the default.
CREATE UNIQUE INDEX images_single_default ON images (is_default) WHERE is_default = 1;

CREATE TABLE vms (
    id           TEXT    PRIMARY KEY NOT NULL,
    name         TEXT    NOT NULL UNIQUE,
    image_id     TEXT    NOT NULL REFERENCES images (id) ON DELETE RESTRICT,
    vmm          TEXT    NOT NULL CHECK (vmm IN ('qemu', 'firecracker')),
    init_mode    TEXT    NOT NULL CHECK (init_mode IN ('fast', 'systemd')),
    vcpus        INTEGER NOT NULL CHECK (vcpus >= 1),
    memory_mib   INTEGER NOT NULL CHECK (memory_mib >= 1),
    -- size of the work disk
    disk_mib     INTEGER NOT NULL CHECK (disk_mib >= 1),
    state        TEXT    NOT NULL CHECK (state IN ('creating', 'running', 'stopped', 'failed', 'deleting')),
    -- The UNIQUE columns below are the durable leases: a row holding an
    -- address is the lease, so an address is never handed out twice.
    guest_ip     TEXT    UNIQUE,
    mac          TEXT    UNIQUE,
    vsock_cid    INTEGER UNIQUE CHECK (vsock_cid IS NULL OR vsock_cid >= 3),
    dns_name     TEXT,
    vm_dir       TEXT    NOT NULL,
    api_socket   TEXT,
    console_log  TEXT,
    last_error   TEXT,
    -- unix milliseconds
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER
) STRICT;

CREATE INDEX vms_image_id ON vms (image_id);
