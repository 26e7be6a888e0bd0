"""Replicas, pipeline stages and multi-graph programs under real mpiexec, against numpy;
every row exactly once and in input order, on row counts not divisible by the batch."""

import json

import h5py
import numpy as np
import pytest

from tests import cells
from tests.conftest import (assert_clean_error, dynamic, export_mindir, read_h5, run_cli, write_h5,
                            write_job)


def ok(result):
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


def job(folder, files, ranks, batch_size, combine="rank0", **model):
    return {
        "model": {"files": files, "ranks": ranks, **model},
        "input": {"file": "in.h5", "batch_size": batch_size, "datasets": {"x": "/x"}},
        "output": {"file": "out.h5", "datasets": {"y": "/y"}, "combine": {"y": combine}},
    }


def rows_input(folder, rows, columns, seed=0):
    # Row i starts with i, so a row out of place or written twice cannot go unnoticed.
    x = np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32)
    x[:, 0] = np.arange(rows)
    write_h5(folder / "in.h5", {"x": x}, chunks=(min(13, rows), columns))
    return x


@pytest.fixture(scope="session")
def dense_slices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    rng = np.random.default_rng(10)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    export_mindir(cells.Dense(w1, relu=True), [dynamic(8)], folder / "pipe1_0.mindir")
    export_mindir(cells.Dense(w2), [dynamic(16)], folder / "pipe1_1.mindir")
    for r in range(2):  # 2 stages x 2 ranks: column halves of each layer
        export_mindir(cells.Dense(w1[:, 8 * r:8 * r + 8], relu=True), [dynamic(8)],
                      folder / f"pipe2_{r}.mindir")
        export_mindir(cells.Dense(w2[:, 2 * r:2 * r + 2]), [dynamic(16)],
                      folder / f"pipe2_{2 + r}.mindir")
    export_mindir(cells.Dense(w1, relu=True), [dynamic(8)], folder / "single_0.mindir")
    return folder, w1, w2


def test_two_replicas_of_one_rank(tmp_path, dense_slices):
    folder, w1, _ = dense_slices
    x = rows_input(tmp_path, 1001, 8)
    path = write_job(tmp_path, job(tmp_path, str(folder / "single_{rank}.mindir"), 1, 64))
    ok(run_cli("run", path, n=2))
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), np.maximum(x @ w1, 0),
                               rtol=1e-5, atol=1e-5)
    with h5py.File(tmp_path / "out.h5") as f:
        assert f.attrs["replicas"] == 2 and f.attrs["world_size"] == 2 and f.attrs["batches"] == 16


def test_two_replicas_of_four_ranks_with_sum(tmp_path, mlp_slices):
    template, weights = mlp_slices
    x = rows_input(tmp_path, 203, 16)
    path = write_job(tmp_path, job(tmp_path, str(template), 4, 16, "sum"))
    ok(run_cli("run", path, n=8))
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), cells.mlp_reference(x, *weights),
                               rtol=1e-5, atol=1e-5)


def test_two_stages_of_one_rank(tmp_path, dense_slices):
    folder, w1, w2 = dense_slices
    x = rows_input(tmp_path, 150, 8)
    path = write_job(tmp_path, job(tmp_path, str(folder / "pipe1_{rank}.mindir"), 2, 16, stages=2))
    ok(run_cli("run", path, n=2))
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), np.maximum(x @ w1, 0) @ w2,
                               rtol=1e-4, atol=1e-4)


def test_two_stages_of_two_ranks_concat_inside_a_stage(tmp_path, dense_slices):
    folder, w1, w2 = dense_slices
    x = rows_input(tmp_path, 99, 8)
    path = write_job(tmp_path, job(tmp_path, str(folder / "pipe2_{rank}.mindir"), 4, 10,
                                   "concat:-1", stages=2, stage_combine="concat:-1"))
    ok(run_cli("run", path, n=4))
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), np.maximum(x @ w1, 0) @ w2,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.launcher
def test_two_replicas_of_two_stages(tmp_path, dense_slices):
    folder, w1, w2 = dense_slices
    x = rows_input(tmp_path, 77, 8)
    path = write_job(tmp_path, job(tmp_path, str(folder / "pipe1_{rank}.mindir"), 2, 8, stages=2))
    ok(run_cli("run", path, n=4))
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), np.maximum(x @ w1, 0) @ w2,
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="session")
def program_slices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("program")
    a = np.random.default_rng(11).standard_normal((6, 4)).astype(np.float32)
    export_mindir(cells.InitGraph(a), [dynamic(6)], folder / "init_0.mindir")
    export_mindir(cells.StepGraph(), [dynamic(4), dynamic(6)], folder / "step_0.mindir")
    return folder, a


def test_two_graph_program_with_repeat_and_feed(tmp_path, program_slices):
    folder, a = program_slices
    x = rows_input(tmp_path, 45, 6)
    doc = job(tmp_path, [str(folder / "init_{rank}.mindir"), str(folder / "step_{rank}.mindir")], 1, 8)
    doc["steps"] = [{"graph": 0}, {"graph": 1, "repeat": 10, "feed": {"h": "output0"}}]
    ok(run_cli("run", write_job(tmp_path, doc), n=2))  # 2 replicas of the program
    h = x @ a
    for _ in range(10):
        h = 0.5 * h + x[:, :4]
    np.testing.assert_allclose(read_h5(tmp_path / "out.h5", "/y"), h, rtol=1e-4, atol=1e-4)


def test_outputs_from_any_step_and_inputs_from_an_earlier_one(tmp_path, program_slices):
    """[output.from] takes outputs from any step; a step's `inputs` take an earlier step's
    output (not the one just before) and a field of the batch by name."""
    folder, a = program_slices
    x = rows_input(tmp_path, 45, 6)
    doc = job(tmp_path, [str(folder / "init_{rank}.mindir"), str(folder / "step_{rank}.mindir")], 1, 8)
    doc["steps"] = [{"graph": 0, "name": "init"},
                    {"graph": 1, "repeat": 3, "feed": {"h": "output0"}, "inputs": {"x": "x"}},
                    {"graph": 1, "inputs": {"h": "init.output0", "x": "x"}}]
    doc["output"] = {"file": "out.h5", "datasets": {"h0": "/h0", "loop": "/loop", "once": "/once"},
                     "from": {"h0": "init.output0", "loop": "step2.output0", "once": "step3.output0"}}
    path = write_job(tmp_path, doc)
    shown = ok(run_cli("plan", path, "-n", 2)).stdout
    assert "  step2: graph 1 3 times; x <- x, h <- output0 of the step before" in shown
    assert "  step3: graph 1 once; h <- init.output0, x <- x" in shown
    assert "  outputs: h0 <- init.output0, loop <- step2.output0, once <- step3.output0" in shown
    described = json.loads(ok(run_cli("plan", path, "-n", 2, "--json")).stdout)["program"]
    assert [s["name"] for s in described["steps"]] == ["init", "step2", "step3"]
    ok(run_cli("run", path, n=2))
    h0 = x @ a
    loop = h0
    for _ in range(3):
        loop = 0.5 * loop + x[:, :4]
    for name, expected in [("h0", h0), ("loop", loop), ("once", 0.5 * h0 + x[:, :4])]:
        np.testing.assert_allclose(read_h5(tmp_path / "out.h5", name), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="session")
def counting_slices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("counting")
    export_mindir(cells.ZeroColumn(), [dynamic(3)], folder / "zero_0.mindir")
    export_mindir(cells.CountTo(), [dynamic(1), dynamic(3)], folder / "count_0.mindir")
    return folder


def test_a_repeated_step_collects_its_outputs_until_every_row_stops(tmp_path, counting_slices):
    """A generation loop: each repeat gives one value per row (h) and an end flag (stop);
    every repeat's outputs are stacked along axis 1, the loop stops once every row of the
    batch has given stop = 1, after a row's end the values are padded, and `length` says
    how many repeats each row took."""
    rows, most = 23, 5
    x = np.zeros((rows, 3), np.float32)
    x[:, 0] = np.arange(rows) % 7 + 1   # row limits 1..7: some stop early, some never;
    x[:8, 0] = [1, 2, 3, 1, 2, 3, 2, 1]  # the first batch stops after 3 repeats of 5
    write_h5(tmp_path / "in.h5", {"x": x})
    doc = job(tmp_path, [str(counting_slices / "zero_{rank}.mindir"),
                         str(counting_slices / "count_{rank}.mindir")], 1, 8)
    doc["steps"] = [{"graph": 0},
                    {"graph": 1, "repeat": most, "feed": {"h": "output0"}, "inputs": {"x": "x"},
                     "collect": True, "until": {"output": "output1", "equals": 1}}]
    doc["output"] = {"file": "out.h5", "datasets": {"h": "/h", "stop": "/stop", "n": "/n"},
                     "from": {"h": "step2.output0", "stop": "step2.output1", "n": "step2.length"}}
    path = write_job(tmp_path, doc)
    assert "step2: graph 1 up to 5 times, until every row's output1 holds 1" in \
        ok(run_cli("plan", path, "-n", 2)).stdout
    ok(run_cli("run", path, n=2))
    lengths = np.minimum(x[:, 0], most).astype(np.int32)
    h, stop, n = (read_h5(tmp_path / "out.h5", name) for name in ("h", "stop", "n"))
    assert h.shape == (rows, most, 1) and stop.shape == (rows, most, 1) and n.dtype == np.int32
    np.testing.assert_array_equal(n, lengths)
    t = np.arange(most)[None, :]
    np.testing.assert_array_equal(h[:, :, 0], np.where(t < lengths[:, None], t + 1, 0))
    reached = x[:, :1] <= most  # rows that gave their end flag: 1 there and after
    np.testing.assert_array_equal(stop[:, :, 0], np.where(t < lengths[:, None] - 1, 0,
                                                          np.where(reached, 1, 0)))


@pytest.mark.parametrize("change, needle, also", [
    ({"steps": [{"graph": 0}, {"graph": 1, "repeat": 3, "feed": {"h": "output0"},
                               "until": {"output": "output3", "equals": 1}}]},
     "[[steps]] step2 until output 'output3': graph 1 (", "has no such output; its outputs: output0"),
    ({"from": {"y": "step1.output7"}},
     '[output.from] y = "step1.output7": graph 0 (', "has no output 'output7'; its outputs: output0"),
    ({"steps": [{"graph": 0}, {"graph": 1, "inputs": {"h": "step1.output0", "x": "q"}}]},
     '[[steps]] step2 inputs x = "q": the batch has no field \'q\'; it has x', None),
    ({"steps": [{"graph": 0}, {"graph": 1, "inputs": {"h": "step1.output0"}}]},
     "[[steps]] step2 (graph 1): input 'x' of ", "comes from nowhere: name it in inputs (or feed)"),
])
def test_a_bad_program_is_refused_by_validate_before_any_model_loads(tmp_path, program_slices,
                                                                   change, needle, also):
    folder, _ = program_slices
    rows_input(tmp_path, 5, 6)
    doc = job(tmp_path, [str(folder / "init_{rank}.mindir"), str(folder / "step_{rank}.mindir")], 1, 8)
    doc["steps"] = change.get("steps", [{"graph": 0}, {"graph": 1, "feed": {"h": "output0"}}])
    if "from" in change:
        doc["output"]["from"] = change["from"]
    path = write_job(tmp_path, doc)
    for command in ("validate", "run"):  # run finds it as the program binds, after loading
        result = run_cli(command, path, env={"SPMDINFER_LOG_LEVEL": "INFO"})
        assert_clean_error(result, needle, *([also] if also else []))
        assert command == "run" or "loaded" not in result.stderr
    assert not (tmp_path / "out.h5").exists()


def test_feed_that_names_no_input_is_refused(tmp_path, program_slices):
    folder, _ = program_slices
    rows_input(tmp_path, 5, 6)
    doc = job(tmp_path, [str(folder / "init_{rank}.mindir"), str(folder / "step_{rank}.mindir")], 1, 8)
    doc["steps"] = [{"graph": 0}, {"graph": 1, "feed": {"hidden": "output0"}}]
    assert_clean_error(run_cli("run", write_job(tmp_path, doc), n=1), "feed names input 'hidden'",
                       "has inputs h, x")
    assert not (tmp_path / "out.h5").exists()


@pytest.fixture(scope="session")
def graph_handoff_slices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("handoff")
    w = np.random.default_rng(12).standard_normal((8, 3)).astype(np.float32)
    value = np.arange(24, dtype=np.float32).reshape(8, 3)
    export_mindir(cells.Dense(w), [dynamic(8)], folder / "g_0.mindir")
    export_mindir(cells.Constant(value), [], folder / "g_1.mindir")
    return folder, value


def test_graph_handoff_takes_the_last_stage_outputs(tmp_path, graph_handoff_slices):
    folder, value = graph_handoff_slices
    rows_input(tmp_path, 20, 8)  # batches of 8: the last stage's fixed batch, trimmed to 4 at the end
    path = write_job(tmp_path, job(tmp_path, str(folder / "g_{rank}.mindir"), 2, 8, stages=2,
                                   handoff="graph"))
    ok(run_cli("run", path, n=2))
    expected = np.concatenate([value, value, value[:4]])
    np.testing.assert_array_equal(read_h5(tmp_path / "out.h5", "/y"), expected)


@pytest.mark.launcher
def test_world_size_not_a_multiple_of_ranks(tmp_path, mlp_slices):
    template, _ = mlp_slices
    rows_input(tmp_path, 10, 16)
    path = write_job(tmp_path, job(tmp_path, str(template), 4, 16, "sum"))
    assert_clean_error(run_cli("run", path, n=6), "world size 6 is not a multiple of [model] ranks = 4")


def test_plan_shows_where_each_slice_runs(tmp_path, dense_slices):
    folder, _, _ = dense_slices
    doc = job(tmp_path, str(folder / "pipe2_{rank}.mindir"), 4, 10, stages=2)
    doc["device"] = {"target": "gpu"}
    path = write_job(tmp_path, doc)
    result = run_cli("plan", path, "-n", 8, "--per-node", 4, "--json")
    assert result.returncode == 0, result.stderr
    ranks = json.loads(result.stdout)["ranks"]
    assert [(r["replica"], r["stage"], r["model_rank"], r["node"], r["device_id"]) for r in ranks] == [
        (0, 0, 0, 0, 0), (0, 0, 1, 0, 1), (0, 1, 2, 0, 2), (0, 1, 3, 0, 3),
        (1, 0, 0, 1, 0), (1, 0, 1, 1, 1), (1, 1, 2, 1, 2), (1, 1, 3, 1, 3)]
    assert all(r["exists"] for r in ranks) and ranks[6]["files"] == [str(folder / "pipe2_2.mindir")]
    doc["device"] = {"target": "gpu", "device_id": 0}
    result = run_cli("plan", write_job(tmp_path, doc), "-n", 4)
    assert result.returncode == 2 and "ranks 0 and 1 would share a device" in result.stderr
    doc["model"]["files"] = str(folder / "missing_{rank}.mindir")
    result = run_cli("plan", write_job(tmp_path, doc), "-n", 4)
    assert result.returncode == 2 and "missing for rank(s) [0, 1, 2, 3]" in result.stderr
    assert "NO" in result.stdout
