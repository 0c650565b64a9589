-- The provider whose agent named an attempt's end trigger in a task or health event. It is
-- NULL when the scheduler named the trigger (a recall) and for triggers recorded before this
-- column existed. A provider that runs no task of the attempt cannot record a trigger once the
-- attempt's providers are known, and a trigger it recorded before they were known is cleared
-- when they arrive, so it cannot decide the attempt's refund.
ALTER TABLE metering.jobs ADD COLUMN end_trigger_provider text;
