-- Budget-low events per sub-allocation. low_notified is set when the sub-allocation's available
-- budget falls below the configured fraction of what it was credited, and cleared when it rises
-- back to it; low_crossings counts the falls and numbers their events.
ALTER TABLE allocations
    ADD COLUMN low_notified boolean NOT NULL DEFAULT false,
    ADD COLUMN low_crossings integer NOT NULL DEFAULT 0 CHECK (low_crossings >= 0);
