-- A sample id is unique per provider, not across providers. Agents number their samples
-- "<provider>.<region>.<node>/<sequence>", so with the id alone as the key, one provider that
-- published another's next ids made ingest drop that provider's real samples as replays.
-- Stored rows keep their ids, and a replay of one still meets its row under the new key.
ALTER TABLE metering.usage_samples ALTER COLUMN provider TYPE text COLLATE "C";
ALTER TABLE metering.usage_samples DROP CONSTRAINT usage_samples_pkey;
ALTER TABLE metering.usage_samples ADD PRIMARY KEY (provider, sample_id);
