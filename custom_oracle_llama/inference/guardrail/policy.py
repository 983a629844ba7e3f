"""Load and validate guardrail_policy.yaml. Unknown keys and wrong types are errors: a typo must not disable a rule."""
from pathlib import Path

from artifacts import StageError, read_yaml_mapping

POLICY_PATH = Path(__file__).resolve().parent.parent / "guardrail_policy.yaml"

# key -> default; list defaults are lists of names (upper-cased on load, shell globs allowed where documented).
DEFAULTS = {
    "version": 1, "max_sql_chars": 20000, "allow_optimizer_hints": False, "allow_flashback": False,
    "package_schemas": [], "allowed_package_functions": {}, "blocked_package_patterns": [], "blocked_schemas": [],
    "blocked_table_patterns": [], "blocked_columns": [], "pseudo_columns": [], "builtin_functions": [],
    "allowed_profile_options": [], "allowed_sys_context": [], "required_filters": [],
}
_BOOLS = ("allow_optimizer_hints", "allow_flashback")
_REQUIRED_FILTER_KEYS = {"tables", "column", "predicate"}


def _names(path, key, value) -> list:
    if not isinstance(value, list) or not all(isinstance(x, str) and x.strip() for x in value):
        raise StageError(f"policy {path}: {key} must be a list of names (strings)")
    return [x.strip().upper() for x in value]


def load_policy(path=None) -> dict:
    """Policy YAML -> dict: name lists upper-cased, `_sets` for fast membership, `allowed_package_functions` as
    {NAME or GLOB: reason}, `required_filters` as [{tables: [globs], column, predicate}]."""
    path = Path(path) if path else POLICY_PATH
    raw = read_yaml_mapping(path, "policy", DEFAULTS)
    policy = {**DEFAULTS, **raw}
    for key, default in DEFAULTS.items():
        if isinstance(default, list) and key != "required_filters":
            policy[key] = _names(path, key, policy[key])
    for key in _BOOLS:
        if not isinstance(policy[key], bool):
            raise StageError(f"policy {path}: {key} must be true or false")
    if not isinstance(policy["max_sql_chars"], int) or isinstance(policy["max_sql_chars"], bool) \
            or policy["max_sql_chars"] <= 0:
        raise StageError(f"policy {path}: max_sql_chars must be a positive integer")
    funcs = policy["allowed_package_functions"]
    if isinstance(funcs, list):  # the v1 form: a plain list of names
        funcs = {name: "" for name in _names(path, "allowed_package_functions", funcs)}
    if not isinstance(funcs, dict) or not all(isinstance(k, str) and "." in k and isinstance(v, (str, type(None)))
                                              for k, v in funcs.items()):
        raise StageError(f"policy {path}: allowed_package_functions must map PACKAGE.FUNCTION (globs allowed) to "
                         "a one-line reason")
    policy["allowed_package_functions"] = {k.strip().upper(): (v or "").strip() for k, v in funcs.items()}
    filters = policy["required_filters"]
    if not isinstance(filters, list):
        raise StageError(f"policy {path}: required_filters must be a list of {{tables, column, predicate}}")
    checked = []
    for i, f in enumerate(filters, 1):
        if not isinstance(f, dict) or set(f) != _REQUIRED_FILTER_KEYS or not isinstance(f["column"], str) \
                or not isinstance(f["predicate"], str):
            raise StageError(f"policy {path}: required_filters[{i}] must have exactly tables (list of globs), "
                             "column and predicate")
        checked.append({"tables": _names(path, f"required_filters[{i}].tables", f["tables"]),
                        "column": f["column"].strip().upper(), "predicate": f["predicate"].strip()})
    policy["required_filters"] = checked
    if checked:
        from guardrail.rules.security_filters import predicate_key  # validates each predicate once, here
        for f in checked:
            predicate_key(f["predicate"])
    exact = {k for k in policy["allowed_package_functions"] if not any(c in k for c in "*?[")}
    policy["_sets"] = {k: frozenset(policy[k]) for k in (
        "package_schemas", "blocked_schemas", "blocked_columns", "pseudo_columns", "builtin_functions")}
    policy["_sets"]["exact_package_functions"] = frozenset(exact)
    policy["_path"] = str(path)
    return policy


_DEFAULT = None


def default_policy() -> dict:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_policy()
    return _DEFAULT
