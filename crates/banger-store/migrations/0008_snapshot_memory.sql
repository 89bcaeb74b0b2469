-- Migration 8: where a snapshot keeps its guest's memory, and what its
-- saved state needs of the host besides its QEMU: the accelerator, and
-- under KVM the CPU (`banger_host::cpu_identity`). Rows from before say
-- '' (not recorded, not checked).
--
-- Memory: `state`: in the
-- state file, inside QEMU's migration stream, as QEMU's own RAM
-- (snapshots taken before banger kept guest RAM in a memfd). `stream`: in
-- the state file too, as the backend `ram0` (snapshots of restored VMs,
-- whose RAM is a private mapping). `file`: in a file of its own, a
-- sparse image of guest RAM that restores map copy-on-write, its SHA-256
-- (of the pages that are not zero) in `memory_sha256`.
ALTER TABLE snapshots ADD COLUMN memory TEXT NOT NULL DEFAULT 'state'
    CHECK (memory IN ('state', 'stream', 'file'));
ALTER TABLE snapshots ADD COLUMN memory_sha256 TEXT NOT NULL DEFAULT '';
ALTER TABLE snapshots ADD COLUMN accel TEXT NOT NULL DEFAULT '';
ALTER TABLE snapshots ADD COLUMN cpu TEXT NOT NULL DEFAULT '';
