"""Source pre-pass: turns macro-expanded CUDA C++ into C++ that the shim (include/cuda_harness.h)
compiles, and finds the kernels.

Almost everything CUDA adds to C++ is a macro or a function of the shim. What is not: `__global__`
functions (found here, each gets a generated `extern "C"` entry that unpacks CUDA-style argument
slots, `entry`) and `__shared__` variables (rewritten into references to storage that the executor
gives each block). Every edit keeps the line count, so the compiler's messages point at the lines
of the original file.
"""

from __future__ import annotations

import dataclasses
import re

from metal_harness._source import (_apply, _location, _match_close, _split_top_level, group_storage_declaration,
                                   mask_comments_and_literals)

DEFAULT_MAX_THREADS = 1024


class CudaSourceError(RuntimeError):
    """The CUDA source cannot be compiled (torch.cuda._compile_kernel raises RuntimeError too)."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str                      # the function; with template arguments for an instantiation ("f<4>")
    declarations: tuple[str, ...]  # each parameter as written (for messages)
    max_threads_expr: str          # C++ expression: __launch_bounds__'s first argument, or 1024
    template: bool = False         # a kernel template: run through Library.get_function("name<...>")


def _error(text: str, pos: int, message: str, filename: str) -> CudaSourceError:
    file, line, col = _location(text, pos, filename)
    return CudaSourceError(f"Kernel compilation failed:\n{file}:{line}:{col}: error: {message}")


SCOPE_OPENER = re.compile(r'(?:\bextern\s*"[^"]*"|\bnamespace(?:\s+\w+)?)\s*$')


def _code_depth(code: str, pos: int) -> int:
    """How many braces that are not `extern "C" {` or `namespace n {` enclose `pos` (0: file scope)."""
    stack: list[bool] = []  # per open brace: does it open a linkage block or a namespace?
    for m in re.finditer(r"[{}]", code[:pos]):
        if m.group(0) == "{":
            stack.append(SCOPE_OPENER.search(code, max(0, m.start() - 200), m.start()) is not None)
        elif stack:
            stack.pop()
    return sum(1 for scope in stack if not scope)


KERNEL_HEAD = re.compile(r"\s*(?:(?P<void>void)\b|(?P<bounds>__launch_bounds__)\s*\(|(?P<name>\w+)\s*\()")


def _find_kernels(code: str, text: str, filename: str) -> list[Kernel]:
    kernels: dict[str, Kernel] = {}
    for m in re.finditer(r"\b__global__\b", code):
        pos, name, launch_bounds = m.end(), None, None
        while name is None:
            head = KERNEL_HEAD.match(code, pos)
            if not head:
                raise _error(text, m.start(), "expected `__global__ void [__launch_bounds__(n)] name(...)`", filename)
            if head.group("bounds"):
                close = _match_close(code, head.end() - 1, "(", ")")
                launch_bounds = _split_top_level(code[head.end():close - 1])[0]
                pos = close
            elif head.group("name"):
                name = head.group("name")
                pos = head.end() - 1
            else:
                pos = head.end()
        statement = code[max(code.rfind(ch, 0, m.start()) for ch in ";{}") + 1:m.start()]
        statement = re.sub(r"^[ \t]*#.*$", "", statement, flags=re.MULTILINE)  # line markers
        template = re.search(r"\btemplate\s*<", statement) is not None
        if _code_depth(code, m.start()) != 0:
            raise _error(text, m.start(), f"kernel {name!r} must be defined at file scope", filename)
        close = _match_close(code, pos, "(", ")")
        if code[close:].lstrip().startswith(";"):
            continue  # a declaration; the definition follows
        if name in kernels:
            raise _error(text, m.start(), f"two kernels are named {name!r}", filename)
        declarations = tuple(" ".join(p.split()) for p in _split_top_level(code[pos + 1:close - 1]))
        if declarations == ("void",):
            declarations = ()
        kernels[name] = Kernel(name, declarations, launch_bounds or str(DEFAULT_MAX_THREADS), template)
    return list(kernels.values())


ALIGN = r"(?:__align__\s*\(\s*(\d+)\s*\)\s*)?"
STATIC_SHARED = re.compile(r"(?:\bstatic\s+)?__shared__\s+" + ALIGN +
                           r"([^;*&=(){}\[\]]+?)\s+(\w+)\s*((?:\[[^\];]+\]\s*)*);")
DYNAMIC_SHARED = re.compile(r"\bextern\s+__shared__\s+" + ALIGN + r"([^;*&=(){}\[\]]+?)\s+(\w+)\s*\[\s*\]\s*;")


def _shared_declarations(code: str, text: str, filename: str) -> list[tuple[int, int, str]]:
    """`__shared__ T name[N];` -> a reference to the block's storage; `extern __shared__ T name[];`
    -> a pointer to the launch's dynamic shared memory."""
    edits = []
    for i, m in enumerate(re.finditer(r"\b__shared__\b", code)):
        statement = max(code.rfind(ch, 0, m.start()) for ch in ";{}") + 1
        start = statement + len(code[statement:m.start()]) - len(code[statement:m.start()].lstrip())
        if _code_depth(code, m.start()) == 0:
            raise _error(text, m.start(), "the harness supports __shared__ variables declared inside a kernel or "
                         "device function only", filename)
        keep_lines = "\n" * text.count("\n", start, code.find(";", m.start()))
        dynamic = DYNAMIC_SHARED.match(code, start)
        if dynamic:
            type_text, name = dynamic.group(2).strip(), dynamic.group(3)  # aligned to 16 bytes
            edits.append((dynamic.start(), dynamic.end(), f"{type_text}* const {name} = static_cast<{type_text}*>("
                          f"::mh::rt_dynamic_shared());" + keep_lines))
            continue
        static = STATIC_SHARED.match(code, start)
        if not static:
            raise _error(text, m.start(), "unsupported __shared__ declaration: write `__shared__ [__align__(n)] T "
                         "name[N]...;` (no initializer) or `extern __shared__ [__align__(n)] T name[];`", filename)
        replacement = group_storage_declaration(static.group(2).strip(), static.group(3),
                                                "".join(static.group(4).split()), i, int(static.group(1) or 1))
        edits.append((static.start(), static.end(), replacement + keep_lines))
    return edits


def translate(text: str, filename: str) -> tuple[str, list[Kernel]]:
    """Macro-expanded CUDA source -> (C++ translation unit, kernels it defines)."""
    code = mask_comments_and_literals(text)
    kernels = _find_kernels(code, text, filename)
    if not kernels:
        raise _error(text, 0, "no `__global__` kernel is defined in this source", filename)
    body = _apply(text, _shared_declarations(code, text, filename))
    return '#include "cuda_harness.h"\n' + body + "\n", kernels


ENTRY_PREAMBLE = '\n#line 1 "<cuda_harness kernel entries>"\n'


def entry(index: str, k: Kernel) -> str:
    """C++ for kernel `k` (or the instantiation it names): `ch_entry_<index>` (argument slot i points
    to argument i's value, as cuLaunchKernel's kernelParams), `ch_params_<index>` (how to pack each
    argument) and `ch_max_threads_<index>`."""
    fn = f"ch_fn_{index}"
    n = len(k.declarations)
    args = ", ".join(f"*static_cast<::ch::param_t<{fn}, {j}>*>(ch_args[{j}])" for j in range(n))
    infos = ", ".join(f"::ch::param_info<::ch::param_t<{fn}, {j}>>()" for j in range(n)) or "{-1, 0, 0}"
    return "\n".join([
        f"using {fn} = decltype(&{k.name});",
        f'extern "C" void ch_entry_{index}(void* const* ch_args, const ::mh::ThreadContext*) {{',
        f"  (void)ch_args; {k.name}({args});",
        "}",
        f'extern "C" const ::ch::ParamInfo ch_params_{index}[] = {{{infos}}};',
        f'extern "C" const long ch_max_threads_{index} = ({k.max_threads_expr});',
    ]) + "\n"
