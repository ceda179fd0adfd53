"""A CEL parser for device selectors, and the lowering of what the ``cel`` library cannot parse.

The ``common-expression-language`` library evaluates CEL but its parser refuses the optional syntax that
kube-scheduler's CEL environment (``cel.OptionalTypes()``) accepts: ``x.?f``, ``x[?k]``, ``[?e]`` and
``{?k: v}``. It also lacks ``cel.bind`` (``ext.Bindings``) and the two-variable comprehensions
(``ext.TwoVarComprehensions``). Rather than rewriting the text with patterns, this module parses the
expression with CEL's grammar into a small tree and prints it back in the subset the library parses:

* ``x.?f`` -> ``_optSelect(x, "f")``, ``x[?k]`` -> ``_optIndex(x, k)``, and every ``.f`` / ``[k]`` that
  follows in the same chain is lowered the same way (cel-go: once a qualifier is optional, the rest of the
  chain yields ``optional.none()`` instead of an error when something is missing);
* ``[a, ?b]`` -> ``[a] + _optElems(b)``; ``{"k": v, ?"o": w}`` -> ``_optMap([...keys], [...values],
  [...optional flags])``;
* ``cel.bind(v, init, body)`` -> ``[init].map(v, body)[0]`` (``init`` evaluated once, as upstream);
* ``r.all(i, v, p)`` (and ``exists``, ``exists_one``/``existsOne``, ``transformList``, ``transformMap``,
  ``transformMapEntry``) -> a one-variable comprehension over ``_pairs(r)`` binding ``i`` and ``v`` as above;
* ``l.sortBy(e, key)`` -> ``[l].map(p, _sortBy(p, p.map(e, key)))[0]``.

The same tree gives the cost estimate (:mod:`controller.allocator.celcost`), the undeclared references,
and the attributes an expression reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

from driver.errors import PartitaError

__all__ = ["CelSyntaxError", "Node", "parse", "lower", "walk"]


class CelSyntaxError(PartitaError, ValueError):
    """``str()`` names the position: ``Syntax error: <what> at 1:<col>``."""


# -- tree -------------------------------------------------------------------------------------------
@dataclass
class Node:
    kind: str                   # lit ident select index call list map unary binary cond
    value: str = ""             # literal source text, identifier, field or function name, operator
    args: list["Node"] = field(default_factory=list)
    target: "Node | None" = None
    optional: bool = False      # select/index: .? / [? ; list items and map entries: flags in ``flags``
    flags: list[bool] = field(default_factory=list)
    lit_type: str = ""          # lit: int uint double string bytes bool null
    pos: int = 0


def walk(node: Node) -> Iterator[Node]:
    yield node
    if node.target is not None:
        yield from walk(node.target)
    for a in node.args:
        yield from walk(a)


# -- tokens -----------------------------------------------------------------------------------------
_TOKEN = re.compile(r"""
    (?P<ws>\s+|//[^\n]*)
  | (?P<string>(?:[rR][bB]?|[bB][rR]?)?(?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"|'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"))
  | (?P<number>0[xX][0-9a-fA-F]+[uU]?|(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?[uU]?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\|\||&&|==|!=|<=|>=|\.\?|\[\?|[-+*/%!<>?:.,()\[\]{}])
""", re.VERBOSE | re.DOTALL)
_RESERVED = {"as", "break", "const", "continue", "else", "for", "function", "if", "import", "let", "loop",
             "package", "namespace", "return", "var", "void", "while"}


@dataclass
class _Tok:
    kind: str
    text: str
    pos: int


def _tokens(src: str) -> list[_Tok]:
    out: list[_Tok] = []
    i = 0
    while i < len(src):
        m = _TOKEN.match(src, i)
        if not m:
            raise CelSyntaxError(f"Syntax error: token recognition error at: '{src[i]}' at 1:{i + 1}")
        kind = m.lastgroup or ""
        if kind != "ws":
            text = m.group(0)
            if kind == "number" and re.fullmatch(r"\d+\.", text):   # "1." is not a CEL literal
                raise CelSyntaxError(f"Syntax error: mismatched input '{text}' at 1:{i + 1}")
            out.append(_Tok(kind, text, i))
        i = m.end()
    out.append(_Tok("eof", "", len(src)))
    return out


class _Parser:
    def __init__(self, src: str):
        self.src = src
        self.toks = _tokens(src)
        self.i = 0

    def peek(self, k: int = 0) -> _Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def accept(self, text: str) -> bool:
        if self.peek().kind == "op" and self.peek().text == text:
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            t = self.peek()
            got = "<EOF>" if t.kind == "eof" else t.text
            raise CelSyntaxError(f"Syntax error: mismatched input '{got}' expecting '{text}' at 1:{t.pos + 1}")

    def fail(self, what: str = "") -> CelSyntaxError:
        t = self.peek()
        got = "<EOF>" if t.kind == "eof" else t.text
        return CelSyntaxError(f"Syntax error: {what or 'mismatched input'} '{got}' at 1:{t.pos + 1}")

    # expr: or ('?' expr ':' expr)?
    def expr(self) -> Node:
        c = self.or_()
        if self.accept("?"):
            a = self.or_()
            self.expect(":")
            b = self.expr()
            return Node("cond", "?:", [c, a, b], pos=c.pos)
        return c

    def or_(self) -> Node:
        n = self.and_()
        while self.accept("||"):
            n = Node("binary", "||", [n, self.and_()], pos=n.pos)
        return n

    def and_(self) -> Node:
        n = self.rel()
        while self.accept("&&"):
            n = Node("binary", "&&", [n, self.rel()], pos=n.pos)
        return n

    def rel(self) -> Node:
        n = self.add()
        while True:
            t = self.peek()
            if (t.kind == "op" and t.text in ("<", "<=", ">", ">=", "==", "!=")) or (t.kind == "ident" and t.text == "in"):
                self.take()
                n = Node("binary", t.text, [n, self.add()], pos=n.pos)
            else:
                return n

    def add(self) -> Node:
        n = self.mul()
        while self.peek().kind == "op" and self.peek().text in ("+", "-"):
            op = self.take().text
            n = Node("binary", op, [n, self.mul()], pos=n.pos)
        return n

    def mul(self) -> Node:
        n = self.unary()
        while self.peek().kind == "op" and self.peek().text in ("*", "/", "%"):
            op = self.take().text
            n = Node("binary", op, [n, self.unary()], pos=n.pos)
        return n

    def unary(self) -> Node:
        t = self.peek()
        if t.kind == "op" and t.text in ("!", "-"):
            self.take()
            if t.text == "-" and self.peek().kind == "number":   # a negative literal, as CEL's parser does
                num = self.take()
                return self.member(Node("lit", "-" + num.text, lit_type=_num_type(num.text), pos=t.pos))
            return Node("unary", t.text, [self.unary()], pos=t.pos)
        return self.member(self.primary())

    def member(self, n: Node) -> Node:
        while True:
            t = self.peek()
            if t.kind == "op" and t.text in (".", ".?"):
                self.take()
                name = self.take()
                if name.kind != "ident":
                    self.i -= 1
                    raise self.fail("mismatched input")
                if t.text == "." and self.accept("("):
                    n = Node("call", name.text, self.args(")"), target=n, pos=name.pos)
                else:
                    n = Node("select", name.text, target=n, optional=t.text == ".?", pos=name.pos)
            elif t.kind == "op" and t.text in ("[", "[?"):
                self.take()
                k = self.expr()
                self.expect("]")
                n = Node("index", "[]", [k], target=n, optional=t.text == "[?", pos=t.pos)
            elif t.kind == "op" and t.text == "{" and _is_qualified_name(n):
                raise CelSyntaxError(f"message construction ({_dotted(n)}{{...}}) is not available in DRA selectors "
                                     f"at 1:{t.pos + 1}")
            else:
                return n

    def args(self, close: str) -> list[Node]:
        out: list[Node] = []
        if self.accept(close):
            return out
        while True:
            out.append(self.expr())
            if self.accept(close):
                return out
            self.expect(",")
            if self.accept(close):        # trailing comma
                return out

    def primary(self) -> Node:
        t = self.peek()
        if t.kind == "op" and t.text == ".":          # leading-dot identifier: root scope
            self.take()
            name = self.take()
            if name.kind != "ident":
                self.i -= 1
                raise self.fail()
            t = name
            if self.accept("("):
                return Node("call", name.text, self.args(")"), pos=name.pos)
            return Node("ident", name.text, pos=name.pos)
        if t.kind == "ident":
            self.take()
            if t.text in ("true", "false"):
                return Node("lit", t.text, lit_type="bool", pos=t.pos)
            if t.text == "null":
                return Node("lit", t.text, lit_type="null", pos=t.pos)
            if t.text in _RESERVED or t.text == "in":
                raise CelSyntaxError(f"Syntax error: reserved identifier: {t.text} at 1:{t.pos + 1}")
            if self.accept("("):
                return Node("call", t.text, self.args(")"), pos=t.pos)
            return Node("ident", t.text, pos=t.pos)
        if t.kind == "number":
            self.take()
            return Node("lit", t.text, lit_type=_num_type(t.text), pos=t.pos)
        if t.kind == "string":
            self.take()
            prefix = t.text[:len(t.text) - len(t.text.lstrip("rRbB"))]
            return Node("lit", t.text, lit_type="bytes" if "b" in prefix.lower() else "string", pos=t.pos)
        if t.kind == "op" and t.text == "(":
            self.take()
            n = self.expr()
            self.expect(")")
            return n
        if t.kind == "op" and t.text in ("[", "[?"):
            self.take()
            items, flags = [], []
            first_optional = t.text == "[?"
            while first_optional or not self.accept("]"):
                flags.append(first_optional or self.accept("?"))
                first_optional = False
                items.append(self.expr())
                if not self.accept(","):
                    self.expect("]")
                    break
            return Node("list", "[]", items, flags=flags, pos=t.pos)
        if t.kind == "op" and t.text == "{":
            self.take()
            items, flags = [], []
            while not self.accept("}"):
                flags.append(self.accept("?"))
                k = self.expr()
                self.expect(":")
                items += [k, self.expr()]
                if not self.accept(","):
                    self.expect("}")
                    break
            return Node("map", "{}", items, flags=flags, pos=t.pos)
        if t.kind == "eof":
            raise CelSyntaxError(f"Syntax error: mismatched input '<EOF>' at 1:{t.pos + 1}")
        raise self.fail("extraneous input" if t.kind == "op" else "mismatched input")


def _num_type(text: str) -> str:
    if text[-1] in "uU":
        return "uint"
    if text.lower().startswith(("0x", "-0x")):
        return "int"
    return "double" if any(c in text for c in ".eE") else "int"


def _is_qualified_name(n: Node) -> bool:
    return n.kind == "ident" or (n.kind == "select" and not n.optional and n.target is not None
                                 and _is_qualified_name(n.target))


def _dotted(n: Node) -> str:
    return n.value if n.kind == "ident" else f"{_dotted(n.target)}.{n.value}"  # type: ignore[arg-type]


def parse(src: str) -> Node:
    p = _Parser(src)
    if p.peek().kind == "eof":
        raise CelSyntaxError("Syntax error: mismatched input '<EOF>' at 1:1")
    n = p.expr()
    if p.peek().kind != "eof":
        raise p.fail("extraneous input")
    return n


# -- namespaced functions ----------------------------------------------------------------------------
def qualified_call_name(n: Node) -> str | None:
    """``sets.contains(...)`` parses as a member call on the identifier ``sets``; this is its dotted name
    (CEL resolves it that way when ``sets`` is not a variable)."""
    if n.kind == "call" and n.target is not None and _is_qualified_name(n.target):
        name = f"{_dotted(n.target)}.{n.value}"
        root = name.split(".", 1)[0]
        if root in NAMESPACES or name in QUALIFIED:
            return name
    return None


#: roots of namespaced function names (``sets.contains``, ``math.greatest``), never variables here
NAMESPACES = {"cel", "sets", "lists", "strings", "optional", "math", "base64", "format"}
#: namespaced functions whose root may also be a variable name (``ip.family()`` on a variable ``ip``)
QUALIFIED = {"ip.isCanonical"}


MACROS_ONE_VAR = {"all", "exists", "exists_one", "map", "filter", "sortBy"}
MACROS_TWO_VAR = {"all", "exists", "exists_one", "existsOne", "transformList", "transformMap", "transformMapEntry"}


def macro_vars(n: Node) -> list[str] | None:
    """The iteration variables when ``n`` is a comprehension macro call (or ``cel.bind``), else None."""
    if n.kind != "call":
        return None
    if qualified_call_name(n) == "cel.bind" and len(n.args) == 3 and n.args[0].kind == "ident":
        return [n.args[0].value]
    if n.target is None:
        return None
    if n.args and n.args[0].kind == "ident" and n.value in MACROS_ONE_VAR and \
            (len(n.args) == 2 or (len(n.args) == 3 and n.value == "map")):
        return [n.args[0].value]
    two = len(n.args) == 3 or (len(n.args) == 4 and n.value.startswith("transform"))
    if two and n.value in MACROS_TWO_VAR and n.args[0].kind == "ident" and n.args[1].kind == "ident":
        return [n.args[0].value, n.args[1].value]
    return None


# -- lowering ---------------------------------------------------------------------------------------
class _Lowerer:
    def __init__(self) -> None:
        self.fresh = 0

    def name(self) -> str:
        self.fresh += 1
        return f"__p{self.fresh}"

    def __call__(self, n: Node) -> str:  # noqa: C901 - one case per node kind
        k = n.kind
        if k == "lit":
            return n.value if not n.value.startswith("-") else f"({n.value})"
        if k == "ident":
            return n.value
        if k == "select":
            base = self(n.target)  # type: ignore[arg-type]
            if n.optional or _in_optional_chain(n.target):
                return f'_optSelect({base}, "{n.value}")'
            return f"({base}).{n.value}"
        if k == "index":
            base = self(n.target)  # type: ignore[arg-type]
            if n.optional or _in_optional_chain(n.target):
                return f"_optIndex({base}, {self(n.args[0])})"
            return f"({base})[{self(n.args[0])}]"
        if k == "unary":
            return f"{n.value}({self(n.args[0])})"
        if k == "binary":
            return f"({self(n.args[0])}) {n.value} ({self(n.args[1])})"
        if k == "cond":
            return f"({self(n.args[0])}) ? ({self(n.args[1])}) : ({self(n.args[2])})"
        if k == "list":
            if not any(n.flags):
                return "[" + ", ".join(self(a) for a in n.args) + "]"
            parts = [f"_optElems({self(a)})" if opt else f"[{self(a)}]" for a, opt in zip(n.args, n.flags)]
            return "(" + " + ".join(parts) + ")"
        if k == "map":
            keys, vals = n.args[0::2], n.args[1::2]
            if not any(n.flags):
                return "{" + ", ".join(f"{self(a)}: {self(b)}" for a, b in zip(keys, vals)) + "}"
            return (f"_optMap([{', '.join(self(a) for a in keys)}], [{', '.join(self(b) for b in vals)}], "
                    f"[{', '.join('true' if f else 'false' for f in n.flags)}])")
        if k == "call":
            return self.call(n)
        raise AssertionError(k)

    def call(self, n: Node) -> str:
        qualified = qualified_call_name(n)
        if qualified == "cel.bind" and macro_vars(n):
            var, init, body = n.args
            return f"[{self(init)}].map({var.value}, {self(body)})[0]"
        if qualified is not None:
            return f"{qualified}({', '.join(self(a) for a in n.args)})"
        vs = macro_vars(n)
        if vs is not None and len(vs) == 2:
            return self.two_var(n)
        if vs is not None and n.value == "sortBy":
            p = self.name()
            return f"[{self(n.target)}].map({p}, _sortBy({p}, {p}.map({vs[0]}, {self(n.args[1])})))[0]"  # type: ignore[arg-type]
        args = ", ".join(self(a) for a in n.args)
        if n.target is None:
            return f"{n.value}({args})"
        return f"({self(n.target)}).{n.value}({args})"

    def two_var(self, n: Node) -> str:
        i, v = n.args[0].value, n.args[1].value
        p = self.name()
        pairs = f"_pairs({self(n.target)})"  # type: ignore[arg-type]

        def bound(body: Node) -> str:
            return f"[{p}[0]].map({i}, [{p}[1]].map({v}, {self(body)})[0])[0]"

        name = "exists_one" if n.value == "existsOne" else n.value
        if name in ("all", "exists", "exists_one"):
            return f"{pairs}.{name}({p}, {bound(n.args[2])})"
        filtered = pairs if len(n.args) == 3 else f"{pairs}.filter({p}, {bound(n.args[2])})"
        transform = bound(n.args[-1])
        if name == "transformList":
            return f"{filtered}.map({p}, {transform})"
        if name == "transformMapEntry":
            return f"_mergeEntries({filtered}.map({p}, {transform}))"
        return f"_zipMap({filtered}.map({p}, {p}[0]), {filtered}.map({p}, {transform}))"


def _in_optional_chain(n: Node | None) -> bool:
    while n is not None and n.kind in ("select", "index"):
        if n.optional:
            return True
        n = n.target
    return False


def lower(n: Node) -> str:
    """CEL source the ``cel`` library parses, with the same meaning as the tree (see the module doc)."""
    return _Lowerer()(n)
