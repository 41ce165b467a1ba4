-- Operator commands: when admin consent recorded a configuration's directory
-- (a file that names another directory is refused with that time), and
-- configurations paused with `absence-sync config pause` (intake goes on,
-- nothing is written until `config resume`).

-- NULL for a directory recorded before this migration: the time is unknown.
ALTER TABLE sync_configs ADD COLUMN granted_at timestamptz;
ALTER TABLE sync_configs ADD COLUMN paused_at timestamptz;
