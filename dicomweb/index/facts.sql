-- Facts about a study that policies decide on (its patient, its modalities): `dicomweb.index.facts`.

-- name: study_facts
SELECT st.patient_id,
       coalesce(array(SELECT DISTINCT se.modality FROM series se
                      WHERE se.study_pk = st.study_pk AND se.modality IS NOT NULL ORDER BY 1), '{}') AS modalities
FROM studies st WHERE st.study_uid = $1;
