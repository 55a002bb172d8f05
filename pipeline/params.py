"""The one schema for params.yaml (pydantic dataclasses).

Every stage calls `load()` before doing any work, and `python -m pipeline.params` checks the file
on its own. Wrong types, out-of-range values, unknown names and unknown keys (typos) each raise
`ParamsError` with the full key, the bad value and what is allowed, one line per problem.
"""

import sys
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

from pydantic import AllowInfNan, BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError, \
    ValidationInfo, field_validator
from pydantic.dataclasses import dataclass

from ruamel.yaml import YAML, YAMLError

from pipeline.models import registry
from pipeline.paths import REPO_ROOT


class ParamsError(ValueError):
    """params.yaml does not fit the schema; the message names the key and the allowed values."""


# No coercion: an int key refuses true and "10", a string key refuses 10; a float key takes ints
# (2 -> 2.0). Strictness sits on the leaf types: a strict pydantic dataclass would refuse mappings.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
Sha256 = Annotated[str, Strict(), Field(pattern=r"^[0-9a-f]{64}$")]
Overrides = Annotated[dict[Str, Any], BeforeValidator(lambda v: {} if v is None else v)]  # `name:` = no changes
CONFIG = ConfigDict(extra="forbid", validate_default=True)

# The names the stages accept (one place: the schema and the code that dispatches on them).
CNN_MODELS = tuple(registry.MODELS)   # one entry per CNN: pipeline/models/registry.py
AUGMENTATIONS = ("hflip", "rotation")
SCHEDULERS = ("cosine", "step", "none")
MEDMNIST_TASKS = ("multi-class", "multi-label, binary-class", "binary-class", "ordinal-regression")
# The 2-D flags of medmnist.INFO (importing medmnist would pull in torch for every stage).
MEDMNIST_FLAGS = ("pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
                  "breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist")
MEDMNIST_SIZES = (28, 64, 128, 224)


@dataclass(config=CONFIG)
class Base:
    seed: Int = Field(2023, ge=0, le=2**32 - 1)   # numpy's seeds are 32-bit
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(config=CONFIG)
class EttData:
    name: Str = "ETTh1"
    # Download address; {name} is replaced by the dataset name.
    url: Str = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/{name}.csv"
    # sha256 per file name; a name without a pin is accepted with a printed warning.
    pins: dict[Str, Sha256] = Field(default_factory=lambda: {
        "ETTh1": "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066",
        "ETTh2": "a3dc2c597b9218c7ce1cd55eb77b283fd459a1d09d753063f944967dd6b9218b"})
    target: Str = "OT"        # the target column


@dataclass(config=CONFIG)
class ImageData:
    # Field order matters: the checks of name, size and path read the already validated source.
    source: Literal["medmnist", "file", "synthetic"] = "medmnist"
    name: Str = "pathmnist"   # a 2-D MedMNIST flag (any label for source=file)
    size: Int = Field(64, ge=8, le=512)
    path: Str = ""            # source=file: an npz in the MedMNIST layout
    task: Literal[("", *MEDMNIST_TASKS)] = ""  # source=file: the MedMNIST task ("" = multi-class)
    # The synthetic generator's own seed and split sizes (ignored for real data).
    synthetic_seed: Int = Field(2023, ge=0, le=2**32 - 1)
    # At least one image per class; at most a million (MedMNIST's largest split is 165,466 images).
    synthetic_train: Int = Field(4000, ge=9, le=1_000_000)
    synthetic_val: Int = Field(800, ge=9, le=1_000_000)
    synthetic_test: Int = Field(800, ge=9, le=1_000_000)

    @field_validator("name", "size", "path")
    @classmethod
    def _fits_source(cls, value, info: ValidationInfo):
        source, key = info.data.get("source"), info.field_name
        if key == "name" and source in ("medmnist", "synthetic") and value not in MEDMNIST_FLAGS:
            raise ValueError(f"{value!r} is not a 2-D MedMNIST flag; choose one of: {', '.join(MEDMNIST_FLAGS)}")
        if key == "size" and source == "medmnist" and value not in MEDMNIST_SIZES:
            raise ValueError(f"{value} is not a MedMNIST size ({', '.join(map(str, MEDMNIST_SIZES))}); "
                             "other sizes only with source: file or synthetic")
        if key == "path" and source == "file" and not value:
            raise ValueError("required with source: file (an npz in the MedMNIST layout)")
        return value


@dataclass(config=CONFIG)
class Data:
    ett: EttData = Field(default_factory=EttData)
    images: ImageData = Field(default_factory=ImageData)
    # A folder holding the same files as the download (same checksums). The environment variable
    # DATA_MIRROR, when set, takes precedence; the bytes are verified either way.
    mirror_dir: Str = ""


@dataclass(config=CONFIG)
class Backprop:
    window: Int = Field(24, ge=2)     # L: time steps per sample
    horizon: Int = Field(24, ge=1)    # steps after the window whose OT mean sets the label
    classes: Literal[2, 3] = 3        # K: 2 (down/up) or 3 (down/flat/up)
    threshold: Float = Field(0.5, ge=0)  # "flat" band, in standard deviations of OT within the window
    lr: Float = Field(0.1, gt=0)
    batch_size: Int = Field(64, ge=1)
    epochs: Int = Field(20, ge=1)
    stride: Int = Field(4, ge=1)      # step between training windows
    check_batch: Int = Field(3, ge=1)    # samples in the gradient-check batch
    check_window: Int = Field(6, ge=2)   # small L for the gradient check (finite differences are O(params))


@dataclass(config=CONFIG)
class Mlp:
    input_len: Int = Field(96, ge=2)  # L
    pred_len: Int = Field(192, ge=1)  # P
    kernel: Int = Field(25, ge=1)     # moving-average kernel of the decomposition (odd)
    hidden: Int = Field(512, ge=1)
    # Loss = element-mean MSE. The assignment's lr 0.05 assumed its own loss scaling; with the
    # element mean, 2.0 plays that role (the grid keeps its ratios: 2.0, /5, /50). See README.
    lr: Float = Field(2.0, gt=0)
    weight_decay: Float = Field(1e-3, ge=0)
    batch_size: Int = Field(32, ge=1)
    epochs: Int = Field(20, ge=1)
    patience: Int = Field(5, ge=1)
    lr_schedule: Literal["step", "cosine"] = "cosine"   # step: times lr_decay every epoch; cosine: lr -> 0 over epochs
    lr_decay: Float = Field(0.5, gt=0, le=1)  # step: learning rate multiplied by this after every epoch
    clip_norm: Float = Field(1.0, ge=0)       # clip the global gradient norm to this (0 = no clipping)
    # Per-window normalisation: subtract the window's last value (or mean) and add it back.
    # auto: each of the others is trained and the lowest validation loss is kept.
    window_norm: Literal["auto", "none", "last", "mean", "revin"] = "auto"
    optimizer: Literal["sgd", "momentum"] = "sgd"
    momentum: Float = Field(0.9, ge=0, lt=1)
    dtype: Literal["float32", "float64"] = "float32"
    seeds: Int = Field(5, ge=1)       # seeds base.seed, base.seed+1, ...; the headline is their mean
    # linear: the MLPs learn the residual of a closed-form per-channel ridge forecast of the
    # normalised window (fitted on the train windows, strength chosen on validation among `ridge`
    # and inf = the naive forecast), starting from it; none: the MLPs forecast on their own.
    residual: Literal["none", "linear"] = "linear"
    ridge: list[Annotated[Float, Field(ge=0)]] = Field(default_factory=lambda: [0.0, 0.01, 0.1, 1.0, 10.0, 100.0])
    # residual: linear: the seeds keep the trained MLPs only if, averaged over them, the epoch early
    # stopping picks on one half of validation beats the base on the other half; else the base.
    cross_check: bool = True

    @field_validator("kernel")
    @classmethod
    def _odd(cls, kernel: int) -> int:
        if kernel % 2 == 0:
            raise ValueError(f"{kernel} must be odd")
        return kernel

    @field_validator("residual")
    @classmethod
    def _residual_needs_raw_windows(cls, residual: str, info) -> str:
        # The base maps the window as the MLPs see it; under revin that is rescaled per window by a
        # learned map, which a closed-form base fitted once cannot follow.
        if residual == "linear" and info.data.get("window_norm") == "revin":
            raise ValueError("residual: linear needs window_norm auto, none, last or mean (not revin); "
                             "set window_norm to one of them or residual: none")
        return residual


@dataclass(config=CONFIG)
class Cnn:
    model: Literal[CNN_MODELS] = "resnet18"
    pretrained: Bool = False
    # Local ImageNet weights for fine-tuning (a torchvision state dict); "" = torchvision's
    # download / torch hub cache. The environment variable FINETUNE_WEIGHTS overrides it.
    weights_file: Str = ""
    weights_sha256: Str = ""  # refuse a weights file with another checksum ("" = no pin)
    # Upper bounds no one could mean to exceed (they would fail late or never end); the stage
    # also checks devices against the machine and refuses an absurd projected time.
    epochs: Int = Field(10, ge=1, le=10_000)
    batch_size: Int = Field(64, ge=1, le=65_536)
    eval_batch_size: Int = Field(1024, ge=1, le=65_536)
    lr: Float = Field(1e-3, gt=0, le=10)
    weight_decay: Float = Field(0.0, ge=0)
    scheduler: Literal[SCHEDULERS] = "cosine"
    step_size: Int = Field(3, ge=1, le=10_000)   # StepLR: epochs between decays
    step_gamma: Float = Field(0.1, gt=0, le=1)
    augment: list[Literal[AUGMENTATIONS]] = Field(default_factory=list)
    rotation_degrees: Float = Field(15.0, ge=0, le=180)
    rotation_interpolation: Literal["nearest", "bilinear"] = "nearest"
    upsample_to: Int = Field(0, ge=0, le=1024)  # 0 = refuse images below the model's minimum; N = resize on the device to N px
    devices: Int = Field(1, ge=1, le=1024)      # processes for torchrun/DDP (1 = the single-process path)
    select_by: Literal["auc", "acc"] = "auc"
    log_every: Int = Field(100, ge=1)  # iterations between train-loss / validation logs
    max_steps_per_epoch: Int = Field(0, ge=0, le=10**9)  # 0 = the whole split (a cap for smoke runs)

    @field_validator("upsample_to")
    @classmethod
    def _upsample(cls, size: int) -> int:
        if 0 < size < 8:
            raise ValueError(f"{size} must be 0 (no resizing) or at least 8")
        return size


@dataclass(config=CONFIG)
class Features:
    image_index: Int = Field(0, ge=0, le=10_000_000)  # which test image (the stage checks the split's size)
    channel: Int = Field(0, ge=0, le=4095)            # which channel of each stage's feature map (checked too)


@dataclass(config=CONFIG)
class Report:
    allow_missing: Bool = False  # build the report even when some experiments' metrics are missing


@dataclass(config=CONFIG)
class MlpSection:
    defaults: Mlp
    variants: dict[Str, Overrides]  # name -> the keys of defaults it changes


@dataclass(config=CONFIG)
class CnnSection:
    defaults: Cnn
    experiments: dict[Str, Overrides]
    ablations: dict[Str, Overrides]


@dataclass(config=CONFIG, kw_only=True)
class Params:
    base: Base = Field(default_factory=Base)
    data: Data = Field(default_factory=Data)
    backprop: Backprop = Field(default_factory=Backprop)
    mlp: MlpSection
    cnn: CnnSection
    features: Features = Field(default_factory=Features)
    report: Report = Field(default_factory=Report)

    def mlp_variant(self, name: str) -> Mlp:
        return _variant(self.mlp, "mlp", name)

    def mlp_variants(self) -> list[str]:
        return list(self.mlp.variants)

    def cnn_experiment(self, name: str) -> Cnn:
        return _variant(self.cnn, "cnn", name)

    def cnn_experiments(self) -> list[str]:
        """Every CNN run: the named experiments, then the ablations of model B."""
        return [*self.cnn.experiments, *self.cnn.ablations]


def _variant(section, section_name: str, name: str):
    """The section's defaults with the named entry's overrides, validated as one config."""
    groups = [f.name for f in fields(section) if f.name != "defaults"]
    for group in groups:
        entries = getattr(section, group)
        if name in entries:
            merged = {**asdict(section.defaults), **entries[name]}
            return _validate(type(section.defaults), merged, f"{section_name}.{group}.{name}")
    defined = [n for g in groups for n in getattr(section, g)]
    raise ParamsError(f"params.yaml: {section_name}: no entry {name!r}; defined: {', '.join(defined)}")


# Keys of older params files: say where they went instead of only "unknown key".
_RENAMED = {
    "data.pathmnist": "data.pathmnist was renamed to data.images (same keys plus name/path/task/synthetic_seed)",
    "data.ett.sha256": "data.ett.sha256 was replaced by data.ett.pins: {<file name>: <sha256>}",
}


def _validate(cls, raw, prefix: str = ""):
    try:
        return TypeAdapter(cls).validate_python(raw)
    except ValidationError as error:
        raise ParamsError("\n".join(_line(e, cls, prefix) for e in error.errors())) from None


def _type_at(tp, loc):
    """The schema type at an error location (dataclass fields, list items, mapping values)."""
    for part in loc:
        if is_dataclass(tp):
            tp = get_type_hints(tp).get(part)
        elif get_origin(tp) in (list, dict):
            tp = get_args(tp)[-1]
    return tp


def _quoted_number(value) -> bool:
    """"10" or '1e-05': YAML reads a number once the quotes go."""
    try:
        return isinstance(value, str) and type(load_yaml(value)) in (int, float)
    except YAMLError:
        return False


def _choices(values) -> str:
    return ", ".join(str(v) if v and "," not in str(v) else repr(v) for v in values)


# pydantic's error type -> our text; `input` is the bad value, the rest comes from the error's ctx.
_TEXTS = {
    "int_type": "expected an integer, got {input!r}{unquote}",
    "float_type": "expected a number, got {input!r}{unquote}",
    "finite_number": "expected a finite number, got {input!r}",
    "string_type": "expected a string, got {input!r} (put it in quotes)",
    "bool_type": "expected true or false, got {input!r}",
    "dict_type": "expected a mapping, got {input!r}",
    "dataclass_type": "expected a mapping, got {input!r}",
    "list_type": "expected a list, got {input!r}",
    "missing": "missing (required)",
    "greater_than": "{input!r} must be greater than {gt}",
    "greater_than_equal": "{input!r} must be at least {ge}",
    "less_than": "{input!r} must be below {lt}",
    "less_than_equal": "{input!r} must be at most {le}",
    "string_pattern_mismatch": "{input!r} is not a sha256 (64 lowercase hex digits)",
    "value_error": "{error}",
}


def _line(error: dict, root, prefix: str) -> str:
    loc, value, kind = error["loc"], error["input"], error["type"]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)[1:]
    key = ".".join(filter(None, [prefix, path])) or "(top level)"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        if key in _RENAMED:
            return f"params.yaml: {_RENAMED[key]}"
        allowed = sorted(f.name for f in fields(_type_at(root, loc[:-1])))
        text = f"unknown key; allowed keys of {key.rpartition('.')[0] or 'params.yaml'}: {', '.join(allowed)}"
    elif kind == "literal_error":
        text = f"{value!r} is not allowed; choose one of: {_choices(get_args(_type_at(root, loc)))}"
    elif not loc:
        text = "expected a mapping of sections"
    elif kind == "greater_than" and error["ctx"]["gt"] == 0:
        text = f"{value!r} must be positive"
    else:
        unquote = " (drop the quotes)" if _quoted_number(value) else ""
        template = _TEXTS.get(kind, error["msg"] + ", got {input!r}")
        text = template.format(input=value, unquote=unquote, **error.get("ctx", {}))
    return f"params.yaml: {key}: {text}"


def parse(raw: dict) -> Params:
    params = _validate(Params, raw)
    problems = []   # each variant is its section's defaults plus its overrides, checked as one config
    for get, names in ((params.mlp_variant, params.mlp_variants()), (params.cnn_experiment, params.cnn_experiments())):
        for name in names:
            try:
                get(name)
            except ParamsError as error:
                problems.append(str(error))
    if problems:
        raise ParamsError("\n".join(problems))
    return params


# YAML 1.2, as DVC reads and writes params.yaml (ruamel.yaml, DVC's own parser): `1e-05` (how DVC
# writes `-S key=1e-5`), `5E-4` and `1.0e+3` are numbers, `yes`/`no` stay strings.
YAML_12 = YAML(typ="safe", pure=True)


def load_yaml(text: str):
    return YAML_12.load(text)


def load(path: str | Path | None = None) -> Params:
    path = Path(path) if path else Path.cwd() / "params.yaml"
    if not path.exists():
        raise ParamsError(f"{path} not found: run the stage from the repository root ({REPO_ROOT})")
    try:
        raw = load_yaml(path.read_text())
    except YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from None
    return parse(raw)


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else None
    try:
        load(path)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{path or 'params.yaml'}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
