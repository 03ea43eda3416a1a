-- A change to what the policy decides on about a study (its patient, its series' modalities) notifies
-- `hounsfield_study_facts` with the study's UID, so that each server process drops that study from its cache of
-- facts (authz/factscache.py) within milliseconds of the commit. A new study is notified too: a process may have
-- cached that the UID was not stored. Updates that leave the facts alone (the ingest's `updated_at`) notify
-- nothing; an empty payload (a truncate, a series whose study is already gone) clears every cached study.
CREATE FUNCTION study_facts_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    uid text;
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        uid := '';
    ELSIF TG_TABLE_NAME = 'studies' THEN
        uid := CASE WHEN TG_OP = 'DELETE' THEN OLD.study_uid ELSE NEW.study_uid END;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT study_uid INTO uid FROM studies WHERE study_pk = OLD.study_pk;
    ELSE
        SELECT study_uid INTO uid FROM studies WHERE study_pk = NEW.study_pk;
        IF TG_OP = 'UPDATE' AND OLD.study_pk IS DISTINCT FROM NEW.study_pk THEN
            PERFORM pg_notify('hounsfield_study_facts', coalesce((SELECT study_uid FROM studies
                                                                  WHERE study_pk = OLD.study_pk), ''));
        END IF;
    END IF;
    PERFORM pg_notify('hounsfield_study_facts', coalesce(uid, ''));
    RETURN NULL;
END
$$;

CREATE TRIGGER studies_facts_inserted AFTER INSERT OR DELETE ON studies
    FOR EACH ROW EXECUTE FUNCTION study_facts_notify();
CREATE TRIGGER studies_facts_updated AFTER UPDATE ON studies
    FOR EACH ROW WHEN (OLD.patient_id IS DISTINCT FROM NEW.patient_id
                       OR OLD.issuer_of_patient_id IS DISTINCT FROM NEW.issuer_of_patient_id
                       OR OLD.study_uid IS DISTINCT FROM NEW.study_uid)
    EXECUTE FUNCTION study_facts_notify();
CREATE TRIGGER studies_facts_truncated AFTER TRUNCATE ON studies
    FOR EACH STATEMENT EXECUTE FUNCTION study_facts_notify();
CREATE TRIGGER series_facts_inserted AFTER INSERT OR DELETE ON series
    FOR EACH ROW EXECUTE FUNCTION study_facts_notify();
CREATE TRIGGER series_facts_updated AFTER UPDATE ON series
    FOR EACH ROW WHEN (OLD.modality IS DISTINCT FROM NEW.modality OR OLD.study_pk IS DISTINCT FROM NEW.study_pk)
    EXECUTE FUNCTION study_facts_notify();
CREATE TRIGGER series_facts_truncated AFTER TRUNCATE ON series
    FOR EACH STATEMENT EXECUTE FUNCTION study_facts_notify();
