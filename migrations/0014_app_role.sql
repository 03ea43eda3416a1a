-- The role the server serves as (server/dbroles.py): `hounsfield_app`, a group role without LOGIN. The schema's
-- owner (whoever runs these migrations) keeps every right; the application gets what serving needs and, on the
-- audit trail, only what appending needs, so that a compromised server cannot rewrite the trail:
--   * audit_log and audit_head: SELECT only. Records are appended by audit_append(), made SECURITY DEFINER
--     (run with its owner's rights, search_path fixed so no temporary table can stand in for the chain), which
--     the application may EXECUTE: it cannot write a row that bypasses the chain nor move the head by hand.
--   * audit_checkpoints: SELECT and INSERT (the checkpoint job signs the head).
--   * no UPDATE, DELETE or TRUNCATE on any of them, and nothing for PUBLIC.
-- Tables and sequences made by later migrations (run by the same owner) get the serving rights by default
-- privileges; a later append-only table must REVOKE them as done here.
--
-- The embedded PostgreSQL gives the role LOGIN and connects the pool as it. With an external PostgreSQL the
-- DBA makes a login role a member (`CREATE ROLE hounsfield_web LOGIN PASSWORD '...' IN ROLE hounsfield_app`)
-- and serves with DATABASE_URL naming it; the owner's URL (HOUNSFIELD_DATABASE_OWNER_URL) applies migrations.
-- An owner without CREATEROLE needs `CREATE ROLE hounsfield_app NOLOGIN` done beforehand by someone who has it.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'hounsfield_app') THEN
        BEGIN
            CREATE ROLE hounsfield_app NOLOGIN;
        EXCEPTION
            WHEN duplicate_object THEN NULL;  -- made meanwhile by a migration of another database
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'role hounsfield_app does not exist and % may not create it', current_user
                    USING HINT = 'run CREATE ROLE hounsfield_app NOLOGIN as a role with CREATEROLE, then start again',
                          ERRCODE = 'insufficient_privilege';
        END;
    END IF;
END $$;

DO $$
DECLARE
    s text := current_schema();
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO hounsfield_app', s);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO hounsfield_app', s);
    EXECUTE format('GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA %I TO hounsfield_app', s);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO hounsfield_app', s);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT USAGE, SELECT ON SEQUENCES TO hounsfield_app', s);
    EXECUTE format('ALTER FUNCTION audit_append(text[]) SECURITY DEFINER SET search_path = %I, pg_temp', s);
END $$;

REVOKE ALL ON audit_log, audit_head, audit_checkpoints FROM PUBLIC, hounsfield_app;
GRANT SELECT ON audit_log, audit_head TO hounsfield_app;
GRANT SELECT, INSERT ON audit_checkpoints TO hounsfield_app;
REVOKE ALL ON FUNCTION audit_append(text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit_append(text[]) TO hounsfield_app;

-- The applied migrations: read at start (nothing pending), written only by the owner.
REVOKE ALL ON schema_migrations FROM PUBLIC, hounsfield_app;
GRANT SELECT ON schema_migrations TO hounsfield_app;
