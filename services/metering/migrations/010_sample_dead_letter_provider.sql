-- The dead-letter key of an invalid sample names its provider, "sample:<provider>/<sample id>",
-- because sample ids are unique only per provider: keyed by the id alone, one provider's dead
-- letter hid another provider's for the same id. Stored keys are rewritten with the provider
-- token of their subject, acsp.usage.<provider>.<region>.<node>, so a replay of an invalid
-- sample already kept still meets its row and does not add a second one.
UPDATE metering.dead_letters
SET dedupe_key = 'sample:' || split_part(subject, '.', 3) || '/' || substr(dedupe_key, 8)
WHERE dedupe_key LIKE 'sample:%' AND subject LIKE 'acsp.usage.%';
