"""Query languages inside strings: XQuery/XPath given to XMLTABLE, XMLQUERY, XMLEXISTS, EXISTSNODE, EXTRACT,
EXTRACTVALUE may only navigate the XML passed in; XML built from literals may not declare a DTD or entities.

    XMLTABLE('for $i in fn:collection("oradb:/APPLSYS/FND_USER") ...')   -> unsafe (reads any table past the catalog)
    XMLTABLE('ora:view("FND_USER")')                                     -> unsafe
    XMLTYPE('<!DOCTYPE x [<!ENTITY e SYSTEM "http://...">]><x>&e;</x>')  -> unsafe (external entity fetch)
Deny by default: an XQuery string may call only the navigation functions in XQUERY_FUNCTIONS, has no URI, no
prolog (declare/import) and no document/collection access.
"""
import re

from sqlglot import exp

from guardrail.query import Finding, Query, func_name

XQUERY_HOSTS = {"XMLTABLE", "XMLQUERY", "XMLEXISTS", "EXISTSNODE", "EXTRACT", "EXTRACTVALUE", "XMLSEQUENCE",
                "XMLCAST", "XMLPATCH", "XMLDIFF", "UPDATEXML", "INSERTCHILDXML", "DELETEXML", "APPENDCHILDXML"}
XML_BUILDERS = {"XMLTYPE", "XMLPARSE", "XMLROOT", "CREATEXML", "SYS_XMLGEN"}
XQUERY_FUNCTIONS = {"text", "node", "position", "last", "string", "number", "count", "sum", "contains",
                    "starts-with", "normalize-space", "concat", "substring", "string-length", "not", "true", "false",
                    "name", "local-name", "data", "upper-case", "lower-case", "boolean", "round", "floor", "ceiling"}
_CALL = re.compile(r"([A-Za-z_][\w.-]*(?::[A-Za-z_][\w.-]*)?)\s*\(")  # on XQuery text, never on SQL
_FORBIDDEN = re.compile(r"://|\boradb\b|\bora:|\bdeclare\b|\bimport\b|\bmodule\b|\bcollection\b|\bdoc\b|"
                        r"\buri-collection\b|\bunparsed-text", re.I)


def xquery_reason(text):
    bad = _FORBIDDEN.search(text)
    if bad:
        return f"XQuery/XPath {text[:80]!r} uses {bad.group(0)!r}: only navigation of the XML passed in is allowed"
    for name in _CALL.findall(text):
        base = name.split(":", 1)[1] if name.lower().startswith("fn:") else name
        if base.lower() not in XQUERY_FUNCTIONS:
            return f"XQuery/XPath function {name}() is not allowed: only navigation functions"
    return None


def check(q: Query) -> list:
    out = []
    for node in q.tree.walk():
        if not isinstance(node, exp.Func):
            continue
        name = "XMLTABLE" if isinstance(node, exp.XMLTable) else func_name(node)
        if name in XQUERY_HOSTS:
            for lit in node.find_all(exp.Literal):
                reason = lit.is_string and xquery_reason(lit.this)
                if reason:
                    out.append(Finding("unsafe", reason))
        elif name in XML_BUILDERS:
            for part in node.find_all(exp.Literal, exp.DPipe, exp.Concat, exp.Chr, exp.Anonymous):
                if part is node or (isinstance(part, exp.Literal) and not ("<!" in part.this or "&" in part.this)):
                    continue
                out.append(Finding("unsafe", f"{name} over literal markup with a DTD/entity or built from pieces "
                                             "(||, CONCAT, CHR) is not allowed: parse XML columns, not literals"))
                break
    return out
