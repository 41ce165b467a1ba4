-- Automatic out-of-office replies (`auto_reply:`, docs/auto-replies.md).

-- A third target: an item (configuration, absence, 'reply') keeps the
-- employee's mailbox reply right for that absence, planned, retried, adopted
-- and monitored like the calendar targets.
ALTER TABLE sync_items DROP CONSTRAINT sync_items_target_known;
ALTER TABLE sync_items ADD CONSTRAINT sync_items_target_known
    CHECK (target IN ('calendar', 'team', 'reply'));

-- A mailbox holds one reply, whichever absence it is for: what we last did
-- to it, per configuration and mailbox.
--   readback      digest of the setting read back right after our last write
--                 (servers rewrite messages): a setting with another digest is
--                 the employee's and is left alone
--   applied_hash  what we wanted then (unchanged: nothing to write)
--   intent        fingerprint of a write that may have landed unrecorded (set
--                 before the call, cleared with its record): a crash between the
--                 two leaves the reply ours, not the employee's
--   recheck_at    when a later absence's reply takes over (the end of this one)
CREATE TABLE auto_replies (
    config_id    text NOT NULL REFERENCES sync_configs (id) ON DELETE CASCADE,
    mailbox      text NOT NULL,
    readback     text,
    applied_hash text,
    intent       text,
    absence_ids  text[] NOT NULL DEFAULT '{}',
    recheck_at   timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (config_id, mailbox)
);
CREATE INDEX auto_replies_recheck ON auto_replies (recheck_at) WHERE recheck_at IS NOT NULL;

-- The absences of one mailbox (rule 5.5's address: the calendar override, else
-- the e-mail), for the one reply it holds.
CREATE INDEX absences_target_address ON absences (
    tenant,
    lower(btrim(COALESCE(NULLIF(data #>> '{employee,calendar_address}', ''),
                         data #>> '{employee,email}')))
) WHERE NOT deleted;
