-- The accelerators of each pledge's provider, region and model that the scheduler reported as
-- registered and healthy (on up nodes, not failed), read by PledgeSync while the pledge's window
-- is open. A row is written only when the counts change, and holds until the pledge's next row,
-- so a settlement can tell whether the protected accelerators were there throughout a period.
CREATE TABLE metering.pledge_capacity (
    pledge_id text NOT NULL REFERENCES metering.pledges (pledge_id),
    observed_at timestamptz NOT NULL,
    registered_count integer NOT NULL CHECK (registered_count >= 0),
    healthy_count integer NOT NULL CHECK (healthy_count >= 0),
    PRIMARY KEY (pledge_id, observed_at)
);
