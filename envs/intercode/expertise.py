"""What InterCode's scripted experts know: how to reach the gold command from what the student can see, and
how to say why in terms of what it saw.

The oracle runs the gold command at once. For the student that is a guess: the table and column names of a
Spider database, or where a file lives in the sandbox, are nowhere in its inputs until it looks. A correction
it can learn from looks first the way the student can (SQL: `SHOW TABLES`, `DESCRIBE t`; Bash: `ls DIR`), then
runs the gold command, whose names the student has now seen, and submits once the last output answers the
task. Reasons name only what the student's task, observation and history show (and the action itself).

"Seen" is judged on the student's inputs as its prompt holds them: the task, the current observation, the
last steps' (clipped) outputs and the actions of earlier steps (`Earlier:`), so a table listed three steps ago
still counts through the `DESCRIBE t` that followed, while its columns, clipped away, do not.
"""

from __future__ import annotations

import posixpath
import re
import shlex

from leap_dspy.envs.expertise import Expertise
from leap_dspy.realizability import unobserved_mentions, words
from leap_dspy.types import PrivilegedState, StudentInputs

SUBMIT = "submit"


# -- the student's view --------------------------------------------------------------------------------------
def visible_steps(inputs: StudentInputs) -> list[tuple[str, str]]:
    """(action, output) of the steps whose output the student still sees, oldest first; the last one's
    output is the current observation, in full."""
    steps = []
    for line in inputs.history.splitlines():
        if line.startswith(("Start: ", "Earlier: ")) or " -> " not in line:
            continue
        action, _, output = line.partition(" -> ")
        steps.append((action.strip(), output))
    if steps:
        steps[-1] = (steps[-1][0], inputs.observation)
    return steps


def past_actions(inputs: StudentInputs) -> list[str]:
    """Every earlier action the student's inputs still name (the `Earlier:` list and the recent steps)."""
    actions: list[str] = []
    for line in inputs.history.splitlines():
        if line.startswith("Earlier: "):
            actions.extend(a.strip() for a in line.removeprefix("Earlier: ").split("; "))
    return actions + [action for action, _ in visible_steps(inputs)]


def seen_tokens(inputs: StudentInputs) -> set[str]:
    """The lower-cased words of the student's inputs, dotted and slashed names also split into their parts."""
    tokens: set[str] = set()
    for token in words("\n".join((inputs.task, inputs.observation, inputs.history))):
        tokens.add(token)
        tokens.update(t for t in re.split(r"[./]", token) if t)
    return tokens


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()).rstrip(";").lower() == " ".join(b.split()).rstrip(";").lower()


def ran_last(inputs: StudentInputs, command: str) -> bool:
    """Whether `command` was the student's last action: its history ends with `command -> <the current
    observation, clipped>` (whitespace-blind, so a command spanning lines still matches)."""
    history, command = " ".join(inputs.history.split()), " ".join(command.split())
    at = history.rfind(command + " ->")
    if not command or at < 0:
        return False
    tail = history[at + len(command) + 3 :].strip().removesuffix("...")
    return " ".join(inputs.observation.split()).startswith(tail)


def last_action(inputs: StudentInputs) -> str | None:
    steps = visible_steps(inputs)
    return steps[-1][0] if steps else None


def _gist(task: str, limit: int = 90) -> str:
    task = " ".join(task.split()).rstrip(".?!")
    return task if len(task) <= limit else task[: limit - 3].rsplit(" ", 1)[0] + "..."


def _student_contrast(inputs: StudentInputs, action: str, student: str, unseen: list[str], answered: bool) -> str:
    """Why not the student's own action, in words its inputs support ("" when there is nothing to say)."""
    if not student or _same(student, action):
        return ""
    if student.strip().lower() == SUBMIT and not answered:
        return " Submitting now would grade an output that does not answer the task yet."
    if unseen:
        return " Yours names things my inputs have not shown yet."
    return ""


def _plain(reason: str, inputs: StudentInputs, privileged: PrivilegedState, action: str,
           known: frozenset[str]) -> str:
    """`reason` without its restated task when the check would read a task's token as unseen ("ping 192"
    out of "ping 192.168.1.1"): the rest of the reason stands on its own."""
    if not unobserved_mentions(reason, inputs, privileged, action, known=known):
        return reason
    return reason.split(". ", 1)[1] if ". " in reason else reason


class _InterCodeExpertise(Expertise):
    """The shared part: the gold command comes from the level's sections (or the oracle at the top)."""

    levels = (1,)
    state_at_top = True
    vocabulary = frozenset(("command", "commands", "output", "query", "result", "results", "row", "rows", "table",
                            "tables", "column", "columns", "database", "file", "files", "folder", "directory",
                            "submit"))
    """What a reason about running commands says without having been shown it."""

    def gold(self, privileged: PrivilegedState) -> str | None:
        for key in ("gold query", "gold command"):
            body = privileged.sections.get(key)
            if isinstance(body, str) and body.strip():
                return body.strip()
        oracle = privileged.oracle_action
        return oracle if oracle and oracle != SUBMIT else None

    def answered(self, inputs: StudentInputs, privileged: PrivilegedState, gold: str) -> bool:
        """Whether the last output answers the task: the gold command was the last action, or (level 2, where
        the expected output is known) the observation is that output."""
        if ran_last(inputs, gold):
            return True
        last = last_action(inputs)
        if last is None or last.strip().lower() == SUBMIT:
            return False
        expected = privileged.sections.get("expected output", privileged.sections.get("expected result"))
        changes = privileged.sections.get("expected file changes", ["(none)"])
        return (isinstance(expected, str) and changes == ["(none)"] and expected != "(no output)"
                and _same(expected, inputs.observation.split("\nSubmitted.")[0]))

    def act(self, inputs: StudentInputs, privileged: PrivilegedState, student_action: str) -> str | None:
        gold = self.gold(privileged)
        if gold is None:
            return SUBMIT if privileged.oracle_action == SUBMIT else None
        if self.answered(inputs, privileged, gold):
            return SUBMIT
        return self.look(inputs, gold) or gold

    def explain(self, inputs: StudentInputs, privileged: PrivilegedState, action: str,
                student_action: str = "") -> str:
        """The step's own reason, then why not the student's step where its inputs say."""
        gold = self.gold(privileged) or action
        answered = self.answered(inputs, privileged, gold)
        contrast = (_student_contrast(inputs, action, student_action, self.unseen(inputs, student_action), answered)
                    or self.contrast(inputs, action, student_action))
        return self.explain_step(inputs, privileged, action, gold) + contrast

    def explain_step(self, inputs: StudentInputs, privileged: PrivilegedState, action: str, gold: str) -> str:
        raise NotImplementedError

    def contrast(self, inputs: StudentInputs, action: str, student_action: str) -> str:
        """Why not the student's command, from the task's words, where the shared contrasts had nothing."""
        return ""

    def look(self, inputs: StudentInputs, gold: str) -> str | None:
        """The exploring action to take before the gold command, or None when the student has seen enough."""
        raise NotImplementedError

    def unseen(self, inputs: StudentInputs, command: str) -> list[str]:
        """The names `command` uses that the student's inputs never showed."""
        raise NotImplementedError

    def unjustified(self, inputs: StudentInputs, privileged: PrivilegedState, action: str) -> str | None:
        """A command naming a table, column or path the student never saw: only the gold justifies it."""
        gold = self.gold(privileged) or ""
        gold_words = set(words(gold)) | {t for w in words(gold) for t in re.split(r"[./]", w) if t}
        hidden = [name for name in self.unseen(inputs, action) if set(words(name)) & gold_words]
        if hidden:
            return f"the command names {', '.join(hidden[:3])}, which the student never saw: only the gold shows it"
        return None  # programs, options and keywords are the language, not privileged facts


# -- SQL -----------------------------------------------------------------------------------------------------
_KEYWORDS = (
    "select from where join inner left right outer cross natural on as and or not in is null like between "
    "group by order having limit offset distinct union intersect except all any exists case when then else end "
    "asc desc count sum avg min max abs round length lower upper cast coalesce ifnull substr substring if "
    "date year month day now with values true false using"
)
_SQL_WORDS = frozenset(_KEYWORDS.split())
_IDENT = re.compile(r"`([^`]+)`|\b([A-Za-z_][A-Za-z0-9_]*)\b")
_STRINGS = re.compile(r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.)*\"")


def sql_names(query: str) -> tuple[list[str], dict[str, list[str]]]:
    """The tables a query reads (in order) and the columns it uses per table ("" for a column whose table
    the query does not say). Literals, keywords, functions and aliases are left out."""
    text = _STRINGS.sub(" '' ", query)
    tokens = [(m.group(1) or m.group(2), m.start(), m.end()) for m in _IDENT.finditer(text)]
    tables, aliases = _sql_tables(tokens)
    names = {t.lower() for t in tables}
    columns: dict[str, list[str]] = {}
    for i, (name, start, end) in enumerate(tokens):
        low, prev = name.lower(), tokens[i - 1][0].lower() if i else ""
        if (prev in ("from", "join", "as") or low in _SQL_WORDS or low in aliases or low in names
                or text[end:].lstrip().startswith(("(", "."))):
            continue
        owner = tokens[i - 1][0] if text[:start].rstrip().endswith(".") else ""
        columns.setdefault(aliases.get(owner.lower(), owner), []).append(name)
    if len(tables) == 1 and "" in columns:
        columns.setdefault(tables[0], []).extend(columns.pop(""))
    return tables, {t: list(dict.fromkeys(cs)) for t, cs in columns.items()}


def _sql_tables(tokens: list[tuple[str, int, int]]) -> tuple[list[str], dict[str, str]]:
    """The tables after FROM/JOIN, in order, and their aliases (lower-cased alias -> table)."""
    tables: list[str] = []
    aliases: dict[str, str] = {}
    for i, (name, _, _) in enumerate(tokens):
        if i == 0 or tokens[i - 1][0].lower() not in ("from", "join") or name.lower() in _SQL_WORDS:
            continue
        if name not in tables:
            tables.append(name)
        nxt = tokens[i + 1][0] if i + 1 < len(tokens) else ""
        alias = tokens[i + 2][0] if nxt.lower() == "as" and i + 2 < len(tokens) else nxt
        if alias and alias.lower() not in _SQL_WORDS:
            aliases[alias.lower()] = name
    return tables, aliases


def shown_names(inputs: StudentInputs) -> set[str]:
    """The names the database itself has shown: its outputs (not errors, which echo a guess) and the tables
    described. The question's prose does not count: "the visitor table" does not say whether the table is
    `visitor` or `visitors`, and a student taught to trust the prose guesses on a database it has never seen."""
    outputs = [out for _, out in visible_steps(inputs) if not out.lstrip().lower().startswith("error")]
    described = [t for a in past_actions(inputs) if (t := describe_target(a))]
    return seen_tokens(StudentInputs(task="", observation="\n".join(outputs + described), history=""))


def is_show_tables(action: str) -> bool:
    return action.strip().rstrip(";").strip().upper() == "SHOW TABLES"


def describe_target(action: str) -> str | None:
    m = re.fullmatch(r"(?i)\s*(?:describe|desc|show\s+columns\s+from)\s+`?(\w+)`?\s*;?\s*", action)
    return m.group(1) if m else None


class SQLExpertise(_InterCodeExpertise):
    """InterCode-SQL: `SHOW TABLES` while a table the gold query reads is unseen, `DESCRIBE t` for each table
    whose columns it uses are unseen (once each; again for a one-table query whose description has left the
    student's prompt), then the gold query, then `submit`.

    Levels: 1 (the gold query) and the top, 2 (also its expected rows, which let it submit after a student's
    own query that already returned them). The default stays 1: the policy needs only the gold query, and
    the expected rows would add nothing a level-1 expert lacks but that early submit. Level 0 has no gold and
    no policy: exploring without knowing the answer's shape teaches nothing.
    """

    vocabulary = _InterCodeExpertise.vocabulary | _SQL_WORDS

    def unseen(self, inputs: StudentInputs, command: str) -> list[str]:
        seen = shown_names(inputs)
        if is_show_tables(command):
            return []
        target = describe_target(command)
        if target is not None:  # looking a table up names only the table
            return [] if target.lower() in seen else [target]
        tables, columns = sql_names(command)
        names = tables + [c for cs in columns.values() for c in cs]
        return [n for n in dict.fromkeys(names) if n.lower() not in seen]

    def look(self, inputs: StudentInputs, gold: str) -> str | None:
        seen = shown_names(inputs)
        done = {a.strip().lower().rstrip(";") for a in past_actions(inputs)}
        tables, columns = sql_names(gold)
        if any(t.lower() not in seen for t in tables) and not any(is_show_tables(a) for a in done):
            return "SHOW TABLES"
        # A table described in a step the student still sees needs no second look. One whose description has
        # scrolled out of its prompt is looked up again when it is the query's only table; in a join, looking
        # again would push another table's description out, and the looks could go round until the step limit.
        in_view = {(describe_target(a) or "").lower() for a, _ in visible_steps(inputs)}
        described = {(describe_target(a) or "").lower() for a in done}
        loose = [c for c in columns.get("", []) if c.lower() not in seen]
        for table in tables:
            if table.lower() in in_view or (table.lower() in described and len(tables) > 1):
                continue
            own = [c for c in columns.get(table, []) if c.lower() not in seen]
            if own or loose:
                return f"DESCRIBE {table}"
        return None

    def explain_step(self, inputs: StudentInputs, privileged: PrivilegedState, action: str, gold: str) -> str:
        """Where the environment keeps notes, a reason first reads them ("Tables: not listed yet.", "Columns
        of pets: not described yet.", "Columns of pets include PetType."), then decides: the student copies
        that part from its notes and reads its action off it (docs/concepts.md, "Read, then decide")."""
        if action == SUBMIT:
            return "The last query ran without error and its rows are what the question asks for, so I submit."
        noted = _NOTES_START in inputs.observation
        if is_show_tables(action):
            return (("Tables: not listed yet. " if noted else "") + "I have not seen this database's tables yet, "
                    "so I list them before I write a query whose names could otherwise be wrong.")
        table = describe_target(action)
        if table:
            where = "SHOW TABLES listed it" if _listed(inputs, table) else "it is the table the question is about"
            about = _mentions(inputs.task, table)
            fresh = noted and noted_columns(inputs, table) is None
            if about:
                reason = (f"The question is about {about}, and {table} is the table for them ({where}); "
                          f"DESCRIBE {table} shows its columns' exact names before I use them.")
            else:
                reason = (f"The question needs the columns of {table} ({where}); DESCRIBE {table} shows their "
                          "exact names before I use them.")
            return (f"Columns of {table}: not described yet. " if fresh else "") + reason
        state = _noted_query_columns(inputs, action) if noted else ""
        if state:  # the notes said where the names come from
            return state + _plain(f"The question asks: {_gist(inputs.task)}. This query answers it.", inputs,
                                  privileged, action, self.vocabulary)
        return _plain(self._explain_query(inputs, action), inputs, privileged, action, self.vocabulary)

    def _explain_query(self, inputs: StudentInputs, action: str) -> str:
        """The reason for the query itself: the question, and where each name it uses was seen."""
        tables, columns = sql_names(action)
        shown = []
        for step_action, output in visible_steps(inputs):
            target = describe_target(step_action)
            output = output.split(_NOTES_START, 1)[0]  # the output itself, not the notes after it
            out = set(seen_tokens(StudentInputs(task="", observation=output, history="")))
            cols = [c for cs in columns.values() for c in cs if c.lower() in out]
            listed = [t for t in tables if t.lower() in out]
            if target and cols:
                shown.append(f"DESCRIBE {target} showed {', '.join(dict.fromkeys(cols))}")
            elif is_show_tables(step_action) and listed:
                shown.append(f"SHOW TABLES listed {', '.join(listed)}")
        names = ", ".join(tables)
        basis = "; ".join(dict.fromkeys(shown)) if shown else f"the names it uses, from {names}, are ones I have seen"
        return f"The question asks: {_gist(inputs.task)}. {basis[0].upper() + basis[1:]}: this query answers it."


_NOTES_START = "\nTables: "
"""Where InterCode-SQL's notes begin in the student's observation (the Student puts notes on a line of their own)."""


def schema_notes(tables: list[str], columns: dict[str, list[str]]) -> list[str]:
    """The notes' lines for what the episode has shown of the schema; `noted_columns` reads them back."""
    lines = [f"{_NOTES_START.strip()} {', '.join(tables) if tables else 'not listed yet'}"]
    return lines + [f"Columns of {table}: {', '.join(names)}" for table, names in columns.items()]


def noted_columns(inputs: StudentInputs, table: str) -> list[str] | None:
    """The columns the student's notes list for `table`, or None where its notes have not described it."""
    notes = inputs.observation.split(_NOTES_START, 1)[1] if _NOTES_START in inputs.observation else ""
    match = re.search(rf"^Columns of `?{re.escape(table)}`?: (.*)$", notes, flags=re.MULTILINE | re.IGNORECASE)
    return [c.strip() for c in match.group(1).split(",")] if match else None


def _noted_query_columns(inputs: StudentInputs, query: str) -> str:
    """"Columns of t include a, b. " for each table of `query` whose columns it uses are in the notes."""
    tables, columns = sql_names(query)
    said = []
    for table in tables:
        noted = {c.lower(): c for c in noted_columns(inputs, table) or []}
        used = [noted[c.lower()] for c in columns.get(table, []) + columns.get("", []) if c.lower() in noted]
        if used:
            said.append(f"Columns of {table} include {', '.join(dict.fromkeys(used))}. ")
    return "".join(said)


def _stem(word: str) -> str:
    word = word.lower()
    return word[:-3] + "y" if word.endswith("ies") else word.rstrip("s")


def _mentions(task: str, table: str) -> str:
    """The question's words that name what `table` holds ("students" for `Student`, "tv series" for
    `TV_series`), as the student can match them itself; "" when the question does not name it."""
    parts = [_stem(w) for w in re.split(r"[_\W]+", table) if len(w) > 1]
    words = re.findall(r"[A-Za-z]+", task)
    for i in range(len(words) - len(parts) + 1):
        if parts and all(_stem(words[i + k]) == part for k, part in enumerate(parts)):
            return " ".join(words[i : i + len(parts)])
    return ""


def _listed(inputs: StudentInputs, table: str) -> bool:
    for step_action, output in visible_steps(inputs):
        if is_show_tables(step_action) and table.lower() in output.lower():
            return True
    return any(is_show_tables(a) for a in past_actions(inputs))


# -- Bash ----------------------------------------------------------------------------------------------------
_SYSTEM = ("/etc", "/dev", "/bin", "/usr", "/proc", "/tmp", "/sbin", "/lib", "/var", "/sys", "/home", "/root")
_LOOKS = 4
"""At most this many listings in an episode: the step budget (10) must leave room to act and submit."""


def _tokens(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=False)
    except ValueError:
        return command.split()


def bash_paths(command: str) -> list[str]:
    """The files and directories a command names that must exist before it runs: path-like words (a slash,
    or a name with an extension), less globs, options, system paths, numbers and redirection targets."""
    out: list[str] = []
    words_ = _tokens(command)
    for i, word in enumerate(words_):
        prev = words_[i - 1] if i else ""
        if prev in (">", ">>", "2>") or word.startswith(("-", ">", "2>")) or any(c in word for c in "*?{}$;|&'\"="):
            continue
        if not re.fullmatch(r"[\w./~+-]+", word) or re.fullmatch(r"[\d.]+", word) or word in (".", "..", "/"):
            continue
        if ("/" in word or re.search(r"[A-Za-z0-9_]\.[A-Za-z]{1,5}$", word)) and not word.startswith(_SYSTEM):
            out.append(word.rstrip("/") or word)
    return list(dict.fromkeys(out))


def _absolute(path: str) -> str:
    return posixpath.normpath(path if path.startswith("/") else "/" + path)


def listing(inputs: StudentInputs, folder: str) -> set[str]:
    """The names the student saw listed in `folder` (the outputs of its visible `ls`/`find` of it)."""
    names: set[str] = set()
    for action, output in visible_steps(inputs):
        parts = _tokens(action)
        if parts and parts[0] in ("ls", "find") and folder in {_absolute(p) for p in parts[1:] if p[0] != "-"}:
            names.update(seen_tokens(StudentInputs(task="", observation=output, history="")))
    return names


def path_seen(path: str, inputs: StudentInputs) -> bool:
    """Whether the student's inputs show `path`: named whole (the task, an action), or its folder seen and
    its name in a listing of that folder."""
    shown = "\n".join((inputs.task, inputs.observation, inputs.history)).lower()
    full = _absolute(path)
    if full == "/" or full.lower() in shown or path.lower() in shown:
        return True
    parent, name = posixpath.split(full)
    return path_seen(parent, inputs) and name.lower() in listing(inputs, parent)


def nearest_seen(path: str, inputs: StudentInputs) -> str:
    """The deepest folder above `path` that the student has seen (the root at worst)."""
    parent = posixpath.dirname(_absolute(path))
    while parent != "/" and not path_seen(parent, inputs):
        parent = posixpath.dirname(parent)
    return parent


_CUES: dict[str, tuple[str, ...]] = {
    "find": ("find", "search", "files", "directories", "subdirectories", "recursive", "modified", "empty",
             "symbolic", "under"),
    "grep": ("contain", "search", "match", "string", "word", "lines with"),
    "sort": ("sort", "order", "largest", "smallest", "biggest", "alphabetical"),
    "awk": ("sum", "total", "column", "field", "less than", "greater than", "longer", "shorter"),
    "wc": ("count", "number of", "how many"),
    "head": ("first", "top", "largest", "biggest"),
    "tail": ("last",),
    "sed": ("replace", "substitute", "remove", "delete", "line"),
    "cut": ("characters", "field", "column", "extract"),
    "cat": ("contents", "display", "concatenate", "show"),
    "uniq": ("unique", "duplicate", "distinct"),
    "ls": ("list",),
    "du": ("size", "disk usage"),
    "df": ("disk", "file system"),
    "tar": ("archive", "compress", "tarball", "extract", "uncompress"),
    "gzip": ("compress", "uncompress"),
    "paste": ("side by side", "without newline", "join"),
    "rev": ("reverse", "last"),
    "tac": ("reverse", "last"),
    "tr": ("convert", "translate", "replace", "uppercase", "lowercase", "separated"),
    "echo": ("print", "string", "write"),
    "mkdir": ("create", "directory", "directories"),
    "rm": ("remove", "delete"),
    "rmdir": ("remove", "delete"),
    "cp": ("copy",),
    "mv": ("move", "rename"),
    "ln": ("link",),
    "chmod": ("permission",),
    "diff": ("differ", "difference"),
    "comm": ("compare", "common", "unique"),
    "date": ("date", "time"),
    "seq": ("numbers", "through", "sequence"),
    "md5sum": ("md5", "hash"),
    "jq": ("json",),
    "tee": ("write", "append", "save"),
    "who": ("logged in", "users", "boot"),
    "ps": ("process",),
    "env": ("environment", "variables"),
    "tree": ("tree",),
    "od": ("dump",),
    "uname": ("kernel",),
    "hostname": ("host name", "hostname"),
}


class BashExpertise(_InterCodeExpertise):
    """InterCode-Bash: where the gold command names a path the student has not seen, `find DIR -name NAME` if
    the task names the file, else `ls DIR`, DIR the deepest folder it has seen above the path (four looks at
    most), then the gold command, then `submit`.

    Levels: 1 (the gold command) and the top, 2 (also its expected output and file changes, which let it
    submit after a student's own command that printed the expected output and changes nothing). The default
    stays 1: the policy needs only the gold. Level 0 has no gold: where to look is then aimless.
    """

    vocabulary = _InterCodeExpertise.vocabulary | frozenset(
        ("instruction", "asks", "names", "calls", "folder", "finding", "listing", "shows", "path", "yours", "runs")
    ) | frozenset(word for words in _CUES.values() for word in words)
    """Also the words of its own reasons and the words that call for a program, which a reason quotes from
    the task ("directories" out of "sub-directories"): the expected output (a file's lines) may use them too."""

    def unseen(self, inputs: StudentInputs, command: str) -> list[str]:
        return [p for p in bash_paths(command) if not path_seen(p, inputs)]

    def look(self, inputs: StudentInputs, gold: str) -> str | None:
        """`find FOLDER -name NAME` where the task names the file and the student knows a folder above it (the
        folder that holds it is not the student's to guess), else `ls` of the deepest folder it has seen."""
        done = [" ".join(a.split()) for a in past_actions(inputs)]
        if sum(a.startswith(("ls", "find")) for a in done) >= _LOOKS:
            return None
        for path in bash_paths(gold):
            if path_seen(path, inputs):
                continue
            folder, name = nearest_seen(path, inputs), posixpath.basename(path)
            search = f"find {folder} -name {name}"
            named = re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", inputs.task)
            if folder != "/" and named and search not in done:
                return search
            if f"ls {folder}" not in done:
                return f"ls {folder}"
        return None

    def explain_step(self, inputs: StudentInputs, privileged: PrivilegedState, action: str, gold: str) -> str:
        if action == SUBMIT:
            return "The last command ran and its output is what the instruction asks for, so I submit."
        if action != gold and (m := re.fullmatch(r"find (\S+) -name (\S+)", action)):
            return (f"The instruction names {m.group(2)} but not the folder it is in; finding it under "
                    f"{m.group(1)} shows its path before I act on it.")
        if action != gold and re.fullmatch(r"ls \S+", action):
            folder = action.removeprefix("ls ").strip()
            return (f"The instruction works on files I have not seen yet; listing {folder} shows what is there "
                    "before I act on it.")
        return _plain(self._explain_command(inputs, action), inputs, privileged, action, self.vocabulary)

    def contrast(self, inputs: StudentInputs, action: str, student_action: str) -> str:
        """A student that runs a program no word of the instruction asks for (`find` out of habit, where the
        task is to cut characters from a string) is told so: the instruction alone shows it."""
        ours, theirs = programs(action), programs(student_action)
        if not theirs or theirs[0] in ours or theirs[0] not in _CUES or cue(inputs.task, theirs[0]):
            return ""
        return f" Yours runs {theirs[0]}, which no word of the instruction asks for."

    def _explain_command(self, inputs: StudentInputs, action: str) -> str:
        """The reason for the command itself: the instruction, the words of it that call for each program
        ("count" for wc), the paths it uses and where they were seen. The student copies the words from its
        task and reads the programs off them, instead of writing the program it saw most in training."""
        run = programs(action)
        looks = (re.fullmatch(r"(?:ls|find) (\S+)(?: -name \S+)?", a) for a in past_actions(inputs))
        listed = [m.group(1) for m in looks if m]
        paths = [p for p in bash_paths(action) if path_seen(p, inputs)]
        where = ""
        if paths and listed:
            where = f" I saw {', '.join(paths[:3])} by looking in {', '.join(dict.fromkeys(listed))}."
        elif paths:
            where = f" It names {', '.join(paths[:3])}, as the instruction does."
        called = [(word, p) for p in run if (word := cue(inputs.task, p))]
        calls = ", ".join(f'"{w}" for {p}' if i else f'"{w}" calls for {p}' for i, (w, p) in enumerate(called))
        calls = f" {calls}." if calls else ""
        return (f"The instruction asks: {_gist(inputs.task)}.{calls}{where} One command, "
                f"{' | '.join(run) or 'it'}, does that.")


"""The words of an instruction that call for each common program (and the program's own name always does):
what a reason cites so that choosing the program is a lookup in the task, not a habit."""


def programs(command: str) -> list[str]:
    """The programs a command line runs, in order, each once, with the one xargs runs ("find | xargs | md5sum");
    a variable assignment runs none (`address=$(dig ...)` runs dig)."""
    found = []
    for words_ in _simple_commands(command):
        while words_ and re.fullmatch(r"[A-Za-z_]\w*=\S*", words_[0]):
            words_ = words_[1:]
        found += words_[:1] + (_xargs_program(words_[1:]) if words_[:1] == ["xargs"] else [])
    return list(dict.fromkeys(posixpath.basename(p) for p in found if p and not p.startswith("-")))


def _simple_commands(command: str) -> list[list[str]]:
    """The words of each simple command of `command`: split at |, &&, ;, parentheses and backquotes outside
    quotes, without the file a redirection names."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars="();<>|&`")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:
        return [part.split() for part in re.split(r"\|", command)]
    out: list[list[str]] = [[]]
    redirected = False
    for token in tokens:
        if set(token) & set("<>") and set(token) <= set("<>&"):
            redirected = True
        elif set(token) <= set("|&;()`"):
            out.append([])
        elif redirected:
            redirected = False
        else:
            out[-1].append(token)
    return [words_ for words_ in out if words_]


def _xargs_program(args: list[str]) -> list[str]:
    """The program xargs runs: its first word that is neither an option nor an option's value."""
    valued = False
    for word in args:
        if not valued and not word.startswith("-"):
            return [word]
        valued = word in ("-I", "-n", "-d", "-P", "-L", "-s", "-E")
    return []


def cue(task: str, program: str) -> str:
    """The first word of `task` that calls for `program` ("" when none does), whole as the task writes it
    ("sub-directories", which a reason quoting "directories" would misquote)."""
    names = {program, program.removesuffix("sum")} - {""}
    patterns = [rf"\b{re.escape(n)}\b" for n in names]
    patterns += [rf"(?<![\w-])(?:\w+-)*{re.escape(c)}\w*" for c in _CUES.get(program, ())]
    hits = [(m.start(), m.group(0)) for p in patterns if (m := re.search(p, task, flags=re.IGNORECASE))]
    return min(hits)[1] if hits else ""
