-- A failed VM owns nothing, its leases included: rows that failed before
-- banger released them on failure give back their guest IP, MAC and CID.
UPDATE vms SET guest_ip = NULL, mac = NULL, vsock_cid = NULL WHERE state = 'failed';
