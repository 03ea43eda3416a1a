-- QIDO-RS (PS3.18 10.6) indexes beyond those of 0001_index.sql.

-- The study list's order (newest first; studies without a date last): an unfiltered or date-filtered page is
-- read straight from this index, without sorting every study.
CREATE INDEX studies_recent ON studies (study_date DESC NULLS LAST, study_time DESC NULLS LAST, study_pk DESC);

-- Single value matching on attributes without a column is JSON containment on the stored attributes.
CREATE INDEX studies_attrs ON studies USING gin (attrs jsonb_path_ops);
CREATE INDEX series_attrs ON series USING gin (attrs jsonb_path_ops);

-- SOPClassesInStudy (returned for every study, and matchable) from the index alone.
CREATE INDEX instances_study_sop_class ON instances (study_pk, sop_class_uid);
