-- Ingest now adds up the shares of the samples of other tasks that overlap a new sample, so a
-- fractional sample that starts before its accelerator's end_us is compared with every task on
-- the accelerator, and the end of the whole-accelerator samples no longer saves a probe.
ALTER TABLE metering.sample_coverage
    DROP COLUMN exclusive_end,
    DROP COLUMN prior_exclusive_end;
