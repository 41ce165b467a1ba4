-- Batched dispatch: who holds an item's lease (so a replica renews only its
-- own leases while a long operation runs), and mailboxes leased to one
-- replica at a time (a provider's per-mailbox limit then holds across
-- replicas; see docs/architecture.md).
ALTER TABLE sync_items ADD COLUMN lease_owner text;

CREATE TABLE mailbox_leases (
    mailbox_key text PRIMARY KEY,          -- '<provider kind>:<address in lower case>'
    holder      text NOT NULL,             -- the dispatcher instance holding it
    lease_until timestamptz NOT NULL
);

-- An item is updated several times per write (leased, its create intent, its
-- outcome); room in each page lets the updates that touch no indexed column
-- stay on their page without new index entries (HOT updates).
ALTER TABLE sync_items SET (fillfactor = 70);
