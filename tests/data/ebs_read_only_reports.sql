-- name: aged payables with buckets and helper status
SELECT aps.vendor_name, ai.invoice_num, ai.invoice_date, ai.invoice_amount - NVL(ai.amount_paid, 0) AS open_amount,
       CASE WHEN TRUNC(SYSDATE) - ps.due_date <= 30 THEN '0-30' WHEN TRUNC(SYSDATE) - ps.due_date <= 60 THEN '31-60'
            ELSE '60+' END AS bucket,
       apps.ap_invoices_pkg.get_approval_status(ai.invoice_id, ai.invoice_amount, ai.payment_status_flag,
                                                ai.invoice_type_lookup_code) AS approval
  FROM ap_invoices_all ai, ap_suppliers aps, ap_payment_schedules_all ps
 WHERE ai.vendor_id = aps.vendor_id AND ps.invoice_id = ai.invoice_id AND ps.org_id = ai.org_id
   AND ai.org_id IN (:org_ids) AND ai.cancelled_date IS NULL AND ps.amount_remaining <> 0
 ORDER BY bucket, open_amount DESC NULLS LAST

-- name: invoices on hold with listagg overflow
SELECT ai.invoice_num, LISTAGG(h.hold_lookup_code, ', ' ON OVERFLOW TRUNCATE '...' WITH COUNT)
         WITHIN GROUP (ORDER BY h.hold_date) AS holds
  FROM ap_invoices_all ai JOIN ap_holds_all h ON h.invoice_id = ai.invoice_id AND h.org_id IN (:org_ids)
 WHERE ai.org_id IN (:org_ids) AND h.release_lookup_code IS NULL
 GROUP BY ai.invoice_num

-- name: monthly payments with rollup and grouping
SELECT TO_CHAR(TRUNC(c.check_date, 'MM'), 'YYYY-MM') AS month, c.currency_code,
       DECODE(GROUPING(c.currency_code), 1, 'ALL', c.currency_code) AS label, SUM(c.amount) AS paid
  FROM ap_checks_all c
 WHERE c.org_id IN (:org_ids) AND c.void_date IS NULL AND c.check_date >= ADD_MONTHS(TRUNC(SYSDATE, 'YYYY'), -12)
 GROUP BY ROLLUP (TRUNC(c.check_date, 'MM'), c.currency_code)

-- name: grouping sets and cube
SELECT vendor_id, invoice_currency_code, COUNT(*) AS n, GROUPING_ID(vendor_id, invoice_currency_code) AS gid
  FROM ap_invoices_all WHERE org_id IN (:org_ids)
 GROUP BY GROUPING SETS ((vendor_id), (invoice_currency_code), ())

-- name: twelve month row generator from dual
SELECT ADD_MONTHS(TRUNC(SYSDATE, 'MM'), -LEVEL + 1) AS month_start FROM dual CONNECT BY LEVEL <= 12

-- name: top suppliers with fetch first and offset
SELECT aps.vendor_name, SUM(ai.invoice_amount) AS total
  FROM ap_invoices_all ai JOIN ap_suppliers aps ON aps.vendor_id = ai.vendor_id
 WHERE ai.org_id IN (:org_ids) AND ai.invoice_date BETWEEN TO_DATE(:p_from, 'YYYY/MM/DD HH24:MI:SS')
                                                     AND TO_DATE(:p_to, 'YYYY/MM/DD HH24:MI:SS')
 GROUP BY aps.vendor_name ORDER BY total DESC OFFSET 5 ROWS FETCH NEXT 10 ROWS ONLY

-- name: analytics lead lag first_value ignore nulls
SELECT invoice_num, invoice_date, LAG(invoice_amount, 1, 0) OVER (PARTITION BY vendor_id ORDER BY invoice_date) AS prev,
       LEAD(invoice_date) OVER (PARTITION BY vendor_id ORDER BY invoice_date) AS next_date,
       FIRST_VALUE(gl_date IGNORE NULLS) OVER (PARTITION BY vendor_id ORDER BY invoice_date
                                               ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS first_gl,
       DENSE_RANK() OVER (ORDER BY invoice_amount DESC) AS rk, ROW_NUMBER() OVER (ORDER BY invoice_id) AS rn
  FROM ap_invoices_all WHERE org_id IN (:org_ids)

-- name: median and percentile
SELECT vendor_id, MEDIAN(invoice_amount) AS med, PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY invoice_amount) AS p90,
       STDDEV(invoice_amount) AS sd
  FROM ap_invoices_all WHERE org_id IN (:org_ids) GROUP BY vendor_id HAVING COUNT(*) > 3

-- name: po to receipt three-way with old outer joins
SELECT ph.segment1 AS po, pl.line_num, pll.shipment_num, pll.quantity, pll.quantity_received,
       NVL(pll.quantity_billed, 0) AS billed, rsh.receipt_num
  FROM po_headers_all ph, po_lines_all pl, po_line_locations_all pll, rcv_transactions rt, rcv_shipment_headers rsh
 WHERE pl.po_header_id = ph.po_header_id AND pll.po_line_id = pl.po_line_id AND rt.po_line_location_id(+) =
       pll.line_location_id AND rsh.shipment_header_id(+) = rt.shipment_header_id AND rt.transaction_type(+) = 'RECEIVE'
   AND ph.org_id IN (:org_ids) AND pl.org_id = ph.org_id AND pll.org_id = ph.org_id

-- name: po status helper and approved within period
SELECT ph.segment1, apps.po_headers_sv3.get_po_status(ph.po_header_id) AS status, ph.approved_date
  FROM po_headers_all ph
 WHERE ph.org_id IN (:org_ids) AND ph.approved_date >= NUMTODSINTERVAL(30, 'DAY') * -1 + SYSDATE
   AND ph.authorization_status = 'APPROVED' AND NVL(ph.cancel_flag, 'N') = 'N'

-- name: gl balances by account description helper
SELECT gcc.segment1 || '.' || gcc.segment2 || '.' || gcc.segment3 AS account,
       gl_flexfields_pkg.get_description_sql(gcc.chart_of_accounts_id, 3, gcc.segment3) AS account_desc,
       SUM(NVL(jl.accounted_dr, 0) - NVL(jl.accounted_cr, 0)) AS net
  FROM gl_je_lines jl JOIN gl_code_combinations gcc ON gcc.code_combination_id = jl.code_combination_id
  JOIN gl_ledgers led ON led.ledger_id = jl.ledger_id
 WHERE jl.period_name = :p_period AND led.ledger_id = fnd_profile.value('GL_SET_OF_BKS_ID')
 GROUP BY gcc.segment1, gcc.segment2, gcc.segment3, gcc.chart_of_accounts_id

-- name: journal sources with case and regexp
SELECT jh.je_source, jh.je_category, REGEXP_SUBSTR(jh.name, '[^ ]+', 1, 1) AS first_word,
       CASE WHEN jh.running_total_dr = jh.running_total_cr THEN 'BALANCED' ELSE 'OUT' END AS state
  FROM gl_je_headers jh
 WHERE jh.status = 'P' AND EXTRACT(YEAR FROM jh.default_effective_date) = EXTRACT(YEAR FROM SYSDATE)

-- name: periods of the current year
SELECT period_name, start_date, end_date, quarter_num FROM gl_periods
 WHERE period_set_name = (SELECT period_set_name FROM gl_ledgers WHERE ledger_id = :p_ledger_id)
   AND period_year = TO_NUMBER(TO_CHAR(SYSDATE, 'YYYY')) AND adjustment_period_flag = 'N'
 ORDER BY period_num

-- name: onhand with items and uom conversion helper
SELECT msi.segment1 AS item, mp.organization_code, SUM(moq.primary_transaction_quantity) AS onhand,
       inv_convert.inv_um_convert(msi.inventory_item_id, 5, SUM(moq.primary_transaction_quantity),
                                  msi.primary_uom_code, 'EA', NULL, NULL) AS onhand_ea
  FROM mtl_onhand_quantities_detail moq
  JOIN mtl_system_items_b msi ON msi.inventory_item_id = moq.inventory_item_id
                             AND msi.organization_id = moq.organization_id
  JOIN mtl_parameters mp ON mp.organization_id = moq.organization_id
 GROUP BY msi.segment1, mp.organization_code, msi.inventory_item_id, msi.primary_uom_code

-- name: material transactions with interval and trunc
SELECT mmt.transaction_id, mmt.transaction_date, ROUND(mmt.actual_cost * mmt.primary_quantity, 2) AS value
  FROM mtl_material_transactions mmt
 WHERE mmt.transaction_date > SYSTIMESTAMP - INTERVAL '7' DAY AND mmt.organization_id = :p_org

-- name: operating units of the caller
SELECT hou.organization_id, hou.name, hou.short_code FROM hr_operating_units hou
 WHERE hou.organization_id IN (:org_ids) AND SYSDATE BETWEEN NVL(hou.date_from, SYSDATE) AND NVL(hou.date_to, SYSDATE)

-- name: suppliers without invoices minus and intersect
SELECT vendor_id FROM ap_suppliers WHERE enabled_flag = 'Y'
MINUS
SELECT vendor_id FROM ap_invoices_all WHERE org_id IN (:org_ids)
INTERSECT
SELECT vendor_id FROM ap_supplier_sites_all WHERE org_id IN (:org_ids) AND pay_site_flag = 'Y'

-- name: not in and any with subqueries
SELECT aps.vendor_name FROM ap_suppliers aps
 WHERE aps.vendor_id NOT IN (SELECT c.vendor_id FROM ap_checks_all c WHERE c.org_id IN (:org_ids)
                               AND c.vendor_id IS NOT NULL)
   AND aps.vendor_id = ANY (SELECT i.vendor_id FROM ap_invoices_all i WHERE i.org_id IN (:org_ids))

-- name: case when exists
SELECT ai.invoice_num,
       CASE WHEN EXISTS (SELECT 1 FROM ap_holds_all h WHERE h.invoice_id = ai.invoice_id AND h.org_id IN (:org_ids)
                          AND h.release_lookup_code IS NULL) THEN 'Y' ELSE 'N' END AS on_hold
  FROM ap_invoices_all ai WHERE ai.org_id IN (:org_ids)

-- name: several ctes joined, lines filtered by header org equality
WITH hdr AS (SELECT po_header_id, segment1, org_id FROM po_headers_all WHERE org_id IN (:org_ids)),
     lin AS (SELECT pl.po_header_id, SUM(pl.unit_price * pl.quantity) AS amt FROM po_lines_all pl
              WHERE pl.org_id IN (:org_ids) GROUP BY pl.po_header_id)
SELECT hdr.segment1, lin.amt FROM hdr JOIN lin ON lin.po_header_id = hdr.po_header_id ORDER BY 2 DESC

-- name: keep dense_rank first and ratio_to_report
SELECT vendor_id, MIN(invoice_num) KEEP (DENSE_RANK FIRST ORDER BY invoice_date) AS first_inv,
       RATIO_TO_REPORT(SUM(invoice_amount)) OVER () AS share
  FROM ap_invoices_all WHERE org_id IN (:org_ids) GROUP BY vendor_id

-- name: string functions
SELECT LPAD(check_number, 10, '0') AS chk, INITCAP(vendor_name) AS vendor, INSTR(bank_account_name, '-') AS pos,
       SUBSTR(bank_account_name, 1, 20) AS bank, REPLACE(TRANSLATE(vendor_name, 'ab', 'AB'), ' ', '_') AS key,
       TRIM(BOTH ' ' FROM vendor_name) AS trimmed, CHR(10) AS nl, ASCII(vendor_name) AS a
  FROM ap_checks_all WHERE org_id IN (:org_ids)

-- name: q quote and unistr literals
SELECT invoice_num FROM ap_invoices_all
 WHERE org_id IN (:org_ids) AND (description LIKE q'[%O'Brien%]' OR description = UNISTR('caf\00e9'))

-- name: pivot by currency with filtered source
SELECT * FROM (SELECT vendor_id, invoice_currency_code, invoice_amount FROM ap_invoices_all WHERE org_id IN (:org_ids))
PIVOT (SUM(invoice_amount) AS amt, COUNT(*) AS cnt FOR invoice_currency_code IN ('USD' AS usd, 'EUR' AS eur))

-- name: unpivot schedule amounts
SELECT invoice_id, kind, value FROM (SELECT invoice_id, gross_amount, amount_remaining FROM ap_payment_schedules_all
 WHERE org_id IN (:org_ids)) UNPIVOT (value FOR kind IN (gross_amount AS 'GROSS', amount_remaining AS 'REMAINING'))

-- name: hierarchy of organizations with order siblings
SELECT LPAD(' ', 2 * (LEVEL - 1)) || hou.name AS tree, SYS_CONNECT_BY_PATH(hou.short_code, '/') AS path,
       CONNECT_BY_ISLEAF AS leaf
  FROM hr_operating_units hou START WITH hou.organization_id IN (:org_ids)
CONNECT BY NOCYCLE PRIOR hou.organization_id = hou.default_legal_context_id ORDER SIBLINGS BY hou.name

-- name: scalar subqueries in select list
SELECT ph.segment1,
       (SELECT COUNT(*) FROM po_lines_all pl WHERE pl.po_header_id = ph.po_header_id AND pl.org_id IN (:org_ids)) AS lines,
       (SELECT aps.vendor_name FROM ap_suppliers aps WHERE aps.vendor_id = ph.vendor_id) AS vendor
  FROM po_headers_all ph WHERE ph.org_id IN (:org_ids)

-- name: inline view with rownum top n
SELECT * FROM (SELECT invoice_num, invoice_amount FROM ap_invoices_all WHERE org_id IN (:org_ids)
                ORDER BY invoice_amount DESC) WHERE ROWNUM <= 10

-- name: distributions to accounts with flex helper and dates
SELECT aid.invoice_id, fnd_flex_ext.get_segs('SQLGL', 'GL#', gcc.chart_of_accounts_id, gcc.code_combination_id) AS acct,
       FND_DATE.DATE_TO_CANONICAL(aid.accounting_date) AS acc_date, fnd_number.number_to_canonical(aid.amount) AS amt
  FROM ap_invoice_distributions_all aid JOIN gl_code_combinations gcc ON gcc.code_combination_id =
       aid.dist_code_combination_id
 WHERE aid.org_id IN (:org_ids) AND aid.posted_flag = 'Y'

-- name: currency conversion helper
SELECT ai.invoice_num, ai.invoice_amount,
       gl_currency_api.convert_amount(ai.invoice_currency_code, 'USD', ai.gl_date, 'Corporate', ai.invoice_amount) AS usd
  FROM ap_invoices_all ai WHERE ai.org_id IN (:org_ids) AND ai.invoice_currency_code <> 'USD'

-- name: language and user context
SELECT USERENV('LANG') AS lang, SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA') AS sch, fnd_global.user_id AS uid_,
       mo_global.get_current_org_id AS org FROM dual

-- name: quoted identifiers and mixed case
SELECT "AI"."INVOICE_NUM", "AI".Invoice_Amount FROM "AP_INVOICES_ALL" "AI" WHERE "AI"."ORG_ID" IN (:org_ids)

-- name: numeric positional binds
SELECT invoice_num FROM ap_invoices_all WHERE org_id IN (:org_ids) AND invoice_date > :1 AND vendor_id = :2

-- name: join using and natural style
SELECT invoice_id, ai.invoice_num, ail.line_number FROM ap_invoices_all ai JOIN ap_invoice_lines_all ail
 USING (invoice_id) WHERE ai.org_id IN (:org_ids) AND ail.org_id IN (:org_ids)

-- name: dbms_lob reads of a description
SELECT DBMS_LOB.GETLENGTH(TO_CLOB(description)) AS len, DBMS_LOB.SUBSTR(TO_CLOB(description), 50, 1) AS head
  FROM ap_invoices_all WHERE org_id IN (:org_ids)

-- name: dates arithmetic helpers
SELECT invoice_num, MONTHS_BETWEEN(SYSDATE, invoice_date) AS age_m, LAST_DAY(invoice_date) AS eom,
       NEXT_DAY(invoice_date, 'MONDAY') AS next_mon, TRUNC(invoice_date, 'Q') AS qtr,
       TO_CHAR(invoice_date, 'DD-MON-YYYY', 'NLS_DATE_LANGUAGE=AMERICAN') AS d
  FROM ap_invoices_all WHERE org_id IN (:org_ids)

-- name: coalesce nvl2 nullif greatest
SELECT COALESCE(ps.discount_date, ps.due_date) AS pay_by, NVL2(ps.hold_flag, 'HELD', 'FREE') AS h,
       NULLIF(ps.gross_amount, 0) AS g, GREATEST(ps.due_date, SYSDATE) AS d, LEAST(1, 2) AS l
  FROM ap_payment_schedules_all ps WHERE ps.org_id IN (:org_ids)

-- name: union all order by first branch alias
SELECT invoice_num AS doc, invoice_amount AS amt FROM ap_invoices_all WHERE org_id IN (:org_ids)
UNION ALL
SELECT TO_CHAR(check_number), amount FROM ap_checks_all WHERE org_id IN (:org_ids)
ORDER BY amt DESC, doc

-- name: comment with dml words and hint-looking comment mid query
SELECT /* DELETE FROM ap_invoices_all */ invoice_num -- + note: not a hint
  FROM ap_invoices_all WHERE org_id IN (:org_ids) -- ; DROP TABLE x

-- name: sys dual
SELECT SYSDATE, USER, TO_CHAR(SYSTIMESTAMP, 'YYYY-MM-DD"T"HH24:MI:SS.FF3') FROM sys.dual
