-- Shared metadata of a scaled-out picie: model versions, the active model, datasets' indexes
-- and jobs with their leases. Blobs (packages, images, checkpoints) live in object storage.

-- Model versions made by jobs (shipped packages stay in each replica's image). `revision`
-- grows on every rewrite of the package (class names, colours), so replicas know to fetch it
-- again; `manifest` is the package's manifest, so listing needs no blob reads.
CREATE TABLE models (
    name text PRIMARY KEY,
    revision bigint NOT NULL DEFAULT 1,
    manifest jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row: the model every replica serves.
CREATE TABLE active_model (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    name text NOT NULL,
    revision bigint NOT NULL DEFAULT 0,
    changed_at timestamptz NOT NULL DEFAULT now()
);

-- A dataset's index (name, images with their hashes and sizes) as one document: uploads lock
-- the row, so two replicas adding to one dataset take turns.
CREATE TABLE datasets (
    id text PRIMARY KEY,
    created_at text NOT NULL,
    doc jsonb NOT NULL
);

-- Jobs: `doc` is the job as the API shows it; `state` mirrors doc's state for the queries.
-- A worker holds a running job by its lease (`lease_owner` until `lease_expires`), renewed
-- by heartbeats; a job whose lease ran out is claimed again by another worker.
CREATE TABLE jobs (
    id text PRIMARY KEY,
    created_at text NOT NULL,
    state text NOT NULL,
    doc jsonb NOT NULL,
    lease_owner text,
    lease_expires timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    attempts integer NOT NULL DEFAULT 0
);
CREATE INDEX jobs_claimable ON jobs (created_at, id) WHERE state IN ('queued', 'running');
