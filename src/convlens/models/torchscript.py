"""TorchScript files are code: what convlens checks before it loads and runs one.

A TorchScript archive holds compiled programs, not just weights. Its code can
call ``aten::from_file`` (map any file into a tensor and write through it),
``aten::save`` (write a file) or ``prim::rpc_sync`` (talk to the network), and a
module's ``__setstate__`` runs inside ``torch.jit.load`` itself. So, unless the
caller trusts the file (``trust_code=True``, CLI ``--trust-code``), convlens:

1. reads the archive's source before loading it and refuses one that defines
   ``__setstate__`` (the only code ``torch.jit.load`` runs);
2. after loading, walks the fully inlined graph of every method and hook of every
   submodule, into every nested block and subgraph, and refuses on one line the
   first operator it cannot vouch for: ``aten`` operators are tensor maths except
   those that take a file name (found from their schemas) and :data:`DENIED`;
   ``prim`` operators only when listed in :data:`PRIM_ALLOWED` (structure: constants,
   attributes, control flow, lists and tuples); the tensor-maths namespaces of
   :data:`NAMESPACES_ALLOWED`; nothing else (``c10d``, ``profiler``, a custom namespace,
   a call that inlining left in place, a ``fork`` whose body would go unread).
"""

from __future__ import annotations

import re
import warnings
import zipfile
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import ConvlensError, first_line

#: aten operators that touch files whatever their argument names say
DENIED = frozenset({"aten::from_file", "aten::save"})

#: prim operators that only build, read or branch on values: nothing reaches a file, a process or the network
PRIM_ALLOWED = frozenset(
    {
        "prim::Constant",
        "prim::GetAttr",
        "prim::SetAttr",
        "prim::If",
        "prim::Loop",
        "prim::ListConstruct",
        "prim::ListUnpack",
        "prim::TupleConstruct",
        "prim::TupleUnpack",
        "prim::TupleIndex",
        "prim::TupleSlice",
        "prim::DictConstruct",
        "prim::CreateObject",
        "prim::RaiseException",
        "prim::Uninitialized",
        "prim::unchecked_cast",
        "prim::unchecked_unwrap_optional",
        "prim::NumToTensor",
        "prim::device",
        "prim::dtype",
        "prim::layout",
        "prim::shape",
        "prim::data",
        "prim::requires_grad",
        "prim::grad",
        "prim::is_cuda",
        "prim::is_cpu",
        "prim::is_quantized",
        "prim::is_sparse",
        "prim::is_nested",
        "prim::is_meta",
        "prim::is_mkldnn",
        "prim::abs",
        "prim::min",
        "prim::max",
        "prim::tolist",
        "prim::StringIndex",
        "prim::EnumName",
        "prim::EnumValue",
        "prim::isinstance",
        "prim::AutogradZero",
        "prim::AutogradAdd",
        "prim::Print",
        "prim::name",
        "prim::index",
        "prim::rangelist",
        "prim::itemsize",
        "prim::nbytes",
        "prim::type",
        "prim::id",
        "prim::ModuleContainerIndex",
    }
)

#: namespaces of registered tensor maths (quantized kernels, torchvision's nms and roi_align)
NAMESPACES_ALLOWED = frozenset({"quantized", "_quantized", "torchvision"})

_FILE_ARGUMENT = re.compile(r"file|path|dir")


@lru_cache(maxsize=1)
def _aten_with_file_arguments() -> frozenset[str]:
    """aten operators with a string argument that names a file, read off the registered schemas."""
    found = set()
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("aten::") and any(
            "str" in str(arg.type) and _FILE_ARGUMENT.search(arg.name) for arg in schema.arguments
        ):
            found.add(schema.name)
    return frozenset(found)


def why_refused(kind: str) -> str | None:
    """Why the operator ``kind`` (``"aten::from_file"``) is not vouched for, or ``None`` when it is."""
    namespace = kind.split("::", 1)[0]
    if kind in DENIED or kind in _aten_with_file_arguments():
        return "reads or writes files"
    if namespace == "aten" or namespace in NAMESPACES_ALLOWED or kind in PRIM_ALLOWED:
        return None
    if kind in ("prim::CallFunction", "prim::CallMethod", "prim::fork"):
        return "calls code that convlens cannot read before running it"
    if kind.startswith("prim::rpc"):
        return "talks to the network"
    return "is not a tensor operation convlens can vouch for"


def check_archive(path: Path) -> None:
    """Refuse, before ``torch.jit.load``, an archive whose code would run while it loads (``__setstate__``)."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if "/code/" in name and name.endswith(".py") and b"__setstate__" in archive.read(name):
                raise _refusal(
                    path,
                    f"defines __setstate__ in {name.split('/code/', 1)[1]}, which torch.jit.load runs while loading",
                )


def check_module(module: torch.jit.ScriptModule, path: Path) -> None:
    """Refuse a loaded TorchScript module whose code holds an operator that :func:`why_refused` names."""
    for owner, sub in module.named_modules():
        methods = [(name, sub._c._get_method(name).inlined_graph) for name in sub._c._method_names()]
        methods += [
            (f"hook {hook.name}", hook.graph)
            for hook in [*sub._c._get_forward_pre_hooks(), *sub._c._get_forward_hooks()]
        ]
        for method, graph in methods:
            for kind in _kinds(graph):
                reason = why_refused(kind)
                if reason is not None:
                    where = f"{owner}.{method}" if owner else method
                    raise _refusal(path, f"calls {kind} in {where}, which {reason}")


def _kinds(graph: torch.Graph) -> list[str]:
    """Every operator in ``graph``, its nested blocks and its subgraph attributes, outer ones first."""
    kinds: dict[str, None] = {}
    pending: list[torch.Graph | torch.Block] = [graph]
    while pending:
        for node in pending.pop(0).nodes():
            kinds[node.kind()] = None
            pending.extend(node.blocks())
            for attribute in node.attributeNames():
                if node.kindOf(attribute) == "g":
                    pending.append(node.g(attribute))
                elif node.kindOf(attribute) == "gs":
                    pending.extend(node.gs(attribute))
    return list(kinds)


def _refusal(path: Path, what: str) -> ConvlensError:
    return ConvlensError(
        f"TorchScript file {path} {what}; TorchScript is code, and convlens runs such a file only "
        "if you trust its source: pass trust_code=True (CLI: --trust-code)"
    )


def load_torchscript(path: Path, trust_code: bool = False) -> torch.jit.ScriptModule:
    """``torch.jit.load`` on the CPU, after :func:`check_archive` and followed by :func:`check_module`
    unless ``trust_code``."""
    if not trust_code:
        check_archive(path)
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated, but users still have such files
            warnings.simplefilter("ignore", FutureWarning)
            module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise ConvlensError(f"cannot load TorchScript file {path}: {first_line(err)}") from None
    if not trust_code:
        check_module(module, path)
    return module
