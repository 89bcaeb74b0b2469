-- A VM's network policy (`--net`): `none`, `nat` or `allow=LIST`, in the
-- canonical form banger-net prints. VMs made before it had NAT.
ALTER TABLE vms ADD COLUMN net_policy TEXT NOT NULL DEFAULT 'nat';
