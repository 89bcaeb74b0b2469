-- Migration 7: a snapshot keeps the secrets of the VM it was taken from
-- (its guest's memory holds their placeholders), and every VM restored
-- from it gets the same grants with the same placeholders. A placeholder
-- is no longer one VM's alone (the proxy matches a VM's placeholders
-- against that VM's grants only), so `vm_secrets` loses its UNIQUE.
CREATE TABLE snapshot_secrets (
    snapshot_id TEXT NOT NULL REFERENCES snapshots (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    hosts       TEXT NOT NULL CHECK (hosts <> ''),
    placeholder TEXT NOT NULL,
    in_body     INTEGER NOT NULL DEFAULT 0 CHECK (in_body IN (0, 1)),
    PRIMARY KEY (snapshot_id, name)
) STRICT;

CREATE INDEX snapshot_secrets_name ON snapshot_secrets (name);

CREATE TABLE vm_secrets_new (
    vm_id       TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    hosts       TEXT NOT NULL CHECK (hosts <> ''),
    placeholder TEXT NOT NULL,
    in_body     INTEGER NOT NULL DEFAULT 0 CHECK (in_body IN (0, 1)),
    PRIMARY KEY (vm_id, name)
) STRICT;

INSERT INTO vm_secrets_new (vm_id, name, hosts, placeholder, in_body)
    SELECT vm_id, name, hosts, placeholder, in_body FROM vm_secrets;
DROP TABLE vm_secrets;
ALTER TABLE vm_secrets_new RENAME TO vm_secrets;
CREATE INDEX vm_secrets_name ON vm_secrets (name);
