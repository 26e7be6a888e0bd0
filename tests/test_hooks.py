"""A job's Python next to the model ([input] preprocess, [output] postprocess), under real
mpiexec on the matmul slices, against numpy."""

import json

import h5py
import numpy as np
import pytest

from spmdinfer.errors import HookError, SpecError
from spmdinfer.hooks import Hook
from tests.conftest import assert_clean_error, matmul_job, read_h5, run_cli, write_h5, write_job

HOOKS = '''
import numpy as np

def widen(batch):            # float64 halves of the rows -> the float32 rows the model takes
    x = batch["half"]
    return {"x": np.concatenate([x, x], axis=1).astype(np.float32)}

def top(batch):              # the model's y -> the best column and its score
    y = batch["y"]
    return {"label": y.argmax(axis=1).astype(np.int32), "y": y.max(axis=1)}

def fails_at_rows_30(batch):
    if batch["half"][0, 0] >= 30:
        raise ValueError("no row past 29")
    return widen(batch)

def too_few_rows(batch):
    return {"x": widen(batch)["x"][1:]}

def drifts(batch):           # float32 first, float64 once past the first batch
    x = widen(batch)["x"]
    return {"x": x if batch["half"][0, 0] < 10 else x.astype(np.float64)}

def two_arguments(batch, other):
    return batch

def post_fails(batch):
    raise KeyError("z")

calls = 0

def post_fails_last(batch):  # on the fourth of five batches
    global calls
    calls += 1
    if calls == 4:
        raise KeyError("last")
    return batch
'''


@pytest.fixture
def hooked(tmp_path, matmul_slices):
    """A 2-rank matmul job whose input is float64 halves of the model's rows, widened by a
    preprocess; what makes it: (folder, weight, the input's halves)."""
    template, weight = matmul_slices
    (tmp_path / "hooks.py").write_text(HOOKS)
    half = np.random.default_rng(5).standard_normal((50, 48))
    half[:, 0] = np.arange(50)  # row i starts with i: the functions above see where they are
    write_h5(tmp_path / "in.h5", {"half": half})
    return tmp_path, template, weight, half


def hooked_job(folder, template, pre="hooks:widen", post="", ranks=2, **output):
    doc = matmul_job(folder, template, ranks=ranks, batch_size=10)
    doc["input"].update(datasets={"half": "/half"}, preprocess=pre)
    if post:
        doc["output"]["postprocess"] = post
    doc["output"].update(output)
    return write_job(folder, doc)


def expected_y(half, weight, ranks=2):
    x = np.concatenate([half, half], axis=1).astype(np.float32)
    return -(x @ weight[:, :2 * ranks])


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])  # 4: replica 1's leader reads and preprocesses its own batches
def test_preprocess_and_postprocess_around_the_model(hooked, n):
    folder, template, weight, half = hooked
    job = hooked_job(folder, template, post="hooks:top")
    result = run_cli("run", job, n=n)
    assert result.returncode == 0, result.stderr
    y = expected_y(half, weight)
    out = folder / "out" / "result.h5"
    with h5py.File(out, "r") as f:
        assert sorted(f) == ["label", "y"]
        assert f["label"].dtype == np.int32 and f["y"].shape == (50,)
    np.testing.assert_array_equal(read_h5(out, "/label"), y.argmax(axis=1))
    np.testing.assert_allclose(read_h5(out, "/y"), y.max(axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.mpi
def test_postprocess_names_its_datasets_where_the_job_puts_them(hooked):
    folder, template, weight, half = hooked
    job = hooked_job(folder, template, post="hooks:top", datasets={"y": "/scores/best"})
    assert run_cli("run", job, n=2).returncode == 0
    out = folder / "out" / "result.h5"
    np.testing.assert_allclose(read_h5(out, "/scores/best"), expected_y(half, weight).max(axis=1),
                               rtol=1e-5, atol=1e-5)
    assert read_h5(out, "/label").shape == (50,)


@pytest.mark.mpi
def test_a_preprocess_that_raises_names_itself_and_the_rows(hooked):
    folder, template, _, _ = hooked
    job = hooked_job(folder, template, pre="hooks:fails_at_rows_30")
    result = run_cli("run", job, n=2)
    assert_clean_error(result, "[input] preprocess hooks:fails_at_rows_30 on rows 30..39",
                       "ValueError: no row past 29")
    assert not (folder / "out" / "result.h5").exists()


@pytest.mark.mpi
def test_a_postprocess_that_raises_names_itself_and_the_rows(hooked):
    folder, template, _, _ = hooked
    result = run_cli("run", hooked_job(folder, template, post="hooks:post_fails"), n=2)
    assert_clean_error(result, "[output] postprocess hooks:post_fails on rows 0..9 raised "
                               "KeyError: 'z'")
    assert not (folder / "out" / "result.h5").exists()
    assert not (folder / "out" / "result.h5.partial").exists()


@pytest.mark.mpi
def test_a_postprocess_that_raises_on_the_last_batch_ends_every_rank(hooked):
    """The fourth of five batches fails in rank 0's commit thread, which rank 0 mostly learns
    of in the fifth batch's commit. Rank 1 has taken the end of the input by then, and must
    still learn of the failure, not wait for rank 0 in the shared memory's collective free
    (without the barrier before it, 6 of 8 runs hung, 3 of 5 under pytest)."""
    folder, template, _, _ = hooked
    job = hooked_job(folder, template, post="hooks:post_fails_last")
    for _ in range(3):  # each run catches the hang about 3 times in 4
        result = run_cli("run", job, "--overwrite", n=2, timeout=60)  # over the parts left
        assert_clean_error(result, "[output] postprocess hooks:post_fails_last on rows 30..39 "
                                   "raised KeyError: 'last'")
    assert not (folder / "out" / "result.h5").exists()


@pytest.mark.mpi
@pytest.mark.parametrize("pre, needle", [
    ("hooks:too_few_rows", "returned 9 rows of x; expected 10, one per row it was given"),
    ("hooks:drifts", "on rows 10..19 returned x float64 (rows, 96); the first batch returned "
                     "x float32 (rows, 96)"),
])
def test_a_preprocess_must_keep_its_rows_and_its_types(hooked, pre, needle):
    folder, template, _, _ = hooked
    result = run_cli("run", hooked_job(folder, template, pre=pre), n=2)
    assert_clean_error(result, needle)
    assert not (folder / "out" / "result.h5").exists()


@pytest.mark.parametrize("pre, needle", [
    ("nowhere:widen", "[input] preprocess nowhere:widen: cannot import nowhere from"),
    ("hooks:missing", "[input] preprocess hooks:missing: missing is not defined in"),
    ("hooks:two_arguments", "must take one argument (a batch's named arrays), its signature is "
                            "(batch, other)"),
    ("hooks", '[input] preprocess must name a function as "module:function"'),
])
def test_validate_refuses_a_function_it_cannot_use(hooked, pre, needle):
    folder, template, _, _ = hooked
    assert_clean_error(run_cli("validate", hooked_job(folder, template, pre=pre)), needle)


def test_validate_checks_what_the_preprocess_returns_against_the_slices(hooked):
    folder, template, _, _ = hooked
    result = run_cli("validate", hooked_job(folder, template))
    assert result.returncode == 0, result.stderr
    assert "x <- float32 (rows, 96) from [input] preprocess hooks:widen" in result.stdout
    (folder / "hooks.py").write_text(HOOKS.replace("axis=1)", "axis=1)[:, :90]"))
    assert_clean_error(run_cli("validate", hooked_job(folder, template)),
                       "[input] preprocess output x: float32 (rows, 90) from [input] preprocess "
                       "hooks:widen does not fit model input")


def test_a_hook_checks_what_it_returns(tmp_path):
    hook = Hook("[output] postprocess", "m:f", lambda batch: batch)
    rows = {"y": np.zeros((4, 2), np.float32)}
    assert hook(rows, 0, 4)["y"].shape == (4, 2)
    with pytest.raises(HookError, match=r"on rows 4..7 returned y float64 \(rows, 2\); the first "
                                        r"batch returned y float32 \(rows, 2\)"):
        hook({"y": np.zeros((4, 2))}, 4, 4)
    for bad, needle in [(lambda b: [1], "returned list; expected a dict"),
                        (lambda b: {"y": np.array(["a"] * 4)}, "returned y as <U1"),
                        (lambda b: {"y": 1.0}, "returned y as float64 of shape ()")]:
        with pytest.raises(HookError, match=needle):
            Hook("[output] postprocess", "m:f", bad)(rows, 0, 4)
    with pytest.raises(SpecError, match="cannot import"):
        Hook.load("[input] preprocess", "no_such_module_here:f", tmp_path)


@pytest.mark.mpi
def test_a_resumed_run_writes_the_postprocessed_datasets_it_committed(hooked):
    folder, template, weight, half = hooked
    job = hooked_job(folder, template, pre="hooks:fails_at_rows_30", post="hooks:top")
    assert run_cli("run", job, n=2).returncode == 2  # batches 0..2 committed, then the failure
    manifest = json.loads((folder / "out" / "result.h5.parts" / "manifest.json").read_text())
    assert manifest["written"] == [["label", "/label"], ["y", "/y"]]
    (folder / "hooks.py").write_text(HOOKS.replace('raise ValueError("no row past 29")', "pass"))
    result = run_cli("run", job, "--resume", n=2)
    assert result.returncode == 0, result.stderr
    out = folder / "out" / "result.h5"
    np.testing.assert_array_equal(read_h5(out, "/label"), expected_y(half, weight).argmax(axis=1))


@pytest.mark.mpi
def test_the_readme_example_runs_as_written(tmp_path, matmul_slices):
    from tests.conftest import REPO

    template, weight = matmul_slices
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Python next to the model"):]
    begin = section.index("```python\n") + len("```python\n")
    code = section[begin:section.index("\n```", begin)]
    (tmp_path / "prep.py").write_text(code)
    pixels = np.random.default_rng(6).integers(0, 256, (30, 96), dtype=np.uint8)
    write_h5(tmp_path / "in.h5", {"pixels": pixels})
    doc = matmul_job(tmp_path, template, ranks=2, batch_size=8)
    doc["input"].update(datasets={"pixels": "/pixels"}, preprocess="prep:normalise")
    doc["output"]["postprocess"] = "prep:top1"
    result = run_cli("run", write_job(tmp_path, doc), n=2)
    assert result.returncode == 0, result.stderr
    x = pixels.astype(np.float32)
    y = -(((x - x.mean(axis=1, keepdims=True)) / 255) @ weight[:, :4])
    out = tmp_path / "out" / "result.h5"
    np.testing.assert_array_equal(read_h5(out, "/label"), y.argmax(axis=1))
    np.testing.assert_allclose(read_h5(out, "/score"), y.max(axis=1), rtol=1e-5, atol=1e-6)


EXIT_MARKS = '''
import atexit, os
from hooks import fails_at_rows_30, widen  # noqa: F401  (the job's preprocesses)

HERE = os.path.dirname(os.path.abspath(__file__))

class Teardown:
    def __del__(self, os=os, path=os.path.join(HERE, f"teardown-{os.getpid()}")):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY))  # runs in the teardown only

keep = Teardown()
atexit.register(lambda: open(os.path.join(HERE, f"atexit-{os.getpid()}"), "w").close())
'''


@pytest.mark.mpi
@pytest.mark.parametrize("pre, finished", [("exits:widen", True), ("exits:fails_at_rows_30", False)])
def test_a_finished_run_leaves_without_the_interpreters_teardown(hooked, pre, finished):
    """A run every rank ended alike exits past the interpreter's teardown (spmdinfer.exiting:
    with MindSpore loaded it took seconds of an 8-rank job's exit), its atexit hooks run; a
    failed run exits as Python does."""
    folder, template, _, _ = hooked
    (folder / "exits.py").write_text(EXIT_MARKS)
    result = run_cli("run", hooked_job(folder, template, pre=pre), n=2)
    assert (result.returncode == 0) == finished, result.stderr
    marks = sorted(p.name.split("-")[0] for p in folder.iterdir()
                   if p.name.split("-")[0] in ("atexit", "teardown"))
    assert marks == (["atexit"] if finished else ["atexit", "teardown"]), (marks, result.stderr)
