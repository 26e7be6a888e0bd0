"""Pure logic: the job-file contract, combine modes, input binding, batch reports."""

from pathlib import Path

import numpy as np
import pytest

from spmdinfer.backends import TensorInfo, predict_in_fixed_batches
from spmdinfer.input import InputField
from spmdinfer.errors import BackendError, DataError, SpecError
from spmdinfer.comm import pack_header, unpack_header
from spmdinfer.program import bind_inputs
from spmdinfer.combine import check_layout
from spmdinfer.spec import Combine, DeviceSpec, load_spec, parse_spec
from spmdinfer.topology import core_share, device_for, helper_cores, sharing, threads_for

BASE = """
[model]
files = "model/device{rank}/net.mindir"
ranks = 2

[input]
file = "in.h5"
[input.datasets]
x = "/features"

[output]
file = "out/result.h5"
[output.datasets]
y = "/y"
"""


def parse(text: str = BASE, extra: str = ""):
    return parse_spec(text + extra, Path("/jobs/demo/job.toml"))


def test_defaults_and_relative_paths():
    spec = parse()
    assert spec.model.backend == "auto" and spec.model.ranks == 2 and spec.model.stages == 1
    assert spec.device.target == "cpu" and spec.device.device_id == "local" and spec.device.threads == 0
    assert spec.input.batch_size == 128
    assert spec.input.file == Path("/jobs/demo/in.h5")
    assert spec.output.file == Path("/jobs/demo/out/result.h5")
    assert spec.model.slice_path(1) == Path("/jobs/demo/model/device1/net.mindir")
    assert spec.output.combine == (Combine("rank0"),)
    assert spec.input.datasets == (("x", "/features"),)


def test_paths_are_shown_without_dots():
    """Messages name files plainly: `bad/../data.h5` is the job folder's data.h5."""
    text = (BASE.replace('"in.h5"', '"bad/../data.h5"').replace('"out/result.h5"', '"./out/./r.h5"')
            .replace('"model/device{rank}/net.mindir"', '"../demo/m/{rank}/../net{rank}.mindir"'))
    spec = parse(text)
    assert spec.input.file == Path("/jobs/demo/data.h5")
    assert spec.output.file == Path("/jobs/demo/out/r.h5")
    assert spec.model.slice_path(1) == Path("/jobs/demo/m/net1.mindir")


def test_a_dot_dot_after_a_symbolic_link_is_kept(tmp_path):
    """`link/../in.h5` is the link target's sibling, not the job folder's in.h5: kept as written."""
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "sub")
    spec = parse_spec(BASE.replace('"in.h5"', '"link/../in.h5"'), tmp_path / "job.toml")
    assert spec.input.file == tmp_path / "link" / ".." / "in.h5"


def test_full_contract_example_parses():
    text = BASE.replace("ranks = 2", 'ranks = 8\nbackend = "mindspore"\nstages = 1') + """
[device]
target = "gpu"
device_id = [3, 2, 1, 0]
threads = 4
[output.combine]
y = "concat:-1"
"""
    spec = parse(text)
    assert spec.model.ranks == 8 and spec.model.backend == "mindspore"
    assert spec.device.device_id == (3, 2, 1, 0) and spec.device.threads == 4
    assert spec.output.combine == (Combine("concat", -1),)
    assert device_for(spec.device, 1) == 2


@pytest.mark.parametrize("text, needle", [
    ("[model]\nfiles = ", "invalid TOML"),
    (BASE + "[model.extra]\n", "[model]"),
    (BASE.replace("ranks = 2", "rnks = 2"), "unknown key 'rnks' in [model]; valid keys: files, backend, ranks, stages"),
    (BASE + "[outptu]\n", "unknown table 'outptu'"),
    (BASE.replace("ranks = 2", "ranks = 0"), "[model] ranks must be an integer >= 1, got 0"),
    (BASE.replace("ranks = 2", 'ranks = "2"'), "[model] ranks must be an integer"),
    (BASE.replace("ranks = 2", "ranks = 2\nbackend = \"tensorflow\""), "[model] backend must be one of"),
    (BASE.replace('"model/device{rank}/net.mindir"', '"net.mindir"'), "must contain {rank}"),
    (BASE.replace("{rank}", "{rank.__class__}"), "path templates may only use {rank}"),
    (BASE.replace("{rank}", "{0}"), "path templates may only use {rank}"),
    (BASE.replace("{rank}", "{rank!r}"), "path templates may only use {rank}"),
    (BASE.replace('file = "in.h5"', 'file = "in.h5"\nbatch_size = 0'), "[input] batch_size must be an integer >= 1, got 0"),
    (BASE.replace('x = "/features"', ""), "[input.datasets] is required"),
    (BASE + '[output.combine]\ny = "stack"', "[output.combine] y: expected"),
    (BASE + '[output.combine]\ny = "concat:0"', "concat along axis 0"),
    (BASE + '[output.combine]\ny = "concat:x"', "[output.combine] y: expected"),
    (BASE + '[output.combine]\nz = "sum"', "[output.combine] z: no such output; outputs are: y"),
    (BASE + '[device]\ndevice_id = -1', "[device] device_id must be"),
    (BASE + '[device]\ntarget = "tpu"', "[device] target must be one of"),
    (BASE.replace("[model]", "[model]\nstages = 3"), "ranks = 2 must be a multiple of stages = 3"),
    (BASE.replace("[model]", '[model]\nhandoff = "wire"'), "[model] handoff must be one of 'host', 'graph'"),
    (BASE.replace('"model/device{rank}/net.mindir"', '[]'), "[model] files must be a path template or a list"),
    (BASE + "[[steps]]\nrepeat = 2\n", "[[steps]] #1: graph is required"),
    (BASE + "[[steps]]\ngraph = 1\n", "[[steps]] #1 graph must be an index into [model] files, 0 to 0"),
    (BASE + "[[steps]]\ngraph = 0\nrepeat = 0\n", "[[steps]] #1 repeat must be an integer >= 1"),
    (BASE + "[[steps]]\ngraph = 0\nfeed = 3\n", "[[steps]] #1 feed must be a table"),
    (BASE + "[[steps]]\ngraph = 0\nloops = 3\n", "unknown key 'loops' in [[steps]] #1"),
    (BASE + '[[steps]]\ngraph = 0\ninputs = { x = "step1.output0" }\n',  # a cycle
     '[[steps]] #1 inputs x = "step1.output0": "STEP.OUTPUT" must name a step that runs before '
     "this step and one of its outputs; steps before this step: none"),
    (BASE + '[[steps]]\ngraph = 0\n[[steps]]\ngraph = 0\nname = "step1"\n',
     "[[steps]] #2 name 'step1': another step has that name"),
    (BASE + '[[steps]]\ngraph = 0\nname = "two words"\n', "[[steps]] #1 name must be a word"),
    (BASE + '[[steps]]\ngraph = 0\nfeed = { x = "output0" }\ninputs = { x = "x" }\n',
     "[[steps]] #1 input 'x' is in both feed and inputs"),
    (BASE + '[[steps]]\ngraph = 0\nuntil = { output = "output0", equals = 2 }\n',
     "[[steps]] #1 until needs repeat > 1 (the most repeats), got repeat = 1"),
    (BASE + '[[steps]]\ngraph = 0\nrepeat = 4\nuntil = { output = "output0" }\n',
     '[[steps]] #1 until must be { output = "NAME", equals = NUMBER }'),
    (BASE + '[[steps]]\ngraph = 0\nrepeat = 4\nuntil = { output = "output0", equals = "eos" }\n',
     "[[steps]] #1 until equals must be a number, got 'eos'"),
    (BASE + '[[steps]]\ngraph = 0\ncollect = "yes"\n', "[[steps]] #1 collect must be true or false"),
    (BASE + '[output.from]\ny = "step2.output0"\n',
     '[output.from] y = "step2.output0": "STEP.OUTPUT" must name a step that runs in the program'),
    (BASE + '[output.from]\ny = "output0"\n', '[output.from] y = "output0" must be "STEP.OUTPUT"'),
    (BASE + '[output.from]\nz = "step1.output0"\n', "[output.from] z: no such output; outputs are: y"),
    (BASE.replace('y = "/y"', 'y = "/y"\nz = "/z"') + '[output.from]\ny = "step1.output0"\n',
     "[output.from] must name where every output comes from; z missing"),
    ("[input]\nfile='a'\n[input.datasets]\nx='/x'\n[output]\nfile='b'\n[output.datasets]\ny='/y'",
     "missing table [model]"),
    (BASE + "[run]\nbatch_timeout = nan\n", "[run] batch_timeout must be a number of seconds from 0 (off)"),
    (BASE + "[run]\nbatch_timeout = inf\n", "to 10,000,000, got inf"),
    (BASE + "[run]\nbatch_timeout = -1\n", "[run] batch_timeout must be"),
])
def test_bad_job_files_name_the_key(text, needle):
    with pytest.raises(SpecError) as err:
        parse(text)
    assert needle in str(err.value)


def test_multi_graph_program_and_stages():
    text = BASE.replace('files = "model/device{rank}/net.mindir"\nranks = 2',
                        'files = ["g0_{rank}.mindir", "g1_{rank}.mindir"]\nranks = 4\nstages = 2')
    spec = parse(text + '[[steps]]\ngraph = 0\n[[steps]]\ngraph = 1\nrepeat = 10\nfeed = { h = "output0" }\n')
    assert spec.model.ranks_per_stage == 2 and spec.model.handoff == "host"
    assert spec.model.graph_paths(3) == [Path("/jobs/demo/g0_3.mindir"), Path("/jobs/demo/g1_3.mindir")]
    assert [(s.graph, s.repeat, s.feed) for s in spec.steps] == [(0, 1, ()), (1, 10, (("h", "output0"),))]
    assert [s.name for s in spec.steps] == ["step1", "step2"]


def test_outputs_and_inputs_from_any_step():
    text = BASE.replace('files = "model/device{rank}/net.mindir"',
                        'files = ["g0_{rank}.mindir", "g1_{rank}.mindir"]')
    text = text.replace('y = "/y"', 'y = "/y"\nz = "/z"')
    spec = parse(text + '[output.from]\nz = "init.output0"\ny = "step2.h"\n'
                 '[[steps]]\ngraph = 0\nname = "init"\n'
                 '[[steps]]\ngraph = 1\ninputs = { h = "init.output0", x = "x" }\n')
    assert spec.output.sources == (("y", "step2.h"), ("z", "init.output0"))  # in output order
    assert [(s.name, s.inputs) for s in spec.steps] == [
        ("init", ()), ("step2", (("h", "init.output0"), ("x", "x")))]


def test_toml_error_names_the_line(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(BASE + "\n[input]\nbroken line\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "line" in message and "\n" not in message


def test_missing_job_file(tmp_path):
    with pytest.raises(SpecError, match="job file not found"):
        load_spec(tmp_path / "nope.toml")


def test_rank_format_spec_is_allowed():
    spec = parse(BASE.replace("{rank}", "{rank:03d}"))
    assert spec.model.slice_path(7).name == "net.mindir" and "device007" in str(spec.model.slice_path(7))


def test_threads_split_cores_between_local_ranks():
    spec = parse()
    assert threads_for(spec.device, 10_000) == 1
    assert threads_for(parse(extra="[device]\nthreads = 3\n").device, 8) == 3


def test_ranks_share_only_the_cores_their_masks_have_in_common():
    every = frozenset(range(8))
    assert sharing([every] * 4, node_rank=2) == 4                      # unbound: all share
    assert sharing([frozenset({c}) for c in range(4)], node_rank=1) == 1  # bound to a core each
    sockets = [frozenset(range(4))] * 2 + [frozenset(range(4, 8))] * 2    # bound to a socket
    assert sharing(sockets, node_rank=3) == 2


def test_ranks_sharing_a_mask_take_its_cores_in_turn():
    both = frozenset({0, 1})
    assert [core_share([both] * 2, r, 1) for r in range(2)] == [{0}, {1}]   # two replicas
    assert [min(core_share([both] * 8, r, 1)) for r in range(8)] == [0, 1] * 4
    assert core_share([both] * 2, 1, 2) == both and core_share([both] * 2, 0, 5) == both
    quads = [frozenset(range(4))] * 4
    assert [sorted(core_share(quads, r, 2)) for r in range(4)] == [[0, 1], [2, 3]] * 2
    bound = [frozenset({c}) for c in range(4)]                  # a launcher bound them
    assert [core_share(bound, r, 1) for r in range(4)] == bound
    sockets = [frozenset(range(4))] * 2 + [frozenset(range(4, 8))] * 2
    assert [sorted(core_share(sockets, r, 2)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_prefetch_and_commit_threads_take_the_cores_left_over():
    both, one = frozenset({0, 1}), DeviceSpec(threads=1)
    # Cores left over go to the helpers, beside every rank's kernels.
    assert helper_cores([both], 0, one) == {1}
    quads = [frozenset(range(4))] * 2
    assert [helper_cores(quads, r, one) for r in range(2)] == [{2, 3}] * 2
    assert helper_cores([frozenset(range(5))] * 2, 1, one) == {2, 3, 4}
    # Fewer left over than ranks that share them (a remainder, 3 ranks on 4 cores): not pinned.
    assert [helper_cores([frozenset(range(4))] * 3, r, DeviceSpec()) for r in range(3)] == \
        [frozenset()] * 3
    assert helper_cores([frozenset(range(16))] * 15, 0, DeviceSpec()) == frozenset()
    # None left over (a core per rank, unbound or bound; no threads set): not pinned.
    assert [helper_cores([both] * 2, r, one) for r in range(2)] == [frozenset()] * 2
    assert [helper_cores([both] * 2, r, DeviceSpec()) for r in range(2)] == [frozenset()] * 2
    bound = [frozenset({c}) for c in range(4)]
    assert [helper_cores(bound, r, DeviceSpec()) for r in range(4)] == [frozenset()] * 4
    assert [helper_cores(quads, r, DeviceSpec()) for r in range(2)] == [frozenset()] * 2
    assert helper_cores([both] * 8, 3, one) == frozenset()


def fields(*specs):
    return [InputField(name, f"/{name}", dtype, shape) for name, dtype, shape in specs]


def test_bind_inputs_by_name_then_position():
    declared = [TensorInfo("x", (None, 4), np.dtype("float32")), TensorInfo("k", (None, 3), np.dtype("int32"))]
    by_name = fields(("k", "<i4", (3,)), ("x", "<f4", (4,)))
    assert bind_inputs(declared, by_name, Path("m")) == [1, 0]
    positional = fields(("a", "<f4", (4,)), ("b", "<i4", (3,)))
    assert bind_inputs(declared, positional, Path("m")) == [0, 1]
    with pytest.raises(BackendError, match="names 1 input"):
        bind_inputs(declared, positional[:1], Path("m"))


@pytest.mark.parametrize("dtype, shape", [("<f8", (4,)), ("<f4", (5,)), ("<f4", (4, 1))])
def test_bind_inputs_never_casts_or_reshapes(dtype, shape):
    declared = [TensorInfo("x", (None, 4), np.dtype("float32"))]
    with pytest.raises(DataError, match="does not fit model input x float32"):
        bind_inputs(declared, fields(("x", dtype, shape)), Path("m"))


def test_packet_header_round_trip():
    arrays = [np.zeros((5, 2), np.float32), np.zeros((5,), np.int32), np.zeros((5, 1, 3), np.bool_)]
    kind, start, rows, layout = unpack_header(pack_header(1, 640, 5, arrays))
    assert (kind, start, rows) == (1, 640, 5)
    assert layout == [(np.dtype("float32"), (5, 2)), (np.dtype("int32"), (5,)), (np.dtype("bool"), (5, 1, 3))]


def test_layout_checks_before_combining():
    f32 = [np.dtype("float32")] * 2
    check_layout("y", Combine("concat", -1), [(5, 2), (5, 2)], f32, 5)
    check_layout("y", Combine("concat", 1), [(5, 2), (5, 1)], f32, 5)
    check_layout("k", Combine("sum"), [(5,), (5,)], f32, 5)
    with pytest.raises(BackendError, match="does not fit"):
        check_layout("k", Combine("concat", -1), [(5,), (5,)], f32, 5)
    with pytest.raises(BackendError, match="keep the batch's rows"):
        check_layout("y", Combine("sum"), [(5, 2), (5, 2)], f32, 6)
    with pytest.raises(BackendError, match="sum needs equal shapes"):
        check_layout("y", Combine("sum"), [(5, 2), (5, 1)], f32, 5)
    with pytest.raises(BackendError, match="different dtypes"):
        check_layout("y", Combine("sum"), [(5, 2), (5, 2)], [np.dtype("float32"), np.dtype("int32")], 5)


def test_fixed_batch_padding_trims_outputs():
    seen = []

    def predict(arrays):
        seen.append(arrays[0].shape[0])
        return [arrays[0] * 2]

    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    (y,) = predict_in_fixed_batches(predict, [x], 4)
    assert seen == [4, 4]
    np.testing.assert_array_equal(y, x * 2)
