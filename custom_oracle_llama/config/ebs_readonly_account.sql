-- The FIRST security boundary for generated SQL: a database account that can only SELECT what the catalog lists.
-- The guardrail (second boundary) and the guarded service (third) sit in front of it; none replaces the others.
-- Run as a DBA on the EBS database (example names; adapt the role/user names and the object list to the site).
--
-- 1. The account: no CREATE SESSION privileges beyond connecting, no quota, no default role other than the read role.
CREATE USER xx_nl2sql_ro IDENTIFIED BY "change_me_from_a_vault" DEFAULT TABLESPACE users QUOTA 0 ON users
  PASSWORD EXPIRE;
GRANT CREATE SESSION TO xx_nl2sql_ro;
CREATE ROLE xx_nl2sql_read;
GRANT xx_nl2sql_read TO xx_nl2sql_ro;
ALTER USER xx_nl2sql_ro DEFAULT ROLE xx_nl2sql_read;

-- 2. SELECT on exactly the catalog's objects, never ANY privileges, never the APPS schema itself. Generate the grants
--    from the catalog the guardrail uses (one line per table), e.g. with SQL*Plus spooling:
--      SELECT 'GRANT SELECT ON ' || owner || '.' || table_name || ' TO xx_nl2sql_read;'
--        FROM all_tables WHERE (owner, table_name) IN (<the catalog's tables>);
GRANT SELECT ON ap.ap_invoices_all TO xx_nl2sql_read;
GRANT SELECT ON ap.ap_suppliers TO xx_nl2sql_read;
-- ... one GRANT per catalog table. Secret columns (FND_USER.ENCRYPTED_*): grant a view without them instead:
CREATE OR REPLACE VIEW xx_nl2sql_fnd_user_v AS
  SELECT user_id, user_name, employee_id, start_date, end_date FROM applsys.fnd_user;
GRANT SELECT ON xx_nl2sql_fnd_user_v TO xx_nl2sql_read;

-- 3. MOAC in the database too. The guardrail requires ORG_ID IN (:org_ids) on every *_ALL table and the service
--    binds the caller's org ids; the database can enforce the same independently:
--    - EBS's own MOAC-secured synonyms (AP_INVOICES, PO_HEADERS, ... without _ALL) apply the MO_GLOBAL VPD policy
--      once the session is initialised (MO_GLOBAL.INIT / FND_GLOBAL.APPS_INITIALIZE with the caller's
--      responsibility). Grant those instead of the _ALL tables where the site can initialise sessions per caller.
--    - Or a VPD policy of your own on the granted _ALL tables keyed on a session context the service sets:
--      DBMS_RLS.ADD_POLICY(object_schema => 'AP', object_name => 'AP_INVOICES_ALL', policy_name => 'XX_NL2SQL_OU',
--        function_schema => 'XX', policy_function => 'XX_NL2SQL_OU_PREDICATE', statement_types => 'SELECT');

-- 4. Limits: a profile that bounds runaway queries, and no database links or directories visible to the account.
CREATE PROFILE xx_nl2sql_prof LIMIT CPU_PER_CALL 60000 LOGICAL_READS_PER_CALL 5000000 SESSIONS_PER_USER 8
  IDLE_TIME 15;
ALTER USER xx_nl2sql_ro PROFILE xx_nl2sql_prof;
