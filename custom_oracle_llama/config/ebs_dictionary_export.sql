-- Oracle EBS data-dictionary export for schema retrieval (custom_oracle_llama/schema_from_fnd.py).
--
-- Four read-only queries, each spooled to one CSV with a header row. EBS registers its logical keys in
-- FND_PRIMARY_KEYS / FND_FOREIGN_KEYS (the database itself declares almost none) and its descriptions in
-- FND_TABLES / FND_COLUMNS; the types come from ALL_TAB_COLUMNS. Run as a read-only user that sees APPS synonyms'
-- base tables (e.g. a reporting user with SELECT on the FND dictionary and ALL_TAB_COLUMNS), with SQLcl:
--
--   sql -S user@//host:1521/EBSDB @custom_oracle_llama/config/ebs_dictionary_export.sql
--
-- then, on the air-gapped side:
--
--   python custom_oracle_llama/schema_from_fnd.py --export_dir ebs_dict --out ebs_schema.json \
--       --synonyms site_synonyms.json
--
-- Restrict to the modules you serve by editing the application list below (one place, used by every query):
-- fewer tables make a smaller, sharper index. Remove the filter to export every registered table.

SET SQLFORMAT CSV
SET FEEDBACK OFF
SET TERMOUT OFF
SET PAGESIZE 0
DEFINE apps = "'SQLAP','PO','GL','INV','AR','ONT','HR','PER','FND','CE','FA','PA','XLA','ZX','IBY','WSH','RCV'"

-- 1. tables: name and description
SPOOL ebs_dict/tables.csv
SELECT t.TABLE_NAME, a.APPLICATION_SHORT_NAME, REPLACE(REPLACE(t.DESCRIPTION, CHR(10), ' '), CHR(13), ' ') AS DESCRIPTION
  FROM APPLSYS.FND_TABLES t
  JOIN APPLSYS.FND_APPLICATION a ON a.APPLICATION_ID = t.APPLICATION_ID
 WHERE a.APPLICATION_SHORT_NAME IN (&apps)
 ORDER BY t.TABLE_NAME;
SPOOL OFF

-- 2. columns: database type (ALL_TAB_COLUMNS) and registered description (FND_COLUMNS), in column order
SPOOL ebs_dict/columns.csv
SELECT c.TABLE_NAME, c.COLUMN_NAME,
       CASE WHEN c.DATA_TYPE IN ('VARCHAR2', 'NVARCHAR2', 'CHAR', 'NCHAR') THEN c.DATA_TYPE || '(' || c.CHAR_LENGTH || ')'
            WHEN c.DATA_TYPE = 'NUMBER' AND c.DATA_PRECISION IS NOT NULL
                 THEN 'NUMBER(' || c.DATA_PRECISION || NVL2(NULLIF(c.DATA_SCALE, 0), ',' || c.DATA_SCALE, '') || ')'
            ELSE c.DATA_TYPE END AS DATA_TYPE,
       REPLACE(REPLACE(fc.DESCRIPTION, CHR(10), ' '), CHR(13), ' ') AS DESCRIPTION,
       c.COLUMN_ID
  FROM ALL_TAB_COLUMNS c
  JOIN APPLSYS.FND_TABLES t ON t.TABLE_NAME = c.TABLE_NAME
  JOIN APPLSYS.FND_APPLICATION a ON a.APPLICATION_ID = t.APPLICATION_ID
  JOIN FND_ORACLE_USERID o ON o.ORACLE_USERNAME = c.OWNER
  LEFT JOIN APPLSYS.FND_COLUMNS fc
         ON fc.APPLICATION_ID = t.APPLICATION_ID AND fc.TABLE_ID = t.TABLE_ID AND fc.COLUMN_NAME = c.COLUMN_NAME
 WHERE a.APPLICATION_SHORT_NAME IN (&apps)
 ORDER BY c.TABLE_NAME, c.COLUMN_ID;
SPOOL OFF

-- 3. primary keys registered in FND (one row per key column)
SPOOL ebs_dict/primary_keys.csv
SELECT t.TABLE_NAME, k.PRIMARY_KEY_NAME AS KEY_NAME, k.PRIMARY_KEY_TYPE AS KEY_TYPE, c.COLUMN_NAME,
       kc.PRIMARY_KEY_SEQUENCE AS KEY_SEQUENCE
  FROM APPLSYS.FND_PRIMARY_KEYS k
  JOIN APPLSYS.FND_PRIMARY_KEY_COLUMNS kc
    ON kc.APPLICATION_ID = k.APPLICATION_ID AND kc.TABLE_ID = k.TABLE_ID AND kc.PRIMARY_KEY_ID = k.PRIMARY_KEY_ID
  JOIN APPLSYS.FND_TABLES t ON t.APPLICATION_ID = k.APPLICATION_ID AND t.TABLE_ID = k.TABLE_ID
  JOIN APPLSYS.FND_COLUMNS c
    ON c.APPLICATION_ID = kc.APPLICATION_ID AND c.TABLE_ID = kc.TABLE_ID AND c.COLUMN_ID = kc.COLUMN_ID
  JOIN APPLSYS.FND_APPLICATION a ON a.APPLICATION_ID = t.APPLICATION_ID
 WHERE a.APPLICATION_SHORT_NAME IN (&apps)
 ORDER BY t.TABLE_NAME, k.PRIMARY_KEY_NAME, kc.PRIMARY_KEY_SEQUENCE;
SPOOL OFF

-- 4. foreign keys registered in FND: each foreign-key column paired with the referenced key column of the same
--    sequence number (composite keys give one row per column pair)
SPOOL ebs_dict/foreign_keys.csv
SELECT t.TABLE_NAME, fk.FOREIGN_KEY_NAME, c.COLUMN_NAME, rt.TABLE_NAME AS REF_TABLE_NAME,
       rc.COLUMN_NAME AS REF_COLUMN_NAME, fkc.FOREIGN_KEY_SEQUENCE AS KEY_SEQUENCE
  FROM APPLSYS.FND_FOREIGN_KEYS fk
  JOIN APPLSYS.FND_FOREIGN_KEY_COLUMNS fkc
    ON fkc.APPLICATION_ID = fk.APPLICATION_ID AND fkc.TABLE_ID = fk.TABLE_ID AND fkc.FOREIGN_KEY_ID = fk.FOREIGN_KEY_ID
  JOIN APPLSYS.FND_TABLES t ON t.APPLICATION_ID = fk.APPLICATION_ID AND t.TABLE_ID = fk.TABLE_ID
  JOIN APPLSYS.FND_COLUMNS c
    ON c.APPLICATION_ID = fkc.APPLICATION_ID AND c.TABLE_ID = fkc.TABLE_ID AND c.COLUMN_ID = fkc.COLUMN_ID
  JOIN APPLSYS.FND_PRIMARY_KEY_COLUMNS pkc
    ON pkc.APPLICATION_ID = fk.PRIMARY_KEY_APPLICATION_ID AND pkc.TABLE_ID = fk.PRIMARY_KEY_TABLE_ID
   AND pkc.PRIMARY_KEY_ID = fk.PRIMARY_KEY_ID AND pkc.PRIMARY_KEY_SEQUENCE = fkc.FOREIGN_KEY_SEQUENCE
  JOIN APPLSYS.FND_TABLES rt ON rt.APPLICATION_ID = pkc.APPLICATION_ID AND rt.TABLE_ID = pkc.TABLE_ID
  JOIN APPLSYS.FND_COLUMNS rc
    ON rc.APPLICATION_ID = pkc.APPLICATION_ID AND rc.TABLE_ID = pkc.TABLE_ID AND rc.COLUMN_ID = pkc.COLUMN_ID
  JOIN APPLSYS.FND_APPLICATION a ON a.APPLICATION_ID = t.APPLICATION_ID
 WHERE a.APPLICATION_SHORT_NAME IN (&apps)
 ORDER BY t.TABLE_NAME, fk.FOREIGN_KEY_NAME, fkc.FOREIGN_KEY_SEQUENCE;
SPOOL OFF
EXIT
