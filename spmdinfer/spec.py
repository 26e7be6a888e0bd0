"""The job file: parsed once, strictly, into frozen dataclasses.

Defaults live in the dataclass fields and nowhere else; the valid keys of every
table are derived from those fields, so an unknown key is an error that lists
the valid ones.
"""

from __future__ import annotations

import dataclasses
import os
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on old Pythons
    import tomli as tomllib

from .errors import SpecError

BACKEND_NAMES = ("auto", "mindspore", "mslite", "onnxruntime")
TARGETS = ("cpu", "gpu", "ascend")
PROVIDERS = ("", "tensorrt", "ge")
HANDOFFS = ("host", "graph")
TEMPLATE_FIELDS = ("rank",)
_INT_FORMAT = re.compile(r"0?[0-9]*d?")

DeviceId = Union[str, int, tuple]


@dataclass(frozen=True)
class Combine:
    """How rank 0 combines one output across the ranks of a model."""

    mode: str = "rank0"
    axis: int | None = None

    @classmethod
    def parse(cls, text: str, key: str) -> Combine:
        """Parse "rank0", "sum" or "concat:AXIS" (AXIS an integer, not 0)."""
        expected = 'expected "rank0", "sum" or "concat:AXIS" with AXIS a nonzero integer'
        if not isinstance(text, str):
            raise SpecError(f"{key}: {expected}, got {text!r}")
        if text in ("rank0", "sum"):
            return cls(text)
        mode, sep, axis = text.partition(":")
        if mode != "concat" or not sep or not re.fullmatch(r"[+-]?[0-9]+", axis.strip()):
            raise SpecError(f"{key}: {expected}, got {text!r}")
        if int(axis) == 0:
            raise SpecError(f"{key}: concat along axis 0 would mix up rows; {expected}")
        return cls("concat", int(axis))

    def __str__(self) -> str:
        return self.mode if self.axis is None else f"{self.mode}:{self.axis}"


@dataclass(frozen=True)
class Step:
    """One step of a multi-graph program: run graph `graph` `repeat` times.

    `feed` maps an input name of the graph to an output name of the step before
    (or of the same graph's previous repeat). `inputs` maps an input name of the graph to
    where it comes from: a field of the batch by name, or an earlier step's output as
    "STEP.OUTPUT" (a step's `name`, "step1", "step2", ... unless the job names it).
    Inputs neither fed nor named come from the batch.

    `collect`: every repeat's outputs, stacked along a new axis 1 (rows, repeat, ...), are
    what later steps and [output.from] get, rather than the last repeat's. `until`: the
    repeats stop once every row of the batch has given `until.equals` in output
    `until.output`; "STEP.length" is then each row's count of repeats up to and including
    that one, and a collected output is padded after it (`Until`).
    """

    graph: int
    repeat: int = 1
    feed: tuple[tuple[str, str], ...] = ()
    inputs: tuple[tuple[str, str], ...] = ()
    name: str = ""
    collect: bool = False
    until: Until | None = None


@dataclass(frozen=True)
class Until:
    """A repeated step's stop condition: every row has given `equals` in `output`."""

    output: str
    equals: float

    def pad(self, output: str) -> float:
        """What a collected output holds after a row's last repeat: the stop value in the
        output that stops, 0 in the others."""
        return self.equals if output == self.output else 0


def step_reference(text: str) -> tuple[str, str] | None:
    """("step", "output") for "step.output"; None for a plain name (a field of the batch)."""
    step, dot, output = text.partition(".")
    return (step, output) if dot else None


@dataclass(frozen=True)
class ModelSpec:
    files: tuple[str, ...]   # one path template per graph
    backend: str = "auto"
    ranks: int = 1
    stages: int = 1
    handoff: str = "host"
    stage_combine: tuple[Combine, ...] = ()   # per stage before the last, for all its outputs
    sha256: str = ""   # a sha256sum-style manifest of the slice files, checked before use

    @property
    def ranks_per_stage(self) -> int:
        return self.ranks // self.stages

    def graph_paths(self, rank: int) -> list[Path]:
        """The slice files of model rank `rank`, one per graph, with {rank} filled in."""
        return [Path(template.format(rank=rank)) for template in self.files]

    def slice_path(self, rank: int) -> Path:
        """The first graph's slice file of model rank `rank`."""
        return self.graph_paths(rank)[0]

    def slice_paths(self) -> list[tuple[int, Path]]:
        """(model rank, file) for every graph of every model rank."""
        return [(rank, path) for rank in range(self.ranks) for path in self.graph_paths(rank)]


@dataclass(frozen=True)
class DeviceSpec:
    target: str = "cpu"
    device_id: DeviceId = "local"
    threads: int = 0
    provider: str = ""
    config_file: str = ""

    def config_path(self, rank: int) -> Path | None:
        """The Lite config ini for model rank `rank`, or None when none is set."""
        return Path(self.config_file.format(rank=rank)) if self.config_file else None


@dataclass(frozen=True)
class InputSpec:
    file: Path
    datasets: tuple[tuple[str, str], ...]
    batch_size: int = 128
    preprocess: str = ""    # module:function run on each batch before it is shared (spmdinfer.hooks)


@dataclass(frozen=True)
class OutputSpec:
    file: Path
    datasets: tuple[tuple[str, str], ...]
    combine: tuple[Combine, ...] = ()
    compression: str = ""   # "" (none) | "lzf" | "gzip" | "gzip:LEVEL"
    postprocess: str = ""   # module:function run on each finished batch before it is written
    # [output.from]: output name -> "STEP.OUTPUT" it takes; empty: the last step's, in order
    sources: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RunSpec:
    """How the run guards itself: the per-batch watchdog, retries across requeues, durability."""

    batch_timeout: float = 1800.0   # seconds without progress before the watchdog ends the job; 0 = off
    max_attempts: int = 3           # runs that may start a batch without committing it
    fsync: bool = False             # fsync every committed batch (survives power loss, not just kills)
    shared_memory: bool = True      # a group on one node passes batches through shared memory


@dataclass(frozen=True)
class JobSpec:
    """A whole job file. `path` is the job file, `text` its exact contents."""

    path: Path
    text: str
    model: ModelSpec
    input: InputSpec
    output: OutputSpec
    device: DeviceSpec = DeviceSpec()
    backend_options: dict = field(default_factory=dict)
    steps: tuple[Step, ...] = ()   # empty: graph 0 once
    run: RunSpec = RunSpec()

    @property
    def input_names(self) -> list[str]:
        return [name for name, _ in self.input.datasets]

    @property
    def output_names(self) -> list[str]:
        return [name for name, _ in self.output.datasets]


def load_spec(path: str | Path) -> JobSpec:
    """Read and check a job file; raise SpecError naming the file and key on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read job file: {exc}") from None
    try:
        return parse_spec(text, path)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def parse_spec(text: str, path: Path) -> JobSpec:
    """Parse job-file text; relative paths resolve against `path`'s folder."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"invalid TOML: {exc}") from None
    base = path.resolve().parent
    tables = {"model": ModelSpec, "device": DeviceSpec, "input": InputSpec, "output": OutputSpec,
              "backend": None, "steps": None, "run": RunSpec}
    _check_keys(doc, tables, "the top level", what="table")
    for name in ("model", "input", "output"):
        if name not in doc:
            raise SpecError(f"missing table [{name}]")
    for name in tables:
        if name in doc and name != "steps" and not isinstance(doc[name], dict):
            raise SpecError(f"[{name}] must be a table, got {doc[name]!r}")

    model = _parse_model(doc["model"], base)
    device = _parse_device(doc.get("device", {}), base)
    input_spec = _parse_input(doc["input"], base)
    output = _parse_output(doc["output"], base)
    backend_options = _parse_backend_options(doc.get("backend", {}))
    steps = _parse_steps(doc["steps"], len(model.files)) if "steps" in doc else ()
    _check_sources(output.sources, steps or (Step(graph=0, name="step1"),))
    run = _parse_run(doc.get("run", {}))
    return JobSpec(path=path.resolve(), text=text, model=model, device=device,
                   input=input_spec, output=output, backend_options=backend_options, steps=steps,
                   run=run)


def _parse_model(table: dict, base: Path) -> ModelSpec:
    _check_keys(table, _fields(ModelSpec), "[model]")
    files = table.get("files")
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
        raise SpecError(f"[model] files must be a path template or a list of them (one per graph), "
                        f"got {files!r}")
    templates = tuple(_template(f, "[model] files", base) for f in files)
    backend = _choice(table, "backend", "[model]", BACKEND_NAMES, ModelSpec.backend)
    ranks = _integer(table, "ranks", "[model]", ModelSpec.ranks, minimum=1)
    stages = _integer(table, "stages", "[model]", ModelSpec.stages, minimum=1)
    handoff = _choice(table, "handoff", "[model]", HANDOFFS, ModelSpec.handoff)
    if ranks > 1 and any("{rank" not in f for f in files):
        raise SpecError(f"[model] files must contain {{rank}} when ranks = {ranks}, "
                        f"so that every rank loads its own slice; got {table['files']!r}")
    if ranks % stages:
        raise SpecError(f"[model] ranks = {ranks} must be a multiple of stages = {stages} "
                        "(every stage holds ranks / stages model ranks)")
    modes = table.get("stage_combine", "rank0")
    modes = [modes] * (stages - 1) if isinstance(modes, str) else modes
    if not isinstance(modes, list) or len(modes) != stages - 1:
        raise SpecError(f"[model] stage_combine must be a combine mode or a list of {stages - 1} "
                        f"(one per stage before the last), got {table.get('stage_combine')!r}")
    stage_combine = tuple(Combine.parse(m, f"[model] stage_combine[{i}]") for i, m in enumerate(modes))
    manifest = table.get("sha256", ModelSpec.sha256)
    if not isinstance(manifest, str):
        raise SpecError(f"[model] sha256 must be the path of a sha256sum manifest, got {manifest!r}")
    return ModelSpec(files=templates, backend=backend, ranks=ranks, stages=stages, handoff=handoff,
                     stage_combine=stage_combine, sha256=str(_anchored(base, manifest)) if manifest else "")


def _parse_steps(steps, graphs: int) -> tuple[Step, ...]:
    if not isinstance(steps, list) or not steps or not all(isinstance(t, dict) for t in steps):
        raise SpecError("[[steps]] must be an array of tables, each with graph = N")
    parsed: list[Step] = []
    for index, table in enumerate(steps):
        where = f"[[steps]] #{index + 1}"
        _check_keys(table, _fields(Step), where)
        name = table.get("name", f"step{index + 1}")
        if not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise SpecError(f"{where} name must be a word (letters, digits, _), got {name!r}")
        if name in {step.name for step in parsed}:
            raise SpecError(f"{where} name {name!r}: another step has that name")
        if "graph" not in table:
            raise SpecError(f"{where}: graph is required (0 to {graphs - 1}, an index into [model] files)")
        graph = table["graph"]
        if not _is_int(graph) or not 0 <= graph < graphs:
            raise SpecError(f"{where} graph must be an index into [model] files, 0 to {graphs - 1}; "
                            f"got {graph!r}")
        repeat = _integer(table, "repeat", where, Step.repeat, minimum=1)
        feed = table.get("feed", {})
        if not isinstance(feed, dict) or not all(isinstance(v, str) for v in feed.values()):
            raise SpecError(f"{where} feed must be a table of input_name = \"output_name\", got {feed!r}")
        inputs = table.get("inputs", {})
        if not isinstance(inputs, dict) or not all(isinstance(v, str) and v for v in inputs.values()):
            raise SpecError(f'{where} inputs must be a table of input_name = "field" or '
                            f'"STEP.OUTPUT", got {inputs!r}')
        both = [key for key in inputs if key in feed]
        if both:
            raise SpecError(f"{where} input {both[0]!r} is in both feed and inputs")
        for key, source in inputs.items():
            _check_earlier(source, f"{where} inputs {key}", parsed)
        collect = table.get("collect", False)
        if not isinstance(collect, bool):
            raise SpecError(f"{where} collect must be true or false, got {collect!r}")
        until = _until(table["until"], where, repeat) if "until" in table else None
        parsed.append(Step(graph=graph, repeat=repeat, feed=tuple(feed.items()),
                           inputs=tuple(inputs.items()), name=name, collect=collect, until=until))
    return tuple(parsed)


def _until(table, where: str, repeat: int) -> Until:
    expected = '{ output = "NAME", equals = NUMBER }'
    if not isinstance(table, dict) or sorted(table) != ["equals", "output"]:
        raise SpecError(f"{where} until must be {expected}, got {table!r}")
    output, equals = table["output"], table["equals"]
    if not (isinstance(output, str) and output):
        raise SpecError(f"{where} until output must name an output of the step's graph, got {output!r}")
    if isinstance(equals, bool) or not isinstance(equals, (int, float)):
        raise SpecError(f"{where} until equals must be a number, got {equals!r}")
    if repeat < 2:
        raise SpecError(f"{where} until needs repeat > 1 (the most repeats), got repeat = {repeat}")
    return Until(output=output, equals=equals)


def _check_earlier(source: str, where: str, earlier: Sequence[Step], after: str = "") -> None:
    """A "STEP.OUTPUT" reference must name a step that has run by then."""
    reference = step_reference(source)
    if reference is None:
        return
    step, output = reference
    names = [s.name for s in earlier]
    if step not in names or not output:
        before = after or "before this step"
        known = ", ".join(names) or "none"
        raise SpecError(f'{where} = "{source}": "STEP.OUTPUT" must name a step that runs '
                        f"{before} and one of its outputs; steps {before}: {known}")


def _check_sources(sources: tuple[tuple[str, str], ...], steps: Sequence[Step]) -> None:
    for name, source in sources:
        if step_reference(source) is None:
            raise SpecError(f'[output.from] {name} = "{source}" must be "STEP.OUTPUT" (for '
                            f'example "step1.output0")')
        _check_earlier(source, f"[output.from] {name}", steps, after="in the program")


_NAME = re.compile(r"[A-Za-z_]\w*")


def _parse_device(table: dict, base: Path) -> DeviceSpec:
    _check_keys(table, _fields(DeviceSpec), "[device]")
    target = _choice(table, "target", "[device]", TARGETS, DeviceSpec.target)
    threads = _integer(table, "threads", "[device]", DeviceSpec.threads, minimum=0)
    provider = _choice(table, "provider", "[device]", PROVIDERS, DeviceSpec.provider)
    config_file = table.get("config_file", DeviceSpec.config_file)
    if not isinstance(config_file, str):
        raise SpecError(f"[device] config_file must be a string path, got {config_file!r}")
    if config_file:
        config_file = _template(config_file, "[device] config_file", base)
    device_id = table.get("device_id", DeviceSpec.device_id)
    expected = '"local", a device number >= 0, or a list of device numbers'
    if isinstance(device_id, list):
        if not device_id or not all(_is_int(d) and d >= 0 for d in device_id):
            raise SpecError(f"[device] device_id must be {expected}, got {device_id!r}")
        device_id = tuple(device_id)
    elif not (device_id == "local" or (_is_int(device_id) and device_id >= 0)):
        raise SpecError(f"[device] device_id must be {expected}, got {device_id!r}")
    return DeviceSpec(target=target, device_id=device_id, threads=threads,
                      provider=provider, config_file=config_file)


def _parse_input(table: dict, base: Path) -> InputSpec:
    _check_keys(table, _fields(InputSpec), "[input]")
    file = _anchored(base, _require(table, "file", "[input]", str))
    batch_size = _integer(table, "batch_size", "[input]", InputSpec.batch_size, minimum=1)
    datasets = _datasets(table, "[input.datasets]")
    preprocess = _function(table, "preprocess", "[input]")
    return InputSpec(file=file, datasets=datasets, batch_size=batch_size, preprocess=preprocess)


def _parse_output(table: dict, base: Path) -> OutputSpec:
    _check_keys(table, [key for key in _fields(OutputSpec) if key != "sources"] + ["from"],
                "[output]")
    file = _anchored(base, _require(table, "file", "[output]", str))
    datasets = _datasets(table, "[output.datasets]")
    names = [name for name, _ in datasets]
    paths = [p for _, p in datasets]
    if len(set(paths)) != len(paths):
        raise SpecError(f"[output.datasets] two outputs write the same dataset: {paths}")
    modes = table.get("combine", {})
    if not isinstance(modes, dict):
        raise SpecError(f"[output.combine] must be a table of output name = mode, got {modes!r}")
    for name in modes:
        if name not in names:
            raise SpecError(f"[output.combine] {name}: no such output; outputs are: {', '.join(names)}")
    combine = tuple(Combine.parse(modes.get(name, "rank0"), f"[output.combine] {name}")
                    for name in names)
    compression = table.get("compression", OutputSpec.compression)
    if compression not in ("", "lzf", "gzip") and not re.fullmatch(r"gzip:[0-9]", str(compression)):
        raise SpecError(f'[output] compression must be "", "lzf", "gzip" or "gzip:0".."gzip:9", '
                        f"got {compression!r}")
    postprocess = _function(table, "postprocess", "[output]")
    sources = table.get("from", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise SpecError(f'[output.from] must be a table of output name = "STEP.OUTPUT", '
                        f"got {sources!r}")
    for name in sources:
        if name not in names:
            raise SpecError(f"[output.from] {name}: no such output; outputs are: {', '.join(names)}")
    if sources and len(sources) != len(names):
        missing = [name for name in names if name not in sources]
        raise SpecError(f"[output.from] must name where every output comes from; "
                        f"{', '.join(missing)} missing")
    return OutputSpec(file=file, datasets=datasets, combine=combine, compression=compression,
                      postprocess=postprocess,
                      sources=tuple((name, sources[name]) for name in names) if sources else ())


MAX_BATCH_TIMEOUT = 10 ** 7  # seconds (116 days): what signal.alarm and the timers take


def _parse_run(table: dict) -> RunSpec:
    _check_keys(table, _fields(RunSpec), "[run]")
    timeout = table.get("batch_timeout", RunSpec.batch_timeout)
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not 0 <= timeout <= MAX_BATCH_TIMEOUT):
        raise SpecError(f"[run] batch_timeout must be a number of seconds from 0 (off) to "
                        f"{MAX_BATCH_TIMEOUT:,}, got {timeout!r}")
    max_attempts = _integer(table, "max_attempts", "[run]", RunSpec.max_attempts, minimum=1)
    flags = {}
    for key in ("fsync", "shared_memory"):
        flags[key] = table.get(key, getattr(RunSpec, key))
        if not isinstance(flags[key], bool):
            raise SpecError(f"[run] {key} must be true or false, got {flags[key]!r}")
    return RunSpec(batch_timeout=float(timeout), max_attempts=max_attempts, **flags)


def _parse_backend_options(table: dict) -> dict:
    names = [n for n in BACKEND_NAMES if n != "auto"]
    _check_keys(table, names, "[backend]", what="table")
    for name, options in table.items():
        if not isinstance(options, dict):
            raise SpecError(f"[backend.{name}] must be a table of options, got {options!r}")
    return dict(table)


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_keys(table: dict, valid, where: str, what: str = "key") -> None:
    unknown = [key for key in table if key not in valid]
    if unknown:
        raise SpecError(f"unknown {what} {unknown[0]!r} in {where}; valid {what}s: {', '.join(valid)}")


def _require(table: dict, key: str, where: str, kind: type) -> Any:
    if key not in table:
        raise SpecError(f"{where} {key} is required")
    value = table[key]
    if not isinstance(value, kind) or (kind is str and not value):
        raise SpecError(f"{where} {key} must be a non-empty {kind.__name__}, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(table: dict, key: str, where: str, default: int, minimum: int) -> int:
    value = table.get(key, default)
    if not _is_int(value) or value < minimum:
        raise SpecError(f"{where} {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _choice(table: dict, key: str, where: str, choices, default: str) -> str:
    value = table.get(key, default)
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise SpecError(f"{where} {key} must be one of {shown}; got {value!r}")
    return value


def _function(table: dict, key: str, where: str) -> str:
    """A module:function key (spmdinfer.hooks imports it), or "" when absent."""
    text = table.get(key, "")
    if text != "" and not (isinstance(text, str) and _FUNCTION.fullmatch(text)):
        raise SpecError(f'{where} {key} must name a function as "module:function" (for example '
                        f'"prep:normalise"), got {text!r}')
    return text


_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _datasets(table: dict, where: str) -> tuple[tuple[str, str], ...]:
    datasets = table.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise SpecError(f"{where} is required: a table of model tensor name = HDF5 dataset path")
    pairs = []
    for name, h5path in datasets.items():
        if not isinstance(h5path, str) or not h5path.strip("/"):
            raise SpecError(f"{where} {name} must be an HDF5 dataset path such as \"/x\", got {h5path!r}")
        pairs.append((name, "/" + h5path.strip("/")))
    return tuple(pairs)


def _template(text: str, key: str, base: Path) -> str:
    """Check a path template (only {rank} may be filled in) and anchor it at `base`."""
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise SpecError(f"{key}: bad path template {text!r}: {exc}") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or conversion or not _INT_FORMAT.fullmatch(spec or ""):
            raise SpecError(f"{key}: path templates may only use {{rank}} or {{rank:03d}}-style "
                            f"fields, got {{{name}{'!' + conversion if conversion else ''}"
                            f"{':' + spec if spec else ''}}} in {text!r}")
    escaped = str(base).replace("{", "{{").replace("}", "}}")
    return _folded(str(text if Path(text).is_absolute() else Path(escaped) / text))


def _anchored(base: Path, text: str) -> Path:
    """`text` relative to `base` (the job file's folder), with `.` and `..` folded away, so
    that messages name the file plainly; kept as written where a `..` follows a symbolic
    link (folding it would name another file)."""
    return Path(_folded(str(base / text)))


def _folded(path: str) -> str:
    """`path` with `.` and `..` folded, unless a `..` in it follows a symbolic link."""
    parts = Path(path).parts
    last = max((i for i, part in enumerate(parts) if part == ".."), default=-1)
    if any(os.path.islink(os.path.join(*parts[:k + 1])) for k in range(last)
           if parts[k] not in (".", "..")):
        return path
    return os.path.normpath(path)
