"""What a compiled package's code will read, recorded while AOTInductor compiles it, so that
the package can be written without its weights (serve/runtime/weights.py).

Runs only in export/compiled.py's child process, before the compile. Two of Inductor's steps
are wrapped, keeping their behaviour:
  * freezing's constant folding, which computes each folded constant and, for the weights of
    convolutions and linear layers, packs them for oneDNN (opaque tensors that cannot be stored
    portably): for each packed one, the dense tensor it was packed from and the packing call's
    arguments are kept, so that the server packs the same tensor at load;
  * AOTInductor's code compiler, which is handed every constant the package's code reads.
Both are Inductor internals (torch/_inductor/constant_folding.py, codecache.py), checked here
against the torch that compiles; a torch whose internals moved fails the compile with a line
saying so, and the export then keeps its packages' weights inside them.
"""

from __future__ import annotations

import torch
import torch._inductor.codecache as codecache
import torch._inductor.constant_folding as constant_folding
import torch._inductor.freezing as freezing

from serve.runtime.weights import PACKING, Constant, tensor_sha256

# name in the package -> (packing operator, dense source, the call's other arguments)
packed: dict[str, tuple[str, torch.Tensor, tuple]] = {}
# name in the package -> the tensor its code reads
constants: dict[str, torch.Tensor] = {}


class CaptureError(Exception):
    """This torch's Inductor does not work the way the capture expects."""


def operator_name(node: torch.fx.Node) -> str:
    name = str(node.target)
    return name[:-len(".default")] if name.endswith(".default") else name


def constant_fold(gm: torch.fx.GraphModule, constraint_fn=None) -> None:
    """constant_folding.constant_fold, which also notes what each packed weight was packed from."""
    with torch.utils._python_dispatch._disable_current_modes():
        folder = constant_folding.ConstantFolder(gm, skip_constructors=True)
        folder.garbage_collect_values = False  # the packing calls' inputs are read after the run
        folder.run()
        for node, constant in folder.node_replacements.items():
            if constraint_fn is not None and not constraint_fn(node):
                continue
            source = None
            if node.op == "call_function" and operator_name(node) in PACKING:
                rest = tuple(node.args[1:])
                if any(isinstance(arg, torch.fx.Node) for arg in rest):
                    raise CaptureError(f"{operator_name(node)} takes a computed argument")
                source = (operator_name(node), folder.env[node.args[0]], rest)
            before = set(gm._buffers)
            constant_folding.replace_node_with_constant(gm, node, constant)
            added = [name for name in gm._buffers if name not in before]
            if source is not None:
                if len(added) != 1:
                    raise CaptureError("a packed weight was not stored as one frozen constant")
                packed[added[0]] = source
        unused = [node for node in gm.graph.find_nodes(op="get_attr") if len(node.users) == 0]
        for node in unused:
            if hasattr(gm, node.target):
                delattr(gm, node.target)
            gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()


def install() -> None:
    if not hasattr(constant_folding, "ConstantFolder") or not hasattr(codecache, "AotCodeCompiler"):
        raise CaptureError("this torch's Inductor has no ConstantFolder or AotCodeCompiler")
    constant_folding.constant_fold = constant_fold
    freezing.constant_fold = constant_fold
    compile_code = codecache.AotCodeCompiler.compile.__func__

    def compile_and_record(cls, graph, *args, **kwargs):
        for name in graph.constants:
            if name not in graph.folded_constants:
                constants[name] = graph.get_original_value_of_constant(name)
        return compile_code(cls, graph, *args, **kwargs)

    codecache.AotCodeCompiler.compile = classmethod(compile_and_record)


def constants_list() -> tuple[list[Constant], dict[str, torch.Tensor]]:
    """The package's constants as serve/runtime/weights.py reads them, and the dense tensors
    they come from, by sha256."""
    if not constants:
        raise CaptureError("the compile reported no constants")
    listed, tensors = [], {}
    for name, tensor in constants.items():
        if tensor.is_mkldnn:
            if name not in packed:
                raise CaptureError(f"constant {name} is packed for oneDNN by a step that was not recorded")
            operator, source, args = packed[name]
        else:
            operator, source, args = None, tensor, ()
        if source.is_mkldnn or source.layout != torch.strided:
            raise CaptureError(f"constant {name} comes from a tensor that is not dense")
        digest = tensor_sha256(source)
        tensors[digest] = source
        listed.append(Constant(name=name, sha256=digest, dtype=source.dtype, shape=tuple(source.shape),
                               stride=tuple(source.stride()), pack=operator, args=args))
    return listed, tensors
