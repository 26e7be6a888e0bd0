"""The MindSpore Lite backend against tests/fake_mindspore_lite.py, a stand-in for the Lite
package that cannot be installed here: the Context it builds per rank, resize and padding,
and one real in-process run; plus the MPI-library check on fabricated ELF files."""

import importlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from spmdinfer import backends
from spmdinfer.backends import Placement, TensorInfo
from spmdinfer.backends import mslite as mslite_backend
from spmdinfer.input import InputField
from spmdinfer.errors import BackendError
from spmdinfer.program import bind_inputs
from spmdinfer.runner import run_job
from spmdinfer.spec import load_spec, parse_spec
from spmdinfer.topology import device_for
from tests import fake_mindspore_lite
from tests.conftest import REPO, read_h5, write_h5, write_job

W = np.arange(12, dtype=np.float32).reshape(3, 4) - 5


@pytest.fixture
def lite(monkeypatch):
    """The stand-in, fresh for each test, installed as `mindspore_lite`."""
    module = importlib.reload(fake_mindspore_lite)
    monkeypatch.setitem(sys.modules, "mindspore_lite", module)
    return module


def model_file(lite, folder: Path, name="slice.mindir", inputs=(("x", [-1, 3], np.float32),),
               function=lambda x: x @ W, **options) -> Path:
    """An (empty) slice file that the stand-in runs as `function`."""
    path = folder / name
    path.write_bytes(b"")
    lite.register(path, function, inputs, **options)
    return path


def place(target="cpu", device_id=None, rank_id=0, threads=2, provider="", config_file=None,
          cores=None):
    return Placement(target=target, device_id=device_id, rank_id=rank_id, threads=threads,
                     provider=provider, config_file=config_file, cores=cores)


def ascend_spec(folder: Path, files: str, ranks: int):
    """A job for `ranks` Ascend ranks with GE and one Lite config ini per rank."""
    return parse_spec(f'[model]\nfiles = "{files}"\nranks = {ranks}\n'
                      '[device]\ntarget = "ascend"\nprovider = "ge"\nconfig_file = "lite{rank}.ini"\n'
                      '[input]\nfile = "in.h5"\ndatasets = {x = "/x"}\n'
                      '[output]\nfile = "out.h5"\ndatasets = {y = "/y"}\n', folder / "job.toml")


def built(lite) -> list[tuple]:
    """The (model_path, model_type, context, config_path) of every build_from_file call."""
    return [args for name, args in lite.CALLS if name == "build_from_file"]


def calls(lite, name: str) -> list:
    return [args for call, args in lite.CALLS if call == name]


def test_cpu_context_sets_thread_count(lite, tmp_path):
    path = model_file(lite, tmp_path)
    session = mslite_backend.open_session(path, place(threads=3), {})
    [(model_path, model_type, context, config)] = built(lite)
    assert (model_path, model_type, config) == (str(path), lite.ModelType.MINDIR, "")
    assert context.target == ["cpu"] and context.cpu.thread_num == 3
    assert [c for c, _ in lite.CALLS if "." in c] == ["context.target", "cpu.thread_num"]
    assert session.version == "2.0.0"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_cpu_threads_are_bound_to_the_ranks_cores_when_fewer_than_its_mask(lite, tmp_path, target,
                                                                          monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    path = model_file(lite, tmp_path)
    mslite_backend.open_session(path, place(target, threads=2, cores=frozenset({3, 1})), {})
    mslite_backend.open_session(path, place(target, threads=4, cores=frozenset({0, 1, 2, 3})), {})
    [(_, _, part, _), (_, _, whole, _)] = built(lite)
    assert part.cpu.thread_affinity_core_list == [1, 3] and part.cpu.thread_num == 2
    assert whole.cpu.thread_affinity_core_list == []  # the whole mask: not bound, Lite's default
    assert calls(lite, "cpu.thread_affinity_core_list") == [[1, 3]]


def test_gpu_tensorrt_context_takes_the_placement_device(lite, tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(mslite_backend, "mpi_mismatch", lambda lib: "libmpi differs")
    monkeypatch.setattr(mslite_backend.log, "warning", lambda *args: warnings.append(args))
    path = model_file(lite, tmp_path)
    mslite_backend.open_session(path, place("gpu", device_id=3, provider="tensorrt"), {})
    [(_, _, context, _)] = built(lite)
    assert context.target == ["gpu"] and context.gpu.device_id == 3
    # As the Lite tutorial sets it; gpu.rank_id is read-only (Lite takes it from MPI).
    assert calls(lite, "gpu.device_id") == [3] and calls(lite, "gpu.provider") == ["tensorrt"]
    assert warnings == [("%s", "libmpi differs")]


def test_ascend_ge_with_a_config_ini_per_rank(lite, tmp_path):
    lite.use_api("later")
    spec = ascend_spec(tmp_path, "slice.mindir", ranks=1)
    (tmp_path / "lite5.ini").write_text("[ascend_context]\nrank_table_file = /etc/hccl.json\n")
    path = model_file(lite, tmp_path)
    placement = place("ascend", device_for(spec.device, 1), rank_id=5,
                      provider=spec.device.provider, config_file=spec.device.config_path(5))
    mslite_backend.open_session(path, placement, {})
    [(_, _, context, config)] = built(lite)
    assert config == str(tmp_path.resolve() / "lite5.ini")
    assert context.target == ["ascend"]
    assert (context.ascend.device_id, context.ascend.rank_id, context.ascend.provider) == (1, 5, "ge")


def test_two_nodes_of_four_ranks_get_local_devices_and_global_ranks(lite, tmp_path):
    lite.use_api("later")
    spec = ascend_spec(tmp_path, "slice{rank}.mindir", ranks=8)
    for rank in range(8):
        spec.device.config_path(rank).write_text("[ascend_context]\n")
        path = model_file(lite, tmp_path, f"slice{rank}.mindir")
        mslite_backend.open_session(path, place("ascend", device_for(spec.device, rank % 4),
                                                rank_id=rank, provider="ge",
                                                config_file=spec.device.config_path(rank)), {})
    contexts = [context for _, _, context, _ in built(lite)]
    assert [c.ascend.device_id for c in contexts] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [c.ascend.rank_id for c in contexts] == list(range(8))
    assert [Path(config).name for *_, config in built(lite)] == [f"lite{r}.ini" for r in range(8)]


def test_lite_2_0_0_cannot_take_an_ascend_rank_or_provider(lite, tmp_path):
    path = model_file(lite, tmp_path)
    with pytest.raises(BackendError, match=r"2\.0\.0 cannot set context\.ascend\.rank_id"):
        mslite_backend.open_session(path, place("ascend", 1, rank_id=1), {})
    with pytest.raises(BackendError, match=r"context\.ascend\.provider"):
        mslite_backend.open_session(path, place("ascend", 0, provider="ge"), {})
    lite.CALLS.clear()
    mslite_backend.open_session(path, place("ascend", 0), {})  # one rank needs neither
    assert calls(lite, "ascend.device_id") == [0] and not calls(lite, "ascend.rank_id")


def test_short_last_batch_resizes_only_when_the_shape_changes(lite, tmp_path):
    session = mslite_backend.open_session(model_file(lite, tmp_path), place(), {})
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    for rows in (4, 4, 1, 1):
        np.testing.assert_allclose(session.predict([x[:rows]])[0], x[:rows] @ W, rtol=1e-6)
    assert calls(lite, "resize") == [[[4, 3]], [[1, 3]]]
    assert calls(lite, "predict") == [[[4, 3]], [[4, 3]], [[1, 3]], [[1, 3]]]


def test_fixed_batch_is_padded_when_lite_refuses_to_resize(lite, tmp_path, monkeypatch):
    monkeypatch.setattr(mslite_backend.log, "warning", lambda *args: None)
    path = model_file(lite, tmp_path, inputs=[("x", [4, 3], np.float32)], resizable=False)
    session = mslite_backend.open_session(path, place(), {})
    x = np.random.default_rng(1).standard_normal((10, 3)).astype(np.float32)
    np.testing.assert_allclose(session.predict([x])[0], x @ W, rtol=1e-6)
    np.testing.assert_allclose(session.predict([x[:2]])[0], x[:2] @ W, rtol=1e-6)
    assert calls(lite, "resize") == [[[10, 3]]]  # refused once, never asked again
    assert calls(lite, "predict") == [[[4, 3]]] * 4


def test_a_free_batch_that_cannot_resize_is_an_error(lite, tmp_path):
    session = mslite_backend.open_session(model_file(lite, tmp_path, resizable=False), place(), {})
    with pytest.raises(BackendError, match="no fixed batch to pad to"):
        session.predict([np.zeros((2, 3), np.float32)])


def test_inputs_keep_names_positions_and_dtypes(lite, tmp_path):
    inputs = [("ids", [-1], np.int32), ("x", [-1, 3], np.float32)]
    path = model_file(lite, tmp_path, inputs=inputs, function=lambda ids, x: (x @ W) * ids[:, None])
    session = mslite_backend.open_session(path, place(), {})
    assert session.inputs() == [TensorInfo("ids", (None,), np.dtype(np.int32)),
                                TensorInfo("x", (None, 3), np.dtype(np.float32))]
    assert session.outputs() == []  # the 2.0.0 Model has no get_outputs
    fields = [InputField("x", "/x", "float32", (3,)), InputField("ids", "/ids", "int32", ())]
    order = bind_inputs(session.inputs(), fields, path)
    assert order == [1, 0]
    x, ids = np.ones((2, 3), np.float32), np.array([2, -1], np.int32)
    arrays = [x, ids]
    np.testing.assert_allclose(session.predict([arrays[i] for i in order])[0],
                               (x @ W) * ids[:, None])


def test_later_lite_declares_outputs(lite, tmp_path):
    lite.use_api("later")
    path = model_file(lite, tmp_path)
    lite.register(path, lambda x: x @ W, [("x", [-1, 3], np.float32)],
                  outputs=[("y", [-1, 4], np.float32)])
    session = mslite_backend.open_session(path, place(), {})
    assert session.outputs() == [TensorInfo("y", (None, 4), np.dtype(np.float32))]


def test_the_stand_in_rejects_what_lite_rejects(lite, tmp_path):
    context = lite.Context()
    with pytest.raises(ValueError, match="non-negative"):
        context.gpu.device_id = -1
    with pytest.raises(TypeError, match="must be int"):
        context.ascend.device_id = "1"
    with pytest.raises(ValueError, match="target elements"):
        context.target = ["npu"]
    with pytest.raises(AttributeError):
        context.gpu.rank_id = 1  # get only in Lite too
    with pytest.raises(TypeError, match="model_path must be str"):
        lite.Model().build_from_file(tmp_path, lite.ModelType.MINDIR, context)
    with pytest.raises(BackendError, match=r"slice\.mindir.*gpu_device_id must be a non-negative"):
        mslite_backend.open_session(model_file(lite, tmp_path), place("gpu", device_id=-1), {})
    assert not calls(lite, "gpu.device_id")


def test_build_errors_name_the_slice(lite, tmp_path):
    unknown = tmp_path / "unknown.mindir"
    unknown.write_bytes(b"")
    with pytest.raises(BackendError, match=r"unknown\.mindir: MindSpore Lite cannot build .*cpu"):
        mslite_backend.open_session(unknown, place(), {})
    path = model_file(lite, tmp_path)
    with pytest.raises(BackendError, match="config_path does not exist"):
        mslite_backend.open_session(path, place(config_file=tmp_path / "missing.ini"), {})


def test_options_and_providers_are_checked(lite, tmp_path):
    path = model_file(lite, tmp_path)
    with pytest.raises(BackendError, match=r"unknown option 'workers' in \[backend\.mslite\]; "
                                           "valid options: none"):
        mslite_backend.open_session(path, place(), {"workers": 2})
    with pytest.raises(BackendError, match=r"provider = 'ge' does not fit target 'gpu'"):
        mslite_backend.open_session(path, place("gpu", 0, provider="ge"), {})
    with pytest.raises(BackendError, match=r"provider = 'tensorrt' does not fit target 'cpu'"):
        mslite_backend.open_session(path, place(provider="tensorrt"), {})


def test_auto_resolves_to_mslite_when_lite_is_importable(lite, monkeypatch):
    assert backends.resolve("auto", Path("m.mindir")) == "mslite"
    assert backends.resolve("auto", Path("m.onnx")) == "onnxruntime"
    assert backends.factory("mslite") is mslite_backend.open_session
    monkeypatch.delitem(sys.modules, "mindspore_lite")
    assert backends.resolve("auto", Path("m.mindir")) == "mindspore"


def test_importing_the_backend_does_not_import_lite(tmp_path):
    # A mindspore_lite that fails on import: finding it is fine, importing it is not.
    package = tmp_path / "mindspore_lite"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('mindspore_lite was imported')\n")
    code = ("import sys; from pathlib import Path; import spmdinfer.backends.mslite\n"
            "from spmdinfer import backends\n"
            "assert backends.resolve('auto', Path('m.mindir')) == 'mslite'\n"
            "assert 'mindspore_lite' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": ""})
    assert result.returncode == 0, result.stderr


def test_run_job_in_process_with_the_stand_in(lite, tmp_path):
    x = np.random.default_rng(3).standard_normal((21, 3)).astype(np.float32)
    write_h5(tmp_path / "in.h5", {"x": x})
    model_file(lite, tmp_path, inputs=[("x", [8, 3], np.float32)], function=lambda x: -(x @ W))
    job = write_job(tmp_path, {
        "model": {"files": "slice.mindir", "backend": "mslite"},
        "input": {"file": "in.h5", "batch_size": 8, "datasets": {"x": "/x"}},
        "output": {"file": "out.h5", "datasets": {"y": "/y"}},
    })
    summary = run_job(load_spec(job), comm=None, progress=False)
    assert (summary.rows, summary.batches) == (21, 3)
    y = read_h5(tmp_path / "out.h5", "/y")
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, -(x @ W), rtol=1e-6)
    assert calls(lite, "resize") == [[[5, 3]]]  # only the short last batch
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert (f.attrs["backend"], f.attrs["backend_version"]) == ("mslite", "2.0.0")


def write_elf(path: Path, needed=(), soname=None) -> Path:
    """A minimal ELF64 little-endian file holding only a .dynstr and a .dynamic section."""
    names = [*needed, *([soname] if soname else [])]
    strings, offsets = b"\0", []
    for name in names:
        offsets.append(len(strings))
        strings += name.encode() + b"\0"
    tags = [1] * len(needed) + [14] * bool(soname)
    dynamic = b"".join(struct.pack("<qQ", t, o) for t, o in zip(tags, offsets)) + bytes(16)
    shoff = 64 + len(strings) + len(dynamic)
    header = (b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) +
              struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 0))

    def section(kind, offset, size, link=0):
        return struct.pack("<IIQQQQIIQQ", 0, kind, 0, 0, offset, size, link, 0, 1, 0)

    sections = (section(0, 0, 0) + section(3, 64, len(strings)) +
                section(6, 64 + len(strings), len(dynamic), link=1))
    path.write_bytes(header + strings + dynamic + sections)
    return path


def maps_line(path: Path) -> str:
    return f"7f0000000000-7f0000001000 r-xp 00000000 08:01 1234                       {path}\n"


@pytest.fixture
def lite_lib(tmp_path):
    """A Lite lib/ folder whose TensorRT plugin links Open MPI's libmpi.so.40."""
    lib = tmp_path / "mindspore_lite" / "lib"
    lib.mkdir(parents=True)
    write_elf(lib / "libtensorrt_plugin.so", ["libcudart.so.11.0", "libmpi.so.40", "libc.so.6"])
    write_elf(lib / "libmindspore_core.so", ["libc.so.6"], soname="libmindspore_core.so")
    (lib / "libbroken.so").write_bytes(b"not an ELF file")
    return lib


def test_elf_dynamic_reads_needed_and_soname(tmp_path, lite_lib):
    assert mslite_backend.elf_dynamic(lite_lib / "libtensorrt_plugin.so") == {
        "NEEDED": ["libcudart.so.11.0", "libmpi.so.40", "libc.so.6"]}
    assert mslite_backend.elf_dynamic(lite_lib / "libmindspore_core.so")["SONAME"] == [
        "libmindspore_core.so"]
    assert mslite_backend.elf_dynamic(lite_lib / "libbroken.so") == {}
    assert mslite_backend.elf_dynamic(tmp_path / "missing.so") == {}


def test_mpi_mismatch_names_both_libraries(tmp_path, lite_lib):
    mpich = write_elf(tmp_path / "libmpi.so.12.4.0", ["libc.so.6"], soname="libmpi.so.12")
    problem = mslite_backend.mpi_mismatch(lite_lib, maps_line(mpich))
    assert problem.startswith("MindSpore Lite's libtensorrt_plugin.so links libmpi.so.40 but "
                              f"mpi4py loaded {mpich} (libmpi.so.12)")
    openmpi = write_elf(tmp_path / "libmpi.so.40.30.0", soname="libmpi.so.40")
    assert mslite_backend.mpi_mismatch(lite_lib, maps_line(openmpi)) is None
    assert mslite_backend.mpi_mismatch(lite_lib, "") is None  # no libmpi loaded: nothing to compare
    assert mslite_backend.mpi_mismatch(tmp_path / "nowhere", maps_line(mpich)) is None


def test_mpi_mismatch_reads_this_process_maps(tmp_path):
    from mpi4py import MPI  # noqa: F401  (loads this host's libmpi)

    lib = tmp_path / "lib"
    lib.mkdir()
    write_elf(lib / "libplugin.so", ["libmpi.so.999"])
    problem = mslite_backend.mpi_mismatch(lib)
    assert problem and "links libmpi.so.999 but mpi4py loaded /" in problem
