-- Person names are matched per component group (alphabetic, ideographic, phonetic: PS3.5 6.2.1; PS3.4
-- C.2.2.2.1 and C.2.2.2.4 apply to each group): each PN column QIDO-RS and C-FIND match keeps its three groups,
-- each normalized as the *_search column normalizes a whole name (upper case, components joined by single
-- spaces), NULL for an empty group; NULL when the name is absent. The *_search columns stay: fuzzy matching
-- (the start of any component of any group) and the trigram index read them.
ALTER TABLE studies ADD COLUMN patient_name_groups text[], ADD COLUMN referring_physician_groups text[];

-- Rows already indexed: a name of one group is its *_search value as ingest normalized it; the rare names with
-- several groups are split and normalized here (upper() follows the database's locale where ingest follows
-- Python's Unicode tables; they agree on ASCII and on caseless scripts).
CREATE FUNCTION pg_temp.pn_group(name text, k integer) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT nullif(upper(btrim(regexp_replace(replace(split_part(name, '=', k), '^', ' '),
                                             '[[:space:]\u3000]+', ' ', 'g'))), '')
$$;
CREATE FUNCTION pg_temp.pn_groups(name text, search text) RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN search IS NULL THEN NULL
        WHEN strpos(name, '=') = 0 THEN ARRAY[search, NULL, NULL]
        ELSE ARRAY[pg_temp.pn_group(name, 1), pg_temp.pn_group(name, 2), pg_temp.pn_group(name, 3)]
    END
$$;
UPDATE studies
SET patient_name_groups = pg_temp.pn_groups(patient_name, patient_name_search),
    referring_physician_groups = pg_temp.pn_groups(referring_physician_name, referring_physician_search)
WHERE patient_name_search IS NOT NULL OR referring_physician_search IS NOT NULL;
DROP FUNCTION pg_temp.pn_groups(text, text);
DROP FUNCTION pg_temp.pn_group(text, integer);

-- Exact and prefix matching of PatientName go through these (a value of one group matches any group: a
-- BitmapOr of the three). Few names have ideographic or phonetic groups, so their indexes are partial and
-- small. The whole-name btree they replace served only the alphabetic-first form.
DROP INDEX studies_patient_name;
CREATE INDEX studies_patient_name_alphabetic ON studies ((patient_name_groups[1]) text_pattern_ops);
CREATE INDEX studies_patient_name_ideographic ON studies ((patient_name_groups[2]) text_pattern_ops)
    WHERE patient_name_groups[2] IS NOT NULL;
CREATE INDEX studies_patient_name_phonetic ON studies ((patient_name_groups[3]) text_pattern_ops)
    WHERE patient_name_groups[3] IS NOT NULL;
