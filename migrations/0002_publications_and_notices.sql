-- Where a version's files are in the object store: a prefix of their own per publication
-- (`models/<name>/<upload>/`), so a publication never overwrites the files another row names;
-- NULL for versions published before, whose files sit directly under `models/<name>/`. `job` is
-- the job that wrote the version: a job resumed after it published finds its work by it, and a
-- second job writing the same name is refused.
ALTER TABLE models ADD COLUMN blob_prefix text;
ALTER TABLE models ADD COLUMN job text;

-- Changes are announced (LISTEN/NOTIFY): replicas follow activations and new revisions, workers
-- wait for queued jobs and job watchers read progress on these notices instead of polling.
CREATE FUNCTION picie_notify_job() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('picie_jobs', NEW.id);
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION picie_notify_job();

CREATE FUNCTION picie_notify_models() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('picie_models', '');
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER models_notify AFTER INSERT OR UPDATE OR DELETE ON models FOR EACH STATEMENT EXECUTE FUNCTION picie_notify_models();
CREATE TRIGGER active_model_notify AFTER INSERT OR UPDATE ON active_model FOR EACH STATEMENT EXECUTE FUNCTION picie_notify_models();
