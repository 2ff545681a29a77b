"""Source pre-pass: turns a Metal Shading Language file into C++ that the shim can compile.

It checks what Apple's compiler would reject but C++ accepts (non-ASCII bytes, ``std::``,
foreign includes, ``double``, C-style vector casts), finds the kernels and their explicit
``[[host_name]]`` instantiations, rewrites the constructs that are not C++ (attributes,
``threadgroup`` arrays, vector constructors, unsuffixed float literals), and generates for each
kernel an ``extern "C"`` entry that binds the argument slots and thread positions (``entry``).

The text is macro-expanded by the compiler's preprocessor first (see ``_compiler``), so kernels
instantiated through a macro are seen as written out. Every edit keeps the line count, so the
compiler's messages point at the lines of the original file.
"""

from __future__ import annotations

import dataclasses
import re

ALLOWED_INCLUDES = frozenset({"metal_stdlib", "metal_simdgroup", "metal_math", "metal_integer",
                              "metal_atomic", "metal_compute", "metal_common"})

DEFAULT_MAX_THREADS = 1024

# Kernel parameter attributes that carry a thread position: the C++ expression, over the
# executor's ThreadContext `mh_ctx`, that provides each one.
POSITION_ATTRIBUTES = {
    "thread_position_in_grid": "mh_ctx->thread_position_in_grid",
    "thread_position_in_threadgroup": "mh_ctx->thread_position_in_threadgroup",
    "threadgroup_position_in_grid": "mh_ctx->threadgroup_position_in_grid",
    "threads_per_grid": "mh_ctx->threads_per_grid",
    "grid_size": "mh_ctx->threads_per_grid",
    "threads_per_threadgroup": "mh_ctx->threads_per_threadgroup",
    "dispatch_threads_per_threadgroup": "mh_ctx->dispatch_threads_per_threadgroup",
    "threadgroups_per_grid": "mh_ctx->threadgroups_per_grid",
    "grid_origin": "mh_grid_origin",
    "thread_index_in_threadgroup": "mh_ctx->thread_index_in_threadgroup",
    "thread_index_in_simdgroup": "mh_ctx->thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup": "mh_ctx->simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup": "mh_ctx->simdgroups_per_threadgroup",
    "dispatch_simdgroups_per_threadgroup": "mh_ctx->dispatch_simdgroups_per_threadgroup",
    "threads_per_simdgroup": "mh_ctx->threads_per_simdgroup",
    "thread_execution_width": "mh_ctx->threads_per_simdgroup",
    "thread_index_in_quadgroup": "mh_ctx->thread_index_in_threadgroup % 4u",
    "quadgroup_index_in_threadgroup": "mh_ctx->thread_index_in_threadgroup / 4u",
    "quadgroups_per_threadgroup": ("(mh_ctx->threads_per_threadgroup[0] * mh_ctx->threads_per_threadgroup[1]"
                                   " * mh_ctx->threads_per_threadgroup[2] + 3u) / 4u"),
}

VECTOR_TYPE = r"(?:float|half|int|uint|short|ushort|char|uchar|long|ulong)[234]"


class MetalSourceError(SyntaxError):
    """The source uses something Apple's Metal compiler rejects, or the harness cannot run."""


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    declaration: str      # the parameter as written, attributes removed (for messages)
    buffer: int | None    # [[buffer(i)]] index, or None for a thread-position parameter
    position: str | None  # the position attribute's name


@dataclasses.dataclass(frozen=True)
class Kernel:
    host_name: str
    cpp_name: str             # the function, with template arguments for an instantiation
    params: tuple[Param, ...]
    max_threads_expr: str     # C++ expression for max_total_threads_per_threadgroup

    @property
    def buffers(self) -> tuple[Param, ...]:
        return tuple(sorted((p for p in self.params if p.buffer is not None), key=lambda p: p.buffer))


LINE_MARKER = re.compile(r'^#\s*(?:line\s+)?(\d+)\s+"([^"]*)"', re.MULTILINE)


def _location(text: str, pos: int, filename: str) -> tuple[str, int, int]:
    """(file, line, column) of text[pos], following the preprocessor's line markers if any."""
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    marker = None
    for marker in LINE_MARKER.finditer(text, 0, pos):
        pass
    if marker is None:
        return filename, line, col
    marker_line = text.count("\n", 0, marker.start()) + 1
    return marker.group(2), int(marker.group(1)) + line - marker_line - 1, col


def _error(text: str, pos: int, message: str, filename: str) -> MetalSourceError:
    file, line, col = _location(text, pos, filename)
    lines = text[:pos].count("\n")
    source_line = text.splitlines()[lines] if text else ""
    return MetalSourceError(f"{file}:{line}:{col}: {message}", (file, line, col, source_line))


def mask_comments_and_literals(text: str) -> str:
    """Same length as `text`; comments and the contents of string/char literals become spaces."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out[i:j] = " " * (j - i)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out[i:j] = [ch if ch == "\n" else " " for ch in text[i:j]]
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            out[i + 1:j] = " " * (j - i - 1)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def check_raw_source(source: str, filename: str) -> None:
    """Checks on the file as written, before the preprocessor removes comments."""
    for pos, ch in enumerate(source):
        if ord(ch) > 127:
            raise _error(source, pos, f"non-ASCII character {ch!r} (U+{ord(ch):04X}): Metal sources "
                         "are read as ASCII, comments included", filename)


def strip_metal_includes(source: str, filename: str) -> str:
    """Blanks the `#include <metal_*>` lines (the shim replaces them); rejects any other include."""
    masked = mask_comments_and_literals(source)
    edits = []
    for m in re.finditer(r"^[ \t]*#[ \t]*include\b[^\n]*", masked, re.MULTILINE):
        original = source[m.start():m.end()]
        target = re.search(r"[<\"]([^>\"]*)[>\"]", original)
        header = target.group(1).strip() if target else ""
        if original.lstrip("# \t")[len("include"):].strip().startswith("<") and header in ALLOWED_INCLUDES:
            edits.append((m.start(), m.end(), ""))
        else:
            raise _error(source, m.start(), f"#include of {header or original.strip()!r} is not available: "
                         "a kernel file compiled with torch.mps.compile_shader may include only "
                         + ", ".join(f"<{h}>" for h in sorted(ALLOWED_INCLUDES)), filename)
    return _apply(source, edits)


def _apply(text: str, edits: list[tuple[int, int, str]]) -> str:
    pieces, last = [], 0
    for start, end, replacement in sorted(edits):
        if start < last:
            raise AssertionError("overlapping source edits")
        pieces.append(text[last:start])
        pieces.append(replacement)
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


def _blank(text: str, start: int, end: int) -> tuple[int, int, str]:
    """An edit that removes text[start:end] but keeps its line breaks."""
    return (start, end, "\n" * text.count("\n", start, end))


def _match_close(code: str, open_pos: int, opening: str, closing: str) -> int:
    """Index just past the bracket closing the one at open_pos."""
    depth = 0
    for i in range(open_pos, len(code)):
        if code[i] == opening:
            depth += 1
        elif code[i] == closing:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {opening}{closing}")


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


ATTRIBUTE_SPECIFIER = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)


def _attributes(text: str) -> list[tuple[str, str]]:
    """[(name, argument text)] of every attribute in the `[[...]]` specifiers of `text`."""
    items = []
    for spec in ATTRIBUTE_SPECIFIER.finditer(text):
        for item in _split_top_level(spec.group(1)):
            m = re.match(r"(\w+)\s*(?:\((.*)\))?\s*$", item, re.DOTALL)
            if m:
                items.append((m.group(1), m.group(2) or ""))
    return items


def _parse_params(param_text: str, kernel_name: str, text: str, pos: int, filename: str) -> tuple[Param, ...]:
    params: list[Param] = []
    implicit = explicit = False
    for raw in _split_top_level(param_text):
        attributes = _attributes(raw)
        declaration = " ".join(ATTRIBUTE_SPECIFIER.sub(" ", raw).split())
        names = re.findall(r"\w+", declaration)
        name = names[-1] if names else "?"
        buffer = position = None
        for attr, value in attributes:
            if attr == "buffer":
                try:
                    buffer = int(value.strip(), 0)
                except ValueError:
                    raise _error(text, pos, f"kernel {kernel_name!r}, parameter {name!r}: [[buffer({value})]] "
                                 "must be an integer literal for the harness", filename) from None
                explicit = True
            elif attr in POSITION_ATTRIBUTES:
                position = attr
            else:
                raise _error(text, pos, f"kernel {kernel_name!r}, parameter {name!r}: attribute [[{attr}]] is "
                             "not supported (torch.mps.compile_shader binds buffers and thread positions only)",
                             filename)
        if buffer is None and position is None:
            if "*" not in declaration and "&" not in declaration:
                raise _error(text, pos, f"kernel {kernel_name!r}, parameter {name!r} ({declaration}) is neither a "
                             "buffer (pointer or reference) nor a thread-position attribute", filename)
            implicit = True
        params.append(Param(name=name, declaration=declaration, buffer=buffer, position=position))
    if implicit and explicit:
        raise _error(text, pos, f"kernel {kernel_name!r} mixes [[buffer(i)]] parameters with buffer parameters "
                     "that have no index: give every buffer parameter its [[buffer(i)]]", filename)
    if implicit:  # Metal numbers unannotated buffers in declaration order
        counter = iter(range(len(params)))
        params = [dataclasses.replace(p, buffer=next(counter)) if p.position is None else p for p in params]
    indices = sorted(p.buffer for p in params if p.buffer is not None)
    if indices != list(range(len(indices))):
        raise _error(text, pos, f"kernel {kernel_name!r} declares buffer indices {indices}: compile_shader binds "
                     "positional argument i to [[buffer(i)]], so the indices must be 0, 1, 2, ... without gaps",
                     filename)
    return tuple(params)


@dataclasses.dataclass
class _Definition:
    name: str
    params: tuple[Param, ...]
    is_template: bool
    host_name: str | None
    max_threads_expr: str


def _statement_start(code: str, pos: int) -> int:
    """Index just past the `;`, `{` or `}` that ends the statement before `pos`."""
    return max(code.rfind(ch, 0, pos) for ch in ";{}") + 1


def translate(text: str, filename: str = "kernels.metal") -> tuple[str, list[Kernel]]:
    """Preprocessed Metal source -> (C++ translation unit, kernels it exposes)."""
    code = mask_comments_and_literals(text)
    for m in re.finditer(r"\bstd\s*::", code):
        raise _error(text, m.start(), "`std::` is not available in Metal (no C++ standard library)", filename)
    for m in re.finditer(r"\bdouble\b", code):
        raise _error(text, m.start(), "`double` is not supported by Metal", filename)
    for m in re.finditer(rf"\(\s*{VECTOR_TYPE}\s*\)\s*[\w(]", code):
        raise _error(text, m.start(), "C-style cast to a vector type: write the constructor form "
                     "(float4(v)) or static_cast<float4>(v)", filename)

    edits: list[tuple[int, int, str]] = []
    instantiations: list[tuple[str, str, int]] = []  # (host name, C++ name with template arguments, position)
    taken: list[tuple[int, int]] = []

    for m in re.finditer(r"\btemplate\s*\[\[\s*host_name\s*\(", code):
        end = code.find(";", m.end())
        if end < 0:
            raise _error(text, m.start(), "unterminated [[host_name]] instantiation", filename)
        statement = text[m.start():end]
        host = re.search(r"host_name\s*\(\s*((?:\"[^\"]*\"\s*)+)\)", statement)
        rest = code[m.start():end]
        rest = rest[rest.find("]]") + 2:]
        target = re.search(r"\b(?!decltype\b|void\b|kernel\b)([A-Za-z_]\w*)\s*<", rest)
        if not host or not target:
            raise _error(text, m.start(), "cannot read this [[host_name]] instantiation; write it as "
                         "`template [[host_name(\"name\")]] kernel void f<...>(...);` or "
                         "`template [[host_name(\"name\")]] [[kernel]] decltype(f<...>) f<...>;`", filename)
        lt = target.end() - 1
        gt = _match_close(rest, lt, "<", ">")
        host_name = "".join(re.findall(r"\"([^\"]*)\"", host.group(1)))  # "a" "b" concatenates
        instantiations.append((host_name, target.group(1) + rest[lt:gt], m.start()))
        edits.append(_blank(text, m.start(), end + 1))
        taken.append((m.start(), end + 1))

    definitions: dict[str, _Definition] = {}
    for m in re.finditer(r"\[\[.*?\]\]|\bkernel\b", code, re.DOTALL):
        if any(a <= m.start() < b for a, b in taken):
            continue
        if m.group(0).startswith("[[") and "kernel" not in (name for name, _ in _attributes(m.group(0))):
            continue
        head = re.compile(r"\s*(?:\[\[[^\]]*\]\]\s*)*void\s+(\w+)\s*\(").match(code, m.end())
        if not head:
            raise _error(text, m.start(), "expected `kernel void name(...)`", filename)
        name = head.group(1)
        open_paren = head.end() - 1
        close_paren = _match_close(code, open_paren, "(", ")")
        after = code[close_paren:].lstrip()
        if after.startswith(";"):
            continue  # a declaration; the definition follows elsewhere
        start = _statement_start(code, m.start())
        prefix = re.sub(r"^[ \t]*#.*$", "", code[start:m.start()], flags=re.MULTILINE)  # line markers
        is_template = re.match(r"\s*template\s*<", prefix) is not None
        attributes = dict(_attributes(text[start:open_paren]))
        host_name = "".join(re.findall(r"\"([^\"]*)\"", attributes["host_name"])) if "host_name" in attributes else None
        max_threads_expr = attributes.get("max_total_threads_per_threadgroup", "").strip() or str(DEFAULT_MAX_THREADS)
        params = _parse_params(code[open_paren + 1:close_paren - 1], name, text, m.start(), filename)
        definitions[name] = _Definition(name, params, is_template, host_name, max_threads_expr)
        # Drop `kernel` and every [[...]] between the statement start and the parameter list's end.
        edits.append(_blank(text, m.start(), m.end()))
        for a in re.finditer(r"\[\[.*?\]\]", code[start:close_paren], re.DOTALL):
            if not (start + a.start() <= m.start() < start + a.end()):
                edits.append(_blank(text, start + a.start(), start + a.end()))

    kernels: list[Kernel] = []
    for name, definition in definitions.items():
        if not definition.is_template:
            kernels.append(Kernel(definition.host_name or name, name, definition.params, definition.max_threads_expr))
    for host_name, cpp_name, pos in instantiations:
        base = cpp_name.split("<", 1)[0].strip()
        definition = definitions.get(base)
        if definition is None:
            raise _error(text, pos, f"[[host_name(\"{host_name}\")]] instantiates {base!r}, which is not a kernel "
                         "template defined in this file", filename)
        kernels.append(Kernel(host_name, cpp_name, definition.params, definition.max_threads_expr))
    seen: set[str] = set()
    for k in kernels:
        if k.host_name in seen:
            raise _error(text, 0, f"two kernels are named {k.host_name!r}", filename)
        seen.add(k.host_name)

    edits.extend(_threadgroup_declarations(code, text))
    edits.extend(_vector_constructors(code))
    edits.extend(_float_literals(code))
    body = _apply(text, _drop_nested(edits))
    return "#include <metal_stdlib>\n" + body + "\n", kernels


def _drop_nested(edits: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Blanking an instantiation or attribute wins over edits found inside it."""
    kept: list[tuple[int, int, str]] = []
    for edit in sorted(edits, key=lambda e: (e[0], -(e[1] - e[0]))):
        if kept and edit[0] < kept[-1][1]:
            continue
        kept.append(edit)
    return kept


def _threadgroup_declarations(code: str, text: str) -> list[tuple[int, int, str]]:
    """`threadgroup T name[N];` -> a reference to storage the executor gives each threadgroup."""
    edits = []
    declaration = re.compile(r"threadgroup\s+([^;*&=(){}\[\]]+?)\s+(\w+)\s*((?:\[[^\];]+\]\s*)*);")
    for i, m in enumerate(re.finditer(r"\bthreadgroup\b", code)):
        before = re.sub(r"^[ \t]*#.*$", "", code[max(0, m.start() - 400):m.start()], flags=re.MULTILINE).rstrip()
        if before and before[-1] not in ";{}":
            continue  # a pointer or parameter type, not a declaration
        d = declaration.match(code, m.start())
        if not d:
            continue
        replacement = group_storage_declaration(d.group(1).strip(), d.group(2), "".join(d.group(3).split()), i)
        edits.append((d.start(), d.end(), replacement + "\n" * text.count("\n", d.start(), d.end())))
    return edits


def group_storage_declaration(type_text: str, name: str, dims: str, i: int, align: int = 1) -> str:
    """C++ that declares `name` (of type `type_text dims`, e.g. `float`, `[4][5]`) as a reference to
    storage the executor gives each threadgroup (CUDA: block), the same for all its threads, aligned
    to at least `align` bytes."""
    alias = f"mh_threadgroup_type_{i}"
    key = f"mh_threadgroup_key_{i}"
    alignment = f"alignof({alias})" if align <= 1 else f"(alignof({alias}) > {align} ? alignof({alias}) : {align})"
    return (f"using {alias} = {type_text} {dims}; static char {key}; "
            f"{alias}& {name} = *static_cast<{alias}*>(::mh::rt_threadgroup_storage("
            f"&{key}, sizeof({alias}), {alignment}, \"{name}\"));")


def _vector_constructors(code: str) -> list[tuple[int, int, str]]:
    edits = []
    for m in re.finditer(rf"(?<![\w.:])({VECTOR_TYPE})\s*\(", code):
        edits.append((m.start(), m.end(), f"::mh::make_vec<{m.group(1)}>("))
    for m in re.finditer(rf"\bstatic_cast\s*<\s*({VECTOR_TYPE})\s*>\s*\(", code):
        edits.append((m.start(), m.end(), f"::mh::make_vec<{m.group(1)}>("))
    return edits


def _float_literals(code: str) -> list[tuple[int, int, str]]:
    """Metal has no double: an unsuffixed floating literal is a float. `1.0h` is a half."""
    edits = []
    literal = re.compile(r"(?<![\w.])((?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)([fFhH]?)(?![\w.])")
    for m in literal.finditer(code):
        if m.group(2) == "":
            edits.append((m.end(), m.end(), "f"))
        elif m.group(2) in "hH":
            edits.append((m.start(), m.end(), f"static_cast<half>({m.group(1)}f)"))
    return edits


ENTRY_PREAMBLE = ("// ---- generated by metal_harness: kernel entries ----\n"
                  "static const uint32_t mh_grid_origin[3] = {0, 0, 0};\n")


def entry(index: int, k: Kernel) -> str:
    """C++ for kernel `k`: `mh_entry_<index>` (binds argument slots and thread positions, calls the
    kernel), `mh_codes_<index>` (element type of each buffer) and `mh_max_threads_<index>`."""
    fn = f"mh_fn_{index}"
    args = []
    for j, p in enumerate(k.params):
        param_type = f"::mh::param_t<{fn}, {j}>"
        if p.buffer is not None:
            args.append(f"::mh::bind_buffer<{param_type}>(mh_args[{p.buffer}])")
        else:
            args.append(f"::mh::position_as<{param_type}>({POSITION_ATTRIBUTES[p.position]})")
    codes = [f"::mh::buffer_code<::mh::param_t<{fn}, {k.params.index(p)}>>()" for p in k.buffers] or ["0"]
    return "\n".join([
        f"using {fn} = decltype(&{k.cpp_name});",
        f'extern "C" void mh_entry_{index}(void* const* mh_args, const ::mh::ThreadContext* mh_ctx) {{',
        f"  (void)mh_args; (void)mh_ctx; {k.cpp_name}({', '.join(args)});",
        "}",
        f'extern "C" const int mh_codes_{index}[] = {{{", ".join(codes)}}};',
        f'extern "C" const long mh_max_threads_{index} = ({k.max_threads_expr});',
    ]) + "\n"
