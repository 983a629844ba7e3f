"""Question-time schema retrieval: question + schema file -> the `context` object every stage accepts.

The same builder serves training data (build_oracle_sft_dataset.py --retrieve), the guarded `ask`, the eval's
question-only path and the demo, so the model sees one context distribution in training and in production.

    python custom_oracle_llama/retrieve_context.py --schema demo/ebs_schema.json --question "Unpaid invoices"
    python custom_oracle_llama/retrieve_context.py --schema S --batch < questions.jsonl     # {"question": ...} a line
    python custom_oracle_llama/retrieve_context.py eval --schema S --raw raw_questions.jsonl --tokenizer MODEL_DIR

Method (every step deterministic, no network, no model):
1. rank tables with BM25 (bm25s) over one document per table: its name split on "_", its description, the
   business synonyms pointing at it, its column names and descriptions; words are lower-cased, stop words dropped
   and plurals folded ("invoices" -> "invoice"), EBS vocabulary folded (PHRASES: "purchase order" = po, ...).
   Synonym phrases found in the question force their table in.
2. keep the top tables scoring >= REL_CUTOFF x the best (at most MAX_TABLES; a bonus for the share of a table's own
   name the question says) and up to MAX_NEIGHBOURS join neighbours that also match; connect them through the join
   graph with a networkx Steiner tree (bridge tables added), computed on the few short paths between chosen tables
   so a 30k-table graph costs milliseconds.
3. columns: the keys, the join columns between chosen tables, the security-filter column, the synonym targets and
   the best matches always; then the other columns by lexical match (IDF-weighted overlap with the question), table
   rank and schema order, as many as fit --max_context_tokens, counted exactly through the tokenizer's chat template
   on the prompt the model will see (prompting.py); when not even the key columns fit, the lowest-ranked table goes.
   Without a tokenizer the count is a conservative byte estimate.
4. every join edge between chosen tables, matched synonyms, and every security filter of every chosen table.

A question that matches no table raises "no relevant tables for this question": never a whole-schema dump.
"""
import argparse
import hashlib
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "inference"))

from artifacts import StageError, library_versions, read_json  # noqa: E402
from prompting import chat_messages, template_sha256  # noqa: E402

# ---- settings (recorded by retrieval_settings(); change one and the dataset manifest says so) -----------------
DEFAULT_MAX_CONTEXT_TOKENS = 2048  # whole rendered prompt (rules + context + question), inside the 1.6k-4k RAG budget
MIN_CONTEXT_TOKENS = 256           # below this not even the rules block fits
MAX_TABLES = 5                     # ranked tables kept before bridges; EBS questions rarely need more than 4
REL_CUTOFF = 0.3                   # keep a ranked table only if it scores >= this share of the best table
NAME_WEIGHT = 1.0                  # + this x best BM25 x share of the table's name words in the question
NEIGHBOUR_CUTOFF = 0.1             # a join neighbour of a kept table joins if it scores >= this share of the best
MAX_NEIGHBOURS = 3                 # at most this many of them (the header of a line table, a parent's parent)
BRIDGE_PATHS = 3                   # candidate detours per pair of chosen tables handed to the Steiner tree
STEINER_MAX_HOPS = 3               # longest join path between two chosen tables that bridges may fill (2 bridges)
HUB_DEGREE = 40                    # tables joined to more than this many (FND_USER, HR_OPERATING_UNITS, ...) are
                                   # reached but not expanded: they connect everything and explain nothing
MATCHED_COLUMNS_PER_TABLE = 8      # lexically matched columns that are always kept (then by score under the budget)
BYTES_PER_TOKEN_ESTIMATE = 2.5     # no tokenizer: Llama-3 averages ~3.5 bytes/token on this text; 2.5 over-counts
METHOD = "bm25s tables + synonym phrases -> networkx steiner_tree (mehlhorn) bridges -> columns under token budget"

SCHEMA_KEYS = {"description", "source", "tables", "joins", "synonyms", "security_filters"}
TABLE_KEYS = {"description", "columns", "primary_key"}
COLUMN_KEYS = {"type", "description"}
FILTER_KEYS = {"column", "predicate"}
# EBS table-name words that do not say what a table holds: _ALL multi-org, _B base, _TL translated, _V/_VL views;
# X_HEADERS is the table of the X entity itself (PO_HEADERS_ALL = purchase orders, GL_JE_HEADERS = journals)
NAME_NOISE = frozenset({"all", "b", "tl", "vl", "v", "header"})
# EBS vocabulary folded to one term in schema text and questions alike (module prefixes, R12 renames, abbreviations)
PHRASES = {"purchase order": "po", "purchasing": "po", "general ledger": "gl", "journal entry": "je",
           "journal": "je", "accounts payable": "ap", "payables": "ap", "accounts receivable": "ar",
           "receivables": "ar", "receiving": "rcv", "receipt": "rcv", "vendor": "supplier", "org": "organization",
           "paid": "payment", "pay": "payment", "value": "amount", "price": "amount", "qty": "quantity",
           "amt": "amount", "num": "number", "inventory": "mtl", "material": "mtl",
           **{a: a for a in ("po", "je", "gl", "ap", "ar")},  # so that "POs" -> po
           # GL period names (JAN-24) and quarters (Q1) are periods
           **{f"{m}-\\d\\d": "period" for m in "jan feb mar apr may jun jul aug sep oct nov dec".split()},
           **{f"q{n}": "quarter" for n in "1234"}}
_PHRASE = re.compile(r"\b(" + "|".join(sorted(PHRASES, key=len, reverse=True)) + r")(e?s)?\b")
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("""a about all also an and any are as at be been by can could did do does each for from get give
have how i in into is it its list me my of on or our per please show so than that the their them there these this
those to us was we were what when where which who whose why will with would you your""".split())


# ---- text -> terms ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=1 << 16)
def fold(word: str) -> str:
    """Plural folding, enough for schema English: invoices -> invoice, entries -> entry, statuses -> status."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("sses", "shes", "ches", "xes", "uses")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _phrase_term(matched: str) -> str:
    return PHRASES.get(matched) or next(v for k, v in PHRASES.items() if re.fullmatch(k, matched))


def terms(text: str) -> list[str]:
    """Lower-case words of a question, description or identifier (VENDOR_NAME -> supplier, name), EBS vocabulary
    folded (PHRASES), stop words out."""
    return list(_terms(text))


@lru_cache(maxsize=1 << 18)  # schema text repeats a lot (every table's WHO columns, "Operating unit", ...)
def _terms(text: str) -> tuple[str, ...]:
    text = _PHRASE.sub(lambda m: _phrase_term(m.group(1)), text.lower().replace("_", " "))
    return tuple(fold(w) for w in _WORD.findall(text) if w not in _STOP)


# ---- schema file ----------------------------------------------------------------------------------------------
def _split_ref(ref: str, what: str) -> tuple[str, str | None]:
    parts = ref.strip().split(".")
    if len(parts) > 2 or not all(parts):
        raise StageError(f"{what}: '{ref}' is not TABLE or TABLE.COLUMN")
    return parts[0].upper(), (parts[1].upper() if len(parts) == 2 else None)


def validate_schema(schema, where: str = "schema") -> dict:
    """The schema with upper-case names; StageError naming the first problem (unknown key, dangling reference)."""
    if not isinstance(schema, dict):
        raise StageError(f"{where}: expected a JSON object with 'tables'")
    unknown = sorted(set(schema) - SCHEMA_KEYS)
    if unknown:
        raise StageError(f"{where}: unknown keys {unknown} (allowed: {sorted(SCHEMA_KEYS)})")
    if not isinstance(schema.get("tables"), dict) or not schema["tables"]:
        raise StageError(f"{where}: 'tables' must be a non-empty object {{TABLE: {{description, columns}}}}")
    tables = {}
    for tname, spec in schema["tables"].items():
        if not isinstance(spec, dict):
            raise StageError(f"{where}: table {tname} must be an object")
        bad = sorted(set(spec) - TABLE_KEYS)
        if bad:
            raise StageError(f"{where}: table {tname} has unknown keys {bad} (allowed: {sorted(TABLE_KEYS)})")
        if not isinstance(spec.get("columns"), dict) or not spec["columns"]:
            raise StageError(f"{where}: table {tname} needs a non-empty 'columns' object")
        cols = {}
        for cname, col in spec["columns"].items():
            if not isinstance(col, dict) or set(col) - COLUMN_KEYS:
                raise StageError(f"{where}: column {tname}.{cname} must be an object with keys {sorted(COLUMN_KEYS)}")
            if not all(isinstance(v, str) for v in col.values()):
                raise StageError(f"{where}: column {tname}.{cname}: type and description must be strings")
            cols[cname.upper()] = {"type": col.get("type", ""), "description": col.get("description", "")}
        pk = [c.upper() for c in spec.get("primary_key", [])]
        if missing := [c for c in pk if c not in cols]:
            raise StageError(f"{where}: table {tname} primary_key names missing columns {missing}")
        tables[tname.upper()] = {"description": str(spec.get("description", "")), "columns": cols,
                                 **({"primary_key": pk} if pk else {})}

    def check_ref(ref: str, what: str, need_column: bool) -> tuple[str, str | None]:
        if not isinstance(ref, str):
            raise StageError(f"{where}: {what}: expected a string, got {ref!r}")
        t, c = _split_ref(ref, f"{where}: {what}")
        if t not in tables:
            raise StageError(f"{where}: {what} names missing table {t}")
        if need_column and c is None:
            raise StageError(f"{where}: {what}: '{ref}' must be TABLE.COLUMN")
        if c is not None and c not in tables[t]["columns"]:
            raise StageError(f"{where}: {what} names missing column {t}.{c}")
        return t, c

    joins = []
    for j in schema.get("joins", []):
        sides = j.split("=") if isinstance(j, str) else []
        if len(sides) != 2:
            raise StageError(f"{where}: join {j!r} is not 'TABLE.COLUMN = TABLE.COLUMN'")
        (lt, lc), (rt, rc) = (check_ref(s, f"join '{j}'", True) for s in sides)
        if lt == rt:
            raise StageError(f"{where}: join '{j}' joins {lt} to itself")
        joins.append(f"{lt}.{lc} = {rt}.{rc}")
    synonyms = {}
    for phrase, target in (schema.get("synonyms") or {}).items():
        t, c = check_ref(target, f"synonym '{phrase}'", False)
        if not terms(phrase):
            raise StageError(f"{where}: synonym '{phrase}' has no words to match")
        synonyms[phrase] = f"{t}.{c}" if c else t
    filters = {}
    for t, f in (schema.get("security_filters") or {}).items():
        if not isinstance(f, dict) or set(f) != FILTER_KEYS:
            raise StageError(f"{where}: security filter of {t} must have exactly the keys {sorted(FILTER_KEYS)}")
        tt, c = check_ref(f"{t}.{f['column']}", f"security filter of {t}", True)
        filters[tt] = {"column": c, "predicate": f["predicate"]}
    return {"description": schema.get("description", ""),
            **({"source": schema["source"]} if "source" in schema else {}),
            "tables": tables, "joins": joins, "synonyms": synonyms, "security_filters": filters}


def load_schema(path) -> dict:
    """Read and validate a schema file (shape of demo/ebs_schema.json); StageError with a clear message."""
    if not Path(path).is_file():
        raise StageError(f"schema file {path} not found")
    return validate_schema(read_json(path), where=f"schema {path}")


def schema_sha256(schema: dict) -> str:
    """Hash of the validated schema's canonical JSON: the same schema hashes the same whatever its formatting."""
    return hashlib.sha256(json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---- index ----------------------------------------------------------------------------------------------------
@dataclass
class Index:
    schema: dict
    sha256: str
    names: list[str]                     # table names in BM25 document order
    bm25: object                         # bm25s.BM25 over one document per table
    graph: object                        # networkx.Graph of tables, one edge per joinable pair
    idf: dict[str, float]                # term -> IDF over the table documents (column scoring)
    column_terms: dict[str, dict[str, frozenset]]  # table -> column -> its terms
    name_postings: dict                  # term -> (doc indices whose name core has it, 1 / size of that name core)
    identifier_terms: frozenset          # every term of every table/column name (numbers count only if in one)
    synonym_terms: list[tuple[tuple[str, ...], str, str]]  # (phrase terms, phrase, target)
    join_columns: dict[tuple[str, str], list[tuple[str, str]]] = field(default_factory=dict)  # pair -> [(lcol, rcol)]
    # (a, b) -> [(position in the schema, join text)], one direction only so that each join is listed once
    join_lines: dict[tuple[str, str], list[tuple[int, str]]] = field(default_factory=dict)
    position: dict[str, int] = field(default_factory=dict)  # table -> its BM25 document number
    build_seconds: float = 0.0


def table_document(name: str, spec: dict, synonyms: list[str], column_terms: dict[str, tuple]) -> list[str]:
    """BM25 document of one table. The name and description count twice: they say what the table is about."""
    head = terms(name) + terms(spec["description"])
    doc = head + head + [t for s in synonyms for t in terms(s)]
    for words in column_terms.values():
        doc += words
    return doc


def name_core(table: str) -> frozenset:
    """What a table's name says it holds: AP_INVOICES_ALL -> {invoice}; the module prefix only when nothing else
    is left (PO_HEADERS_ALL -> {po})."""
    words = terms(table)
    core = frozenset(words[1:]) - NAME_NOISE if len(words) > 1 and len(words[0]) <= 3 else frozenset()
    return core or frozenset(words) - NAME_NOISE


def build_index(schema: dict) -> Index:
    """Build once per schema, reuse for every question (a validated schema: load_schema or validate_schema)."""
    import bm25s
    import networkx as nx
    import numpy as np

    t0 = time.perf_counter()
    names = sorted(schema["tables"])
    syn_by_table = {}
    for phrase, target in schema["synonyms"].items():
        syn_by_table.setdefault(target.split(".")[0], []).append(phrase)
    column_words = {n: {c: _terms(c) + _terms(col["description"]) for c, col in schema["tables"][n]["columns"].items()}
                    for n in names}
    docs = [table_document(n, schema["tables"][n], syn_by_table.get(n, []), column_words[n]) for n in names]
    bm25 = bm25s.BM25()
    bm25.index(docs, show_progress=False)
    df = {}
    for d in docs:
        for t in set(d):
            df[t] = df.get(t, 0) + 1
    n_docs = len(docs)
    idf = {t: math.log(1 + (n_docs - f + 0.5) / (f + 0.5)) for t, f in df.items()}
    graph = nx.Graph()
    graph.add_nodes_from(names)
    join_columns = {}
    join_lines = {}
    for pos, j in enumerate(schema["joins"]):
        (lt, lc), (rt, rc) = (_split_ref(s, "join") for s in j.split("="))
        join_lines.setdefault((lt, rt), []).append((pos, j))  # one direction: listed once
        join_columns.setdefault((lt, rt), []).append((lc, rc))
        join_columns.setdefault((rt, lt), []).append((rc, lc))
        graph.add_edge(lt, rt)
    for u, v in graph.edges:  # hubs cost more: a path through HR_OPERATING_UNITS is rarely the intended one
        graph[u][v]["weight"] = 1.0 + 0.25 * math.log1p(max(graph.degree(u), graph.degree(v)))
    column_terms = {n: {c: frozenset(words) for c, words in cols.items()} for n, cols in column_words.items()}
    synonym_terms = sorted(((tuple(terms(p)), p, t) for p, t in schema["synonyms"].items()), key=lambda s: s[1])
    postings = {}
    for i, n in enumerate(names):
        core = name_core(n)
        for t in core:
            postings.setdefault(t, []).append((i, 1.0 / len(core)))
    name_postings = {t: (np.array([i for i, _ in p], dtype="int64"), np.array([w for _, w in p], dtype="float32"))
                     for t, p in postings.items()}
    identifier_terms = frozenset(t for n in names for c in [n, *schema["tables"][n]["columns"]] for t in _terms(c))
    return Index(schema=schema, sha256=schema_sha256(schema), names=names, bm25=bm25, graph=graph, idf=idf,
                 column_terms=column_terms, name_postings=name_postings, identifier_terms=identifier_terms,
                 synonym_terms=synonym_terms, join_columns=join_columns, join_lines=join_lines,
                 position={n: i for i, n in enumerate(names)},
                 build_seconds=time.perf_counter() - t0)


# ---- retrieval steps (pure functions of the index and the question) ----------------------------------------------
def _contains(seq: list[str], sub: tuple[str, ...]) -> bool:
    n = len(sub)
    return any(tuple(seq[i:i + n]) == sub for i in range(len(seq) - n + 1))


def matched_synonyms(index: Index, q_terms: list[str]) -> dict[str, str]:
    return {phrase: target for sub, phrase, target in index.synonym_terms if _contains(q_terms, sub)}


def query_terms(index: Index, question: str) -> list[str]:
    """Question terms; a bare number counts only when some identifier has it (NUM_1099), never as a quantity."""
    return [t for t in terms(question) if not t.isdigit() or t in index.identifier_terms]


def table_scores(index: Index, q_terms: list[str]):
    """BM25 per table plus NAME_WEIGHT x the best BM25 x the share of the table's own name the question says:
    "invoices" points at AP_INVOICES_ALL before the many tables that merely have an INVOICE_ID column, "POs" at
    PO_HEADERS_ALL although "po" is in every PO table's text."""
    import numpy as np

    known = [t for t in dict.fromkeys(q_terms) if t in index.bm25.vocab_dict]
    if not known:
        return np.zeros(len(index.names), dtype="float32")
    scores = index.bm25.get_scores(known).astype("float32")
    bonus = NAME_WEIGHT * float(scores.max())
    for t in known:  # tables whose name has the term: + bonus / number of words in the name
        docs, shares = index.name_postings.get(t, (None, None))
        if docs is not None:
            scores[docs] += bonus * shares
    return scores


def rank_tables(index: Index, q_terms: list[str], forced: list[str]) -> list[str]:
    """Tables in rank order: synonym-forced first, then the best BM25 tables scoring >= REL_CUTOFF x the best (at
    most MAX_TABLES), then join neighbours of those scoring >= NEIGHBOUR_CUTOFF x the best (a line table's header)."""
    import numpy as np

    scores = table_scores(index, q_terms)
    chosen = list(dict.fromkeys(forced))
    best = float(scores.max()) if len(scores) else 0.0
    if best <= 0:
        return chosen
    k = min(MAX_TABLES * 4, len(scores))
    top = np.argpartition(-scores, k - 1)[:k].tolist()
    # ties broken by name so the choice never depends on numpy's partition order
    order = [i for i in sorted(top, key=lambda i: (-float(scores[i]), index.names[i]))
             if scores[i] >= REL_CUTOFF * best]
    ranked = [index.names[i] for i in order if index.names[i] not in chosen][:MAX_TABLES]
    position = index.position
    neighbours = sorted({n for t in chosen + ranked for n in index.graph.neighbors(t)} - set(chosen) - set(ranked),
                        key=lambda n: (-float(scores[position[n]]), n))
    extra = [n for n in neighbours if scores[position[n]] >= NEIGHBOUR_CUTOFF * best][:MAX_NEIGHBOURS]
    return chosen + ranked + extra


def connect_tables(index: Index, chosen: list[str], cache: dict | None = None) -> list[str]:
    """Chosen tables plus the bridge tables of a Steiner tree joining them (per connected group), bridges last.
    Only short detours count (at most STEINER_MAX_HOPS joins between two chosen tables), so the tree is computed
    on the handful of tables that lie on such paths, not on a 30k-table graph; hubs are passed through only when
    chosen."""
    import networkx as nx
    from networkx.algorithms.approximation import steiner_tree

    if len(chosen) < 2:
        return list(chosen)
    adj = index.graph.adj
    reach = {} if cache is None else cache  # terminal -> {table: (hops, previous table on the path)}
    for t in chosen:
        if t in reach:
            continue
        seen, frontier = {t: (0, None)}, [t]
        for d in range(1, STEINER_MAX_HOPS // 2 + 2):
            nxt = []
            for u in frontier:
                if u != t and len(adj[u]) > HUB_DEGREE:
                    continue
                for v in adj[u]:
                    if v not in seen:
                        seen[v] = (d, u)
                        nxt.append(v)
            frontier = nxt
        reach[t] = seen

    def path(t, v):
        out = []
        while v is not None:
            out.append(v)
            v = reach[t][v][1]
        return out

    on_paths = set(chosen)
    for i, a in enumerate(chosen):  # per pair, the BRIDGE_PATHS shortest detours, through the least-joined tables
        for b in chosen[i + 1:]:
            meets = [(reach[a][v][0] + reach[b][v][0], len(adj[v]), v) for v in reach[a].keys() & reach[b].keys()
                     if reach[a][v][0] + reach[b][v][0] <= STEINER_MAX_HOPS]
            for _, _, v in sorted(meets)[:BRIDGE_PATHS]:
                on_paths.update(path(a, v), path(b, v))
    sub = nx.Graph()
    sub.add_nodes_from(sorted(on_paths))
    sub.add_weighted_edges_from(sorted((u, v, adj[u][v]["weight"]) for u in on_paths for v in adj[u] if v in on_paths))
    bridges = set()
    for comp in nx.connected_components(sub):
        terminals = sorted(comp & set(chosen))
        if len(terminals) >= 2:
            tree = steiner_tree(sub.subgraph(comp), terminals, weight="weight", method="mehlhorn")
            bridges |= set(tree.nodes) - set(chosen)
    return list(chosen) + sorted(bridges)


def column_score(index: Index, table: str, column: str, q_set: frozenset) -> float:
    return sum(index.idf.get(t, 0.0) for t in index.column_terms[table][column] & q_set)


def _table_entry(index: Index, table: str, columns: set[str], described: set[str]) -> dict:
    """Columns in schema order; descriptions only on the required ones (keys, joins, matches): the rest are
    context, and their descriptions would cost the budget more columns."""
    spec = index.schema["tables"][table]["columns"]
    return {"name": table, "description": index.schema["tables"][table]["description"],
            "columns": [{"name": c, "type": spec[c]["type"],
                         **({"description": spec[c]["description"]}
                            if c in described and spec[c]["description"] else {})}
                        for c in spec if c in columns]}


def assemble_context(index: Index, tables: list[str], kept: dict[str, set], described: dict[str, set],
                     relevant: list[str], synonyms: dict[str, str]) -> dict:
    chosen = set(tables)
    schema = index.schema
    return {
        "tables": [_table_entry(index, t, kept[t], described[t]) for t in tables],
        "joins": [j for _, j in sorted(pj for a in tables for b in tables for pj in index.join_lines.get((a, b), []))],
        "columns": [c for c in relevant if c.split(".")[1] in kept[c.split(".")[0]]],
        "synonyms": {p: t for p, t in sorted(synonyms.items()) if t.split(".")[0] in chosen},
        "security_filters": [{"table": t, "column": schema["security_filters"][t]["column"],
                              "predicate": schema["security_filters"][t]["predicate"]}
                             for t in tables if t in schema["security_filters"]],
    }


# ---- token budget ---------------------------------------------------------------------------------------------
def load_tokenizer(path):
    """A local tokenizer directory (never a hub id: air-gapped)."""
    from transformers import AutoTokenizer
    if not Path(path).is_dir():
        raise StageError(f"tokenizer directory {path} not found")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loading failure is one clear line
        raise StageError(f"cannot load tokenizer from {path}: {str(e).splitlines()[0]}") from None


def prompt_tokens(question: str, context: dict, tokenizer=None) -> int:
    """Tokens of the user prompt exactly as the model receives it (chat template + generation prompt); without a
    tokenizer a conservative estimate from the rendered prompt's UTF-8 bytes."""
    messages = chat_messages(question, context)
    if tokenizer is None:
        return math.ceil(len(messages[0]["content"].encode()) / BYTES_PER_TOKEN_ESTIMATE) + 32
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False))


def line_tokens(index: Index, optional: list[tuple], tokenizer=None) -> list[int]:
    """Tokens of each optional column's prompt line ("  - NAME TYPE"), counted the same way as prompt_tokens."""
    return text_tokens([f"\n  - {c} {index.schema['tables'][t]['columns'][c]['type']}" for _, t, c in optional],
                       tokenizer)


def table_tokens(index: Index, tables: list[str], required: dict[str, set], tokenizer=None) -> dict[str, int]:
    """Tokens of each table's prompt block with its required columns (descriptions included): what dropping it saves."""
    spec = index.schema["tables"]
    blocks = ["".join([f"\n{t}: {spec[t]['description']}"] + [f"\n  - {c} {spec[t]['columns'][c]['type']}: "
                                                                f"{spec[t]['columns'][c]['description']}"
                                                                for c in sorted(required[t])]) for t in tables]
    return dict(zip(tables, text_tokens(blocks, tokenizer)))


def text_tokens(lines: list[str], tokenizer=None) -> list[int]:
    if tokenizer is None:
        return [math.ceil(len(line.encode()) / BYTES_PER_TOKEN_ESTIMATE) for line in lines]
    return [len(e) for e in tokenizer.backend_tokenizer.encode_batch(lines, add_special_tokens=False)]


def token_counter_name(tokenizer) -> str:
    if tokenizer is None:
        return f"estimate: utf-8 bytes / {BYTES_PER_TOKEN_ESTIMATE} + 32"
    return f"chat template of {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}"


# ---- the public entry point -------------------------------------------------------------------------------------
def column_plan(index: Index, tables: list[str], q_set: frozenset, synonyms: dict[str, str]):
    """-> (required columns per table, optional (score, table, column) in keep order, relevant TABLE.COLUMNs).
    Required: keys, join columns between chosen tables, the security column, synonym targets, the best matches."""
    schema = index.schema
    chosen = set(tables)
    required = {t: set(schema["tables"][t].get("primary_key", [])) for t in tables}
    for a in tables:
        for b in index.graph.adj[a]:
            if b in chosen:
                required[a].update(lc for lc, _ in index.join_columns[(a, b)])
    for t in tables:
        if t in schema["security_filters"]:
            required[t].add(schema["security_filters"][t]["column"])
    for target in synonyms.values():
        t, _, c = target.partition(".")
        if c and t in chosen:
            required[t].add(c)
    scored = {t: sorted(((column_score(index, t, c, q_set), c) for c in schema["tables"][t]["columns"]),
                        key=lambda sc: -sc[0]) for t in tables}
    relevant = set()
    for t in tables:
        matched = [c for s, c in scored[t] if s > 0][:MATCHED_COLUMNS_PER_TABLE]
        required[t].update(matched)
        relevant.update(f"{t}.{c}" for c in matched)
    relevant |= {v for v in synonyms.values() if "." in v and v.split(".")[0] in chosen}
    relevant = sorted(relevant, key=lambda tc: (-column_score(index, *tc.split("."), q_set), tc))
    # optional columns: better lexical match first, then the better-ranked table, then schema order
    rank = {t: i for i, t in enumerate(tables)}
    position = {t: {c: i for i, c in enumerate(schema["tables"][t]["columns"])} for t in tables}
    optional = sorted(((s, t, c) for t in tables for s, c in scored[t] if c not in required[t]),
                      key=lambda x: (-x[0], rank[x[1]], position[x[1]][x[2]]))
    return required, optional, relevant


def retrieve(index: Index, question: str, tokenizer=None, max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS) -> dict:
    """The context for one question (raw-record `context` shape). StageError on an empty question, on a question
    that matches no table, and when not even the best table's key columns fit the budget. When the chosen tables'
    key and matched columns do not fit, the lowest-ranked table goes (and its bridges with it), then columns are
    added back best-first while the exact prompt count stays within max_context_tokens."""
    if not isinstance(question, str) or not question.strip():
        raise StageError("empty question")
    if max_context_tokens < MIN_CONTEXT_TOKENS:
        raise StageError(f"max_context_tokens {max_context_tokens} < {MIN_CONTEXT_TOKENS}")
    q_terms = query_terms(index, question)
    q_set = frozenset(q_terms)
    synonyms = matched_synonyms(index, q_terms)
    ranked = rank_tables(index, q_terms, [t.split(".")[0] for t in synonyms.values()])
    if not ranked:
        raise StageError("no relevant tables for this question")
    reach = {}

    dropped_from = {}  # the last set whose key columns did not fit: its estimate and per-table block costs

    def fit(n_ranked: int) -> dict | None:
        """The context of the n_ranked best tables (+ bridges) within the budget, or None."""
        tables = connect_tables(index, ranked[:n_ranked], reach)
        if dropped_from:  # skip exact counts while the estimate says the key columns still cannot fit
            saved = sum(dropped_from["costs"].get(t, 0) for t in set(dropped_from["costs"]) - set(tables))
            if dropped_from["tokens"] - saved > max_context_tokens:
                return None
        required, optional, relevant = column_plan(index, tables, q_set, synonyms)

        def build(n_optional: int) -> dict:
            # a table with no key, join or match shows its first column
            kept = {t: set(required[t]) or {next(iter(index.schema["tables"][t]["columns"]))} for t in tables}
            for _, t, c in optional[:n_optional]:
                kept[t].add(c)
            return assemble_context(index, tables, kept, required, relevant, synonyms)

        n_full = prompt_tokens(question, full := build(len(optional)), tokenizer)
        if n_full <= max_context_tokens:
            return full
        # each optional column costs about its own prompt line: estimate, fill best-first, then confirm with exact
        # counts, stepping back by the overshoot (one or two counts instead of a binary search)
        costs = line_tokens(index, optional, tokenizer)
        total = n_full - sum(costs)  # the key and matched columns alone, estimated
        if total > max_context_tokens:
            dropped_from.update(tokens=total, costs=table_tokens(index, tables, required, tokenizer))
            return None
        n = 0
        while n < len(optional) and total + costs[n] <= max_context_tokens:
            total += costs[n]
            n += 1
        while (over := prompt_tokens(question, ctx := build(n), tokenizer) - max_context_tokens) > 0 and n > 0:
            back = 0
            while n > 0 and back < over:
                n -= 1
                back += costs[n]
        return ctx if over <= 0 else None

    for n_ranked in range(len(ranked), 0, -1):  # the lowest-ranked table goes first (with its bridges)
        if (ctx := fit(n_ranked)) is not None:
            return ctx
    raise StageError(f"not even the key columns of {ranked[0]}, the best table for this question, fit "
                     f"max_context_tokens={max_context_tokens}")


def retrieval_settings(index: Index, max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS, tokenizer=None) -> dict:
    """What a dataset manifest records so serving retrieves with exactly the same settings and schema."""
    return {"schema_sha256": index.sha256, "method": METHOD, "max_context_tokens": max_context_tokens,
            "token_counter": token_counter_name(tokenizer), "template_sha256": template_sha256(),
            "params": {"max_tables": MAX_TABLES, "rel_cutoff": REL_CUTOFF, "name_weight": NAME_WEIGHT,
                       "neighbour_cutoff": NEIGHBOUR_CUTOFF, "max_neighbours": MAX_NEIGHBOURS,
                       "steiner_max_hops": STEINER_MAX_HOPS, "bridge_paths": BRIDGE_PATHS,
                       "hub_degree": HUB_DEGREE, "matched_columns_per_table": MATCHED_COLUMNS_PER_TABLE},
            "tables": len(index.names), "versions": library_versions("bm25s", "networkx", "numpy", "jinja2")}


# ---- eval: recall against gold SQL ------------------------------------------------------------------------------
def gold_usage(sql: str, schema: dict) -> tuple[set[str], set[str]]:
    """(tables, TABLE.COLUMNs) a gold query reads, aliases and CTEs resolved by sqlglot's qualify."""
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import SqlglotError
    from sqlglot.optimizer.qualify import qualify
    from sqlglot.optimizer.scope import traverse_scope

    try:
        tree = sqlglot.parse_one(sql, read="oracle")
        ctes = {c.alias_or_name.upper() for c in tree.find_all(exp.CTE)}
        tables = {t.name.upper() for t in tree.find_all(exp.Table)} - ctes
        catalog = {t: {c: col["type"] or "VARCHAR2" for c, col in schema["tables"][t]["columns"].items()}
                   for t in tables if t in schema["tables"]}  # only what the query names: 30k tables cost seconds
        qualified = qualify(tree, schema=catalog, dialect="oracle", identify=False, validate_qualify_columns=False)
    except SqlglotError as e:
        raise StageError(f"gold SQL does not parse as Oracle: {str(e).splitlines()[0]}") from None
    columns = set()
    for scope in traverse_scope(qualified):
        for col in scope.columns:
            s = scope
            while s is not None and col.table not in s.sources:
                s = s.parent
            source = s.sources[col.table] if s is not None else None
            if isinstance(source, exp.Table):
                columns.add(f"{source.name.upper()}.{col.name.upper()}")
    return tables, columns


def _summary(rows: list[dict]) -> dict:
    if not rows:
        return {"questions": 0}
    toks = sorted(r["tokens"] for r in rows)
    return {"questions": len(rows),
            "table_recall": round(sum(r["tables_ok"] for r in rows) / len(rows), 4),
            "column_recall": round(sum(r["columns_ok"] for r in rows) / len(rows), 4),
            "tables_per_context": {"median": statistics.median(r["n_tables"] for r in rows),
                                   "max": max(r["n_tables"] for r in rows)},
            "context_tokens": {"median": statistics.median(toks), "max": toks[-1]}}


def evaluate(index: Index, records: list[dict], tokenizer=None, max_context_tokens=DEFAULT_MAX_CONTEXT_TOKENS,
             holdout_fraction: float = 0.1, seed: int = 0) -> dict:
    """Table/column recall (every gold table/column in the context) overall and per split, context sizes."""
    from dataset_records import hashed_side, split_key

    rows, latencies = [], []
    for n, rec in enumerate(records, 1):
        sql = rec.get("sql") or rec.get("sql_gold")
        if not isinstance(rec.get("question"), str) or not isinstance(sql, str):
            raise StageError(f"record {n}: needs 'question' and 'sql'")
        gold_t, gold_c = gold_usage(sql, index.schema)
        t0 = time.perf_counter()
        try:
            ctx = retrieve(index, rec["question"], tokenizer, max_context_tokens)
        except StageError as e:
            ctx, err = {"tables": []}, str(e)
        else:
            err = None
        latencies.append(time.perf_counter() - t0)
        got_t = {t["name"] for t in ctx["tables"]}
        got_c = {f"{t['name']}.{c['name']}" for t in ctx["tables"] for c in t["columns"]}
        rows.append({"id": rec.get("id", f"line-{n}"),
                     "split": rec.get("split") or hashed_side(split_key(sql), holdout_fraction, seed),
                     "tables_ok": gold_t <= got_t, "columns_ok": gold_c <= got_c, "n_tables": len(got_t),
                     "tokens": prompt_tokens(rec["question"], ctx, tokenizer) if err is None else 0,
                     "missing": sorted((gold_t - got_t) | (gold_c - got_c)), "error": err})
    lat = sorted(latencies)
    return {"overall": _summary(rows), "train": _summary([r for r in rows if r["split"] == "train"]),
            "holdout": _summary([r for r in rows if r["split"] == "holdout"]),
            "latency_ms": {"p50": round(1000 * lat[len(lat) // 2], 2),
                           "p99": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2)},
            "misses": [{k: r[k] for k in ("id", "split", "missing", "error")} for r in rows
                       if not (r["tables_ok"] and r["columns_ok"])],
            "settings": retrieval_settings(index, max_context_tokens, tokenizer)}


def read_jsonl(path) -> list[dict]:
    if not Path(path).is_file():
        raise StageError(f"{path} not found")
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise StageError(f"{path} line {n}: invalid JSON: {e.msg}") from None
    return out


# ---- scale benchmark (make bench) ------------------------------------------------------------------------------
SYNTHETIC_WORDS = """account accrual adjustment agreement allocation approval asset balance bank batch billing budget
calendar carrier category charge claim commitment contract cost credit currency customer cycle delivery demand
deposit depreciation discount dispute document employee encumbrance expense forecast freight grade hierarchy
installment interface job lease lookup lot margin meter milestone order package payroll pricing project quota rate
reconciliation region release requisition reservation resource revenue route rule salary schedule segment serial
service settlement shipment site source statement status subledger subscription tax template territory transfer
trip unit usage valuation variance warehouse wave workflow""".split()
SYNTHETIC_MODULES = "AR OE WSH CST BOM WIP PA FA CE IBY XLA ZX JTF CS OKC PN QP MSC ASO IEX".split()


def synthetic_schema(n_tables: int, base: dict, seed: int = 0) -> dict:
    """The demo schema plus n_tables - len(demo) generated EBS-like tables (module prefix, 8-40 columns with
    descriptions, 1-3 foreign keys to earlier tables with preferential attachment, so some tables become hubs):
    the demo questions then have to find their tables among n_tables."""
    import random
    rnd = random.Random(seed)
    tables = {t: {"description": s["description"], "columns": dict(s["columns"])} for t, s in base["tables"].items()}
    joins, filters = list(base["joins"]), dict(base["security_filters"])
    names = list(tables)
    by_module: dict[str, list[str]] = {}
    types = ("NUMBER", "VARCHAR2(30)", "VARCHAR2(240)", "DATE", "VARCHAR2(1)")
    while len(tables) < n_tables:
        module, words = rnd.choice(SYNTHETIC_MODULES), rnd.sample(SYNTHETIC_WORDS, 2)
        name = f"{module}_{words[0]}_{words[1]}_{len(tables)}".upper() + rnd.choice(["", "_ALL"])
        cols = {f"{words[0]}_ID".upper(): {"type": "NUMBER", "description": f"{words[0].title()} identifier"}}
        for _ in range(rnd.randint(8, 40)):
            w = rnd.sample(SYNTHETIC_WORDS, 2)
            cols[f"{w[0]}_{w[1]}".upper()] = {"type": rnd.choice(types),
                                              "description": f"{w[0].title()} {w[1]} of the {words[0]}"}
        if name.endswith("_ALL"):
            cols["ORG_ID"] = {"type": "NUMBER", "description": "Operating unit"}
            filters[name] = {"column": "ORG_ID", "predicate": "ORG_ID IN (:org_ids)"}
        # EBS modules are clusters: most keys point into the same module, some anywhere (a few tables become hubs)
        own = by_module.setdefault(module, [])
        parents = {rnd.choice(own[-300:]) if own and rnd.random() < 0.7 else rnd.choice(names)
                   for _ in range(rnd.randint(1, 3))}
        for parent in sorted(parents):
            key = next(iter(tables[parent]["columns"]))
            ref = f"{parent.split('_')[1]}_{key}"[:30]
            cols.setdefault(ref, {"type": "NUMBER", "description": f"Reference to {parent}"})
            joins.append(f"{name}.{ref} = {parent}.{key}")
        tables[name] = {"description": f"{words[0].title()} {words[1]}s of {module}", "columns": cols}
        names.append(name)
        own.append(name)
    return validate_schema({"tables": tables, "joins": joins, "synonyms": base["synonyms"],
                            "security_filters": filters})


def bench_retrieval(schema_path, raw_path, n_tables: int = 30000, tokenizer_dir=None,
                    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS) -> dict:
    """Index build time, per-question p50/p99 latency, peak RSS and recall of the demo questions on a synthetic
    n_tables schema that contains the demo tables (run it in its own process: RSS is the process's)."""
    import resource
    base = load_schema(schema_path)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    schema = synthetic_schema(n_tables, base)
    t_gen = time.perf_counter() - t0
    index = build_index(schema)
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    report = evaluate(index, read_jsonl(raw_path), tokenizer, max_context_tokens)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tables": len(schema["tables"]), "columns": sum(len(t["columns"]) for t in schema["tables"].values()),
            "joins": len(schema["joins"]), "generate_s": round(t_gen, 2),
            "index_build_s": round(index.build_seconds, 2),
            "latency_ms": report["latency_ms"], "questions": report["overall"]["questions"],
            "table_recall": report["overall"]["table_recall"], "column_recall": report["overall"]["column_recall"],
            "context_tokens": report["overall"]["context_tokens"], "peak_rss_mib": round(rss_mib),
            "rss_before_mib": round(rss0 / 1024), "token_counter": token_counter_name(tokenizer)}


# ---- CLI ------------------------------------------------------------------------------------------------------
def build_parser(eval_mode: bool) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="retrieve_context.py" + (" eval" if eval_mode else ""),
        description=("Recall of retrieved contexts against gold SQL (every table/column the gold SQL uses is in "
                     "the context), per hashed split, with context sizes, as JSON." if eval_mode else
                     "Schema context for a question: one context JSON (--question) or one per input line (--batch). "
                     "Subcommand `eval --raw FILE` measures recall."))
    ap.add_argument("--schema", required=True, help="schema JSON (shape of demo/ebs_schema.json; schema_from_fnd.py)")
    ap.add_argument("--tokenizer", help="local model/tokenizer dir: budget counted exactly through its chat template "
                                        "(without it: a conservative byte estimate)")
    ap.add_argument("--max_context_tokens", type=int, default=DEFAULT_MAX_CONTEXT_TOKENS,
                    help=f"token budget of the whole rendered prompt (default {DEFAULT_MAX_CONTEXT_TOKENS})")
    if eval_mode:
        ap.add_argument("--raw", required=True, help="raw JSONL with question + sql (the builder's input format)")
        ap.add_argument("--holdout_fraction", type=float, default=0.1, help="same as the builder's (default 0.1)")
        ap.add_argument("--seed", type=int, default=0, help="split seed, same as the builder's --seed (default 0)")
    else:
        src = ap.add_mutually_exclusive_group(required=True)
        src.add_argument("--question", help="one question; prints one context JSON")
        src.add_argument("--batch", action="store_true",
                         help='read {"question": ...} lines on stdin, write one context JSON per line')
    return ap


def main(argv=None) -> int:
    import stage_env  # offline flags and caches as `make` sets them, without overriding the user's
    stage_env.apply()
    argv = list(sys.argv[1:] if argv is None else argv)
    eval_mode = bool(argv) and argv[0] == "eval"
    args = build_parser(eval_mode).parse_args(argv[1:] if eval_mode else argv)
    try:
        if args.max_context_tokens < MIN_CONTEXT_TOKENS:
            raise StageError(f"--max_context_tokens {args.max_context_tokens} < {MIN_CONTEXT_TOKENS}")
        index = build_index(load_schema(args.schema))
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        if eval_mode:
            report = evaluate(index, read_jsonl(args.raw), tokenizer, args.max_context_tokens,
                              args.holdout_fraction, args.seed)
            print(json.dumps(report, indent=2))
            o = report["overall"]
            print(f"retrieval: {o['questions']} questions, all gold tables {o['table_recall']:.1%}, all gold columns "
                  f"{o['column_recall']:.1%}, median {o['context_tokens']['median']} / max "
                  f"{o['context_tokens']['max']} prompt tokens", file=sys.stderr)
        elif args.question is not None:
            print(json.dumps(retrieve(index, args.question, tokenizer, args.max_context_tokens), ensure_ascii=False))
        else:
            for n, line in enumerate(sys.stdin, 1):
                if not line.strip():
                    continue
                try:
                    question = json.loads(line)["question"]
                except (json.JSONDecodeError, TypeError, KeyError):
                    raise StageError(f'stdin line {n}: expected {{"question": ...}}') from None
                try:
                    ctx = retrieve(index, question, tokenizer, args.max_context_tokens)
                except StageError as e:
                    raise StageError(f"stdin line {n}: {e}") from None
                print(json.dumps(ctx, ensure_ascii=False), flush=True)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
