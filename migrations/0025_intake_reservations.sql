-- The instances that server processes acknowledged to a C-STORE and have not indexed yet, for the checks before a
-- C-STORE's answer in the other processes (dicomweb/dimse/indexer.py, with HOUNSFIELD_PROCESSES > 1): a study is of
-- one patient, a series of one study, and a SOP Instance UID not overwritten when overwrite is off, also across the
-- processes' intakes. Each process checks its own acknowledged instances in memory; this table is what the others
-- see of them.
--
-- UNLOGGED: a reservation lives for the milliseconds between an answer and its index commit, and writing it must not
-- wait for a WAL flush in every C-STORE's path. After a crash of the database the table is empty; the instances
-- still waiting are then checked against the index only until they are indexed (their processes' own checks go on).
CREATE UNLOGGED TABLE intake_reservations (
    id               bigserial PRIMARY KEY,
    slot             integer NOT NULL,
    study_uid        text NOT NULL,
    series_uid       text NOT NULL,
    sop_instance_uid text NOT NULL,
    patient_id       text,
    issuer           text,
    sha256           text NOT NULL
);
CREATE INDEX intake_reservations_study ON intake_reservations (study_uid);
CREATE INDEX intake_reservations_series ON intake_reservations (series_uid);
CREATE INDEX intake_reservations_sop ON intake_reservations (sop_instance_uid);
CREATE INDEX intake_reservations_slot ON intake_reservations (slot);

-- Check an instance against the index and the slots' reservations and, when nothing contradicts it, reserve it for
-- slot p_slot (NULL: check only, for a server whose one process keeps its acknowledged instances in memory), in one
-- statement: the study, series and instance are locked (transaction advisory locks, in a fixed order) until it
-- commits, so two processes checking contradicting instances at once are decided one after the other. conflict:
-- 'patient' (the study is filed under study_patient_id / study_issuer), 'series' (the series is of another study)
-- or 'duplicate' (the SOP Instance UID is stored or reserved with other bytes, overwrite off); NULL otherwise, with
-- the reservation's id when one was made. The one place these rules are decided before a C-STORE's answer.
CREATE FUNCTION intake_reserve(
    p_slot integer, p_study text, p_series text, p_sop text, p_patient text, p_issuer text, p_sha256 text,
    p_overwrite boolean,
    OUT conflict text, OUT study_patient_id text, OUT study_issuer text, OUT reservation bigint
) LANGUAGE plpgsql AS $$
DECLARE
    key      bigint;
    known    boolean := false;
    of_study text;
    bytes    text;
BEGIN
    FOR key IN
        SELECT DISTINCT hashtextextended(k, 0) AS h
        FROM unnest(ARRAY['study:' || p_study, 'series:' || p_series, 'sop:' || p_sop]) AS k ORDER BY h
    LOOP
        PERFORM pg_advisory_xact_lock(key);
    END LOOP;
    SELECT true, st.patient_id, st.issuer_of_patient_id INTO known, study_patient_id, study_issuer
    FROM studies st WHERE st.study_uid = p_study;
    IF NOT FOUND THEN
        SELECT true, r.patient_id, r.issuer INTO known, study_patient_id, study_issuer
        FROM intake_reservations r WHERE r.study_uid = p_study LIMIT 1;
    END IF;
    IF known AND (study_patient_id IS DISTINCT FROM p_patient OR study_issuer IS DISTINCT FROM p_issuer) THEN
        conflict := 'patient';
        RETURN;
    END IF;
    study_patient_id := NULL;
    study_issuer := NULL;
    SELECT st.study_uid INTO of_study FROM series se JOIN studies st ON st.study_pk = se.study_pk
    WHERE se.series_uid = p_series;
    IF of_study IS NULL THEN
        SELECT r.study_uid INTO of_study FROM intake_reservations r WHERE r.series_uid = p_series LIMIT 1;
    END IF;
    IF of_study IS NOT NULL AND of_study <> p_study THEN
        conflict := 'series';
        RETURN;
    END IF;
    IF NOT p_overwrite AND p_sha256 <> '' THEN
        SELECT coalesce(i.pixel ->> 'original_sha256', i.sha256) INTO bytes FROM instances i
        WHERE i.sop_instance_uid = p_sop;
        IF bytes IS NULL THEN
            SELECT r.sha256 INTO bytes FROM intake_reservations r
            WHERE r.sop_instance_uid = p_sop AND r.sha256 <> '' AND r.sha256 <> p_sha256 LIMIT 1;
        END IF;
        IF bytes IS NOT NULL AND bytes <> p_sha256 THEN
            conflict := 'duplicate';
            RETURN;
        END IF;
    END IF;
    IF p_slot IS NOT NULL THEN
        INSERT INTO intake_reservations (slot, study_uid, series_uid, sop_instance_uid, patient_id, issuer, sha256)
        VALUES (p_slot, p_study, p_series, p_sop, p_patient, p_issuer, p_sha256)
        RETURNING id INTO reservation;
    END IF;
END
$$;
