"""Every function call resolves to an Oracle built-in or an allowlisted read-only package function; helpers that
can reveal secrets take only allowlisted arguments.

    MD5(x), my_func(x)                  -> unsafe "function MY_FUNC is not an allowed Oracle built-in ..."
    XX_PAY_PKG.RELEASE(1)               -> unsafe "package function XX_PAY_PKG.RELEASE is not on the allowlist"
    DBMS_RANDOM.VALUE (no parentheses)  -> unsafe "reference to blocked package/schema DBMS_RANDOM"
    FND_PROFILE.VALUE('GUEST_USER_PWD') -> unsafe "profile option GUEST_USER_PWD is not on allowed_profile_options"
    SYS_CONTEXT('USERENV', 'HOST')      -> unsafe "SYS_CONTEXT USERENV.HOST is not on allowed_sys_context"
Package functions written WITHOUT parentheses parse as columns: rules/references.py sends those here through
`package_call_reason`. Names are judged on the token stream as written (sqlglot turns some names into typed nodes,
e.g. MD5 or DBMS_RANDOM.VALUE -> RAND(), which in Oracle would resolve to something else) and on the AST.
"""
from sqlglot import exp
from sqlglot.tokens import TokenType

from guardrail.query import Finding, Query, func_name, glob, ident, in_hint, token_name

NAME_TOKENS = {TokenType.VAR, TokenType.IDENTIFIER}
# Words the Oracle tokenizer leaves as plain names that may precede '(' without being a function call.
NON_FUNCTION_WORDS = {"GROUP", "SAMPLE", "ROW", "ROWS", "PARTITION", "SUBPARTITION", "MEASURES", "PATTERN", "DEFINE",
                      "SEARCH", "CYCLE", "COLUMNS", "PASSING", "NESTED", "PRIOR"}
PROFILE_FUNCTIONS = {"FND_PROFILE.VALUE", "FND_PROFILE.VALUE_SPECIFIC", "FND_PROFILE.VALUE_WNPS",
                     "FND_PROFILE.DEFINED", "FND_PROFILE.SAVE_USER"}


def function_reason(name) -> str:
    return f"function {name} is not an allowed Oracle built-in or allowlisted package function"


def package_call_reason(names, policy, written=None):
    """None when PACKAGE.FUNCTION (optionally APPS.-prefixed) is allowlisted, else why not. An exact allowlist entry
    beats the blocked patterns (DBMS_LOB.SUBSTR is read-only; DBMS_LOB.* is not listed); a glob entry does not."""
    sets = policy["_sets"]
    qualified = ".".join(names)
    core = names[1:] if len(names) == 3 and names[0] in sets["package_schemas"] else names
    if len(core) == 2 and ".".join(core) in sets["exact_package_functions"]:
        return None
    blocked = [n for n in names[:-1] if glob(n, policy["blocked_package_patterns"]) or n in sets["blocked_schemas"]]
    if blocked:
        return f"call to blocked package/schema {blocked[0]} in {qualified}"
    if len(core) == 2 and glob(".".join(core), policy["allowed_package_functions"]):
        return None
    how = f" (written {written})" if written else ""
    return f"package function {qualified}{how} is not on the policy allowlist of read-only helpers " \
           "(allowed_package_functions)"


def _dot_parts(node):
    """Flatten a Dot chain (apps.fnd_profile.value(...)) into upper-case name parts and the trailing function."""
    parts = []
    while isinstance(node, exp.Dot):
        parts.insert(0, node.expression)
        node = node.this
    parts.insert(0, node)
    return [func_name(p) if isinstance(p, exp.Func) else ident(p) for p in parts], parts[-1]


def _literal_args(fn, n):
    args = list(fn.expressions)
    if len(args) < n or not all(isinstance(a, exp.Literal) and a.is_string for a in args[:n]):
        return None
    return [a.this.upper() for a in args[:n]]


def _argument_reasons(name, fn, policy) -> list:
    if name in PROFILE_FUNCTIONS:
        args = _literal_args(fn, 1)
        if args is None:
            return [f"{name} needs a literal profile option name (a bind or expression could read any option)"]
        if not glob(args[0], policy["allowed_profile_options"]):
            return [f"profile option {args[0]} is not on the policy's allowed_profile_options"]
    elif name in ("SYS_CONTEXT", "USERENV"):
        args = _literal_args(fn, 2 if name == "SYS_CONTEXT" else 1)
        if args is None:
            return [f"{name} needs literal arguments (a bind or expression could read any attribute)"]
        key = ".".join(args) if name == "SYS_CONTEXT" else f"USERENV.{args[0]}"
        if not glob(key, policy["allowed_sys_context"]):
            return [f"{name} attribute {key} is not on the policy's allowed_sys_context (host, IP, OS user and "
                    "session details are reconnaissance)"]
    return []


def check(q: Query) -> list:
    policy, out = q.policy, []
    allowed = policy["_sets"]["builtin_functions"] | NON_FUNCTION_WORDS | q.source_names
    toks = q.tokens
    for i, tok in enumerate(toks):
        if tok.token_type not in NAME_TOKENS or (i and toks[i - 1].token_type == TokenType.DOT):
            continue
        chain, j = [tok], i + 1
        while j + 1 < len(toks) and toks[j].token_type == TokenType.DOT and toks[j + 1].token_type in NAME_TOKENS:
            chain.append(toks[j + 1])
            j += 2
        names = [token_name(t) for t in chain]
        call = j < len(toks) and toks[j].token_type == TokenType.L_PAREN
        if call and len(names) == 1 and names[0] not in allowed:
            out.append(Finding("unsafe", function_reason(names[0])))
        elif len(names) > 1 and names[0] not in q.source_names and names[-1:] != ["DUAL"]:
            # a package or schema in front of '.': blocked ones are refused however the rest parses
            reason = package_call_reason(names, policy) if call else None
            if reason and reason.startswith("call to blocked"):
                out.append(Finding("unsafe", reason))
            elif not call and (glob(names[0], policy["blocked_package_patterns"])
                               or names[0] in policy["_sets"]["blocked_schemas"]) \
                    and package_call_reason(names, policy) is not None:
                out.append(Finding("unsafe", f"reference to blocked package/schema {names[0]} (line {tok.line})"))
    for node in q.tree.walk():
        if not isinstance(node, (exp.Func, exp.Dot)) or in_hint(node):
            continue
        if isinstance(node, exp.Dot) and not isinstance(node.parent, exp.Dot) and isinstance(node.expression,
                                                                                             exp.Func):
            names, fn = _dot_parts(node)
            if names[0] in q.source_names:
                out.append(Finding("unsafe", f"method call {'.'.join(names)}() on a row source is not allowed"))
                continue
            reason = package_call_reason(names, policy)
            if reason:
                out.append(Finding("unsafe", reason))
            else:
                core = names[1:] if len(names) == 3 else names
                out += [Finding("unsafe", r) for r in _argument_reasons(".".join(core), fn, policy)]
        elif isinstance(node, exp.Anonymous) and not isinstance(node.parent, exp.Dot):
            name = func_name(node)
            if name not in policy["_sets"]["builtin_functions"]:
                out.append(Finding("unsafe", function_reason(name)))
            else:
                out += [Finding("unsafe", r) for r in _argument_reasons(name, node, policy)]
    return out
