-- Every change to break-glass sessions (start, close, or any other write) notifies `hounsfield_break_glass`, so
-- that each server process drops its cache of open sessions (authz/sessioncache.py) within milliseconds.
CREATE FUNCTION break_glass_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hounsfield_break_glass', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER break_glass_sessions_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON break_glass_sessions
    FOR EACH STATEMENT EXECUTE FUNCTION break_glass_notify();
