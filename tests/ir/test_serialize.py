"""An IR graph moved to another process: same nodes, names, module paths, shapes and outputs."""
import pickle

import torch

import graphopt
from graphopt.analysis.sublayers import find_sublayers
from graphopt.ir.serialize import pack_graph, unpack_graph


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def test_a_quantized_llama_graph_comes_back_equal(llama):
    inputs = llama.example_inputs(seq_len=16)
    for passes in ("default", "int4"):
        gm = graphopt.compile(llama.model, inputs, passes=passes, progress=False).captured.graph_module
        copy = unpack_graph(pickle.loads(pickle.dumps(pack_graph(gm))), inputs)
        assert [n.name for n in copy.graph.nodes] == [n.name for n in gm.graph.nodes if n.target != "_guards_fn"]
        assert find_sublayers(copy) == find_sublayers(gm)
        for node, original in zip(copy.graph.nodes, (n for n in gm.graph.nodes if n.target != "_guards_fn")):
            val = original.meta.get("val")
            if isinstance(val, torch.Tensor):
                assert node.meta["val"].shape == val.shape and node.meta["val"].dtype == val.dtype, node.name
            assert node.meta.get("nn_module_stack") == original.meta.get("nn_module_stack")
        assert torch.equal(_first(copy(*inputs)), _first(gm(*inputs)))
