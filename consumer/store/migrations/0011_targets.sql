-- Targets: one (configuration, absence) pair may be written to more than one
-- place. Each place is a target, a small closed set of names kept in
-- `consumer/targets.py` and in the CHECK below (docs/architecture.md,
-- "Targets"):
--   calendar  the employee's own calendar (every configuration; what every
--             item was before this migration)
--   team      the configuration's shared team calendar (`team_calendar:`)
-- A work item is now keyed by (config_id, absence_id, target). Existing rows
-- keep their state and become 'calendar' items.
--
-- Adding a target: a later migration replaces the CHECK (same name) with the
-- longer list, and `consumer/targets.py` registers how the target renders.

ALTER TABLE sync_items ADD COLUMN target text NOT NULL DEFAULT 'calendar';
ALTER TABLE sync_items ADD CONSTRAINT sync_items_target_known
    CHECK (target IN ('calendar', 'team'));
ALTER TABLE sync_items DROP CONSTRAINT sync_items_pkey;
ALTER TABLE sync_items ADD CONSTRAINT sync_items_pkey
    PRIMARY KEY (config_id, absence_id, target);

-- The targets each configuration writes to, kept by `config apply` from its
-- settings: intake, backfill and resync create one item per target in SQL,
-- without reading every configuration's settings.
ALTER TABLE sync_configs ADD COLUMN targets text[] NOT NULL DEFAULT '{calendar}';

-- The history names the target of each operation.
ALTER TABLE sync_log ADD COLUMN target text NOT NULL DEFAULT 'calendar';
DROP INDEX sync_log_item;
CREATE INDEX sync_log_item ON sync_log (config_id, absence_id, target, id);
