"""The guardrail's reason codes: one table that the guardrail, the dataset builder, the eval and the service read.

Each verdict carries `codes` (a subset of CODES, in the order the checks found them) and one `reasons` line per
problem. The eval groups codes into report CATEGORIES (the two hallucination codes count as one category); nobody
redeclares them.
"""
CODES = {
    "contract": "SQL-only contract: one query, no prose, no fences with text outside, not empty or over-long",
    "parse_error": "not valid Oracle SQL (or too deep/odd for the analysis: fails closed)",
    "unsafe": "not read-only or not allowed: DML/DDL/PL-SQL, db links, blocked packages/tables/columns, "
              "unresolved functions, flashback, XML/JSON escapes",
    "unknown_table": "table not in the catalog (hallucinated or not allowed)",
    "unknown_column": "column not in the catalog for its table, or a name that resolves to nothing",
    "security_filter": "a required MOAC/RLS filter (policy required_filters or the context's) is missing or weakened",
    "explain_error": "Oracle EXPLAIN PLAN (or the embedded mirror) refused the query",
}
# Report categories: code -> category (the eval's rates, the builder's reject summary).
CATEGORY_OF = {"contract": "contract", "parse_error": "parse_error", "unsafe": "unsafe",
               "unknown_table": "hallucination", "unknown_column": "hallucination",
               "security_filter": "security_filter", "explain_error": "explain_error"}
CATEGORIES = tuple(dict.fromkeys(CATEGORY_OF.values()))
CATEGORY_LABELS = {"contract": "SQL-only contract", "parse_error": "parse error", "unsafe": "unsafe statement",
                   "hallucination": "hallucination (table/column)", "security_filter": "security filter",
                   "explain_error": "EXPLAIN error"}


def categories_of(codes) -> list:
    """Report categories of a verdict's codes, in CATEGORIES order."""
    cats = {CATEGORY_OF[c] for c in codes if c in CATEGORY_OF}
    return [c for c in CATEGORIES if c in cats]
