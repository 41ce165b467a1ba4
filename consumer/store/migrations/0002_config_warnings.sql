-- Warnings a provider reports about a configuration (e.g. an Exchange server
-- out of support), shown by `config show` and the monitoring API.
ALTER TABLE sync_configs ADD COLUMN warnings jsonb NOT NULL DEFAULT '[]'::jsonb;
