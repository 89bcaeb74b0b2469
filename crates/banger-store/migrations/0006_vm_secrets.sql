-- Migration 6: the secrets a VM may use (`vm create --secret NAME@HOSTS`).
-- Only the secret's name, the hosts it goes to and the VM's placeholder for
-- it: the value itself lives in `<state>/secrets/NAME`, never here.
CREATE TABLE vm_secrets (
    vm_id       TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    -- comma-separated host patterns (`api.example.com`, `*.example.org`)
    hosts       TEXT NOT NULL CHECK (hosts <> ''),
    placeholder TEXT NOT NULL UNIQUE,
    -- the proxy replaces the placeholder in request bodies too (opt-in)
    in_body     INTEGER NOT NULL DEFAULT 0 CHECK (in_body IN (0, 1)),
    PRIMARY KEY (vm_id, name)
) STRICT;

CREATE INDEX vm_secrets_name ON vm_secrets (name);
