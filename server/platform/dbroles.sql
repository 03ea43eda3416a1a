-- Named queries about the database roles (server/dbroles.py).

-- name: serving_role
-- What the connected role could do to the audit trail beyond appending: each column true is a way to rewrite
-- it (a superuser or the tables' owner can also switch their append-only triggers off).
SELECT current_user AS role,
       r.rolsuper AS superuser,
       pg_has_role(current_user, c.relowner, 'USAGE') AS owner,
       has_table_privilege('audit_log', 'UPDATE') OR has_table_privilege('audit_log', 'DELETE')
           OR has_table_privilege('audit_log', 'TRUNCATE') OR has_table_privilege('audit_log', 'INSERT')
           OR has_table_privilege('audit_head', 'UPDATE') OR has_table_privilege('audit_head', 'DELETE')
           OR has_table_privilege('audit_head', 'TRUNCATE')
           OR has_table_privilege('audit_checkpoints', 'UPDATE')
           OR has_table_privilege('audit_checkpoints', 'DELETE')
           OR has_table_privilege('audit_checkpoints', 'TRUNCATE')
           OR has_table_privilege('audit_pending', 'UPDATE') OR has_table_privilege('audit_pending', 'DELETE')
           OR has_table_privilege('audit_pending', 'TRUNCATE') AS may_rewrite
FROM pg_roles r, pg_class c
WHERE r.rolname = current_user AND c.oid = 'audit_log'::regclass;

-- name: may_skip_triggers
-- PostgreSQL 15 and later: SET on session_replication_role can be granted (it turns triggers off).
SELECT has_parameter_privilege('session_replication_role', 'SET');

-- name: app_role_login
-- The embedded PostgreSQL: the app role may log in (over the data folder's socket only).
SELECT rolcanlogin FROM pg_roles WHERE rolname = 'hounsfield_app';

-- name: allow_app_role_login
ALTER ROLE hounsfield_app LOGIN;

-- name: embedded_socket_permissions
-- The embedded PostgreSQL trusts its socket's clients: only its own user (and root) may reach the socket
-- (server.db.SOCKET_MODE); takes effect when the cluster next starts.
ALTER SYSTEM SET unix_socket_permissions = '0700';
