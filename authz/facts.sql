-- Facts about a resource that policies decide on (patient, modalities), looked up by the authorization guard.

-- name: study_facts
SELECT st.patient_id,
       coalesce(array(SELECT DISTINCT se.modality FROM series se
                      WHERE se.study_pk = st.study_pk AND se.modality IS NOT NULL ORDER BY 1), '{}') AS modalities
FROM studies st WHERE st.study_uid = $1;

-- name: instance_study
SELECT st.study_uid FROM instances i JOIN studies st ON st.study_pk = i.study_pk WHERE i.sop_instance_uid = $1;
