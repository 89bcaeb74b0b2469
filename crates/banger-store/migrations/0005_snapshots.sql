-- Snapshots of running VMs (`vm snapshot`): memory and device state in a
-- file, the disks frozen beside it, all under `dir`. A snapshot keeps its
-- image: the image row cannot go while a snapshot refers to it. VMs
-- restored from a snapshot name it in their labels (`banger.snapshot`).
CREATE TABLE snapshots (
    id             TEXT PRIMARY KEY NOT NULL,
    name           TEXT NOT NULL UNIQUE,
    source_vm_id   TEXT NOT NULL,
    source_vm_name TEXT NOT NULL,
    image_id       TEXT NOT NULL REFERENCES images(id),
    vmm            TEXT NOT NULL,
    vmm_version    TEXT NOT NULL,
    init_mode      TEXT NOT NULL,
    vcpus          INTEGER NOT NULL CHECK (vcpus > 0),
    memory_mib     INTEGER NOT NULL CHECK (memory_mib > 0),
    disk_mib       INTEGER NOT NULL CHECK (disk_mib > 0),
    root_format    TEXT NOT NULL CHECK (root_format IN ('qcow2', 'raw')),
    dir            TEXT NOT NULL,
    state_sha256   TEXT NOT NULL,
    size_bytes     INTEGER NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('creating', 'ready')),
    created_at     INTEGER NOT NULL
);
CREATE INDEX snapshots_image ON snapshots(image_id);
