import dataclasses
import os

import pytest
import torch

from graphopt.errors import PassContractError, PassError, PreconditionError, VerificationError
from graphopt.frontend.torch_export import capture
from graphopt.passes import (
    DeadCodeElimination,
    DumpInstrument,
    Pass,
    PassManager,
    PassResult,
    PrintOnChangeInstrument,
    Tolerance,
    VerifyInstrument,
)

aten = torch.ops.aten


def _gm():
    return capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(2, 4),)).graph_module


class ReturnsGraph(Pass):
    def run(self, gm, ctx):
        return gm


class Liar(Pass):
    """Claims no change but doubles the output."""

    def run(self, gm, ctx):
        out = gm.graph.find_nodes(op="output")[0]
        with gm.graph.inserting_before(out):
            doubled = gm.graph.call_function(aten.mul.Tensor, (out.args[0][0], 2.0))
        doubled.meta["val"] = out.args[0][0].meta["val"]
        out.args = ((doubled,),)
        return PassResult(gm, False)


class Doubler(Liar):
    tolerance = Tolerance(rtol=1e-5)

    def run(self, gm, ctx):
        return PassResult(super().run(gm, ctx).graph_module, True, ["doubled the output"])


class ClaimsChange(Pass):
    def run(self, gm, ctx):
        return PassResult(gm, True)


class Boom(Pass):
    def run(self, gm, ctx):
        raise RuntimeError("kaboom")


@dataclasses.dataclass
class NeedsFlagOptions:
    flag: bool = False


class NeedsFlag(Pass):
    Options = NeedsFlagOptions

    def requires(self, gm, ctx):
        if not self.options.flag:
            raise PreconditionError("flag must be set")

    def run(self, gm, ctx):
        return PassResult(gm, False)


def test_wrong_return_type_is_rejected():
    with pytest.raises(PassContractError, match="ReturnsGraph.*returned GraphModule"):
        PassManager([ReturnsGraph()]).run(_gm())


def test_dishonest_modified_flags_are_rejected():
    with pytest.raises(PassContractError, match="changed the graph but reported modified=False"):
        PassManager([Liar()]).run(_gm())
    with pytest.raises(PassContractError, match="reported modified=True but the graph"):
        PassManager([ClaimsChange()]).run(_gm())


def test_failure_names_the_pass_and_the_passes_before_it():
    with pytest.raises(
        PassError, match=r"pass 'Boom' failed \(passes before it: dead_code_elimination\): RuntimeError: kaboom"
    ):
        PassManager([DeadCodeElimination(), Boom()]).run(_gm())


def test_verify_catches_numeric_change_beyond_tolerance():
    x = torch.randn(2, 4)
    with pytest.raises(VerificationError, match="pass 'Doubler'.*output 0 moved"):
        PassManager([Doubler()], [VerifyInstrument((x,))]).run(_gm())


def test_requires_hook_and_typed_options():
    with pytest.raises(PreconditionError, match="flag must be set"):
        PassManager([NeedsFlag()]).run(_gm())
    PassManager([NeedsFlag(flag=True)]).run(_gm())
    with pytest.raises(TypeError):
        NeedsFlag(options=object())


def test_fixed_point_stops_when_nothing_changes():
    result = PassManager([DeadCodeElimination()], fixed_point=True, max_iterations=5).run(_gm())
    assert [r.iteration for r in result.records][-1] <= 1


def test_dump_and_print_instruments(tmp_path, capsys):
    PassManager([DeadCodeElimination(), Doubler()],
                [DumpInstrument(str(tmp_path)), PrintOnChangeInstrument()]).run(_gm())
    files = sorted(os.listdir(tmp_path))
    assert "001_Doubler_before.txt" in files and "001_Doubler_after.txt" in files
    assert "mul" in (tmp_path / "001_Doubler_after.txt").read_text()
    assert "Doubler: doubled the output" in capsys.readouterr().err
