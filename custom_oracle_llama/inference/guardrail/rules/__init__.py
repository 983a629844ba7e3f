"""The guardrail's rules, in the order they run: each module has `check(q: Query) -> list[Finding]`."""
from guardrail.rules import (blocked_objects, embedded_languages, functions, read_only, references,
                             security_filters)

# Read-only first (what the query does), then what it names, then what it may see.
RULES = (
    read_only,           # FOR UPDATE, SELECT INTO, db links, sequences, flashback, hints
    functions,           # every call is a built-in or an allowlisted package function; secret-revealing arguments
    embedded_languages,  # XQuery / XML strings that would read past the catalog or fetch external entities
    blocked_objects,     # blocked schemas, dictionary views, secret columns (also through *)
    references,          # every table/column/qualified name resolves (catalog, CTEs, aliases, packages)
    security_filters,    # MOAC/RLS filters required by the policy and the context
)
