"""``params.yaml``, one typed and validated object per section.

Each stage calls ``load(<Section>)`` once, at start, and afterwards reads attributes only.
pydantic does the checking (strict: YAML's ``yes`` is not a bool, ``"30"`` is not an int);
this module turns its first complaint into one line naming ``params.yaml section.key``,
what was expected and what was found, and names the closest known key for a typo.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from trafficdet.architectures import ARCHITECTURES, START_POINTS
from trafficdet.errors import PipelineError
from trafficdet.paths import PARAMS

PositiveInt = Annotated[int, Field(gt=0, description="a positive integer")]
NonNegativeInt = Annotated[int, Field(ge=0, description="an integer >= 0")]
PositiveFloat = Annotated[float, Field(gt=0, description="a positive number")]
NonNegativeFloat = Annotated[float, Field(ge=0, description="a number >= 0")]
Fraction = Annotated[float, Field(gt=0, lt=1, description="a number between 0 and 1 (exclusive)")]
Score = Annotated[float, Field(ge=0, le=1, description="a score from 0 to 1")]
Checksum = Annotated[str, Field(pattern=r"^((md5|sha256):[0-9a-fA-F]+)?$", description="'' or 'md5:<hex>' or 'sha256:<hex>'")]


CROSS_FIELD = "cross_field"  # a check of several keys together: describe() prints its own words


def refuse(key: str, detail: str) -> PydanticCustomError:
    """A cross-field check's complaint, printed by describe() as ``params.yaml <section>.<key>: <detail>``."""
    return PydanticCustomError(CROSS_FIELD, "{key}: {detail}", {"key": key, "detail": detail})


def url_problem(url: str) -> str:
    """Why ``url`` is not a fetchable http(s) URL, or "": the one check, for params.yaml and downloaded records alike."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed or out-of-range port
    except ValueError as err:  # also an unclosed or invalid [IPv6] bracket
        return f"malformed URL ({err})"
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme + ':' if parts.scheme else 'missing'} is not fetched (http and https only)"
    host = parts.hostname
    if not host:
        return "URL without a host"
    if ":" not in host and not all(char.isalnum() or char in "-._" for char in host):  # ':' only in an [IPv6] literal
        return f"host {host!r} is not a host name"
    return ""


def _fetchable(url: str) -> str:
    problem = url_problem(url) if url else ""
    if problem:
        raise ValueError(f"an http:// or https:// URL ({problem})")
    return url


Url = Annotated[str, Field(pattern=r"^https?://\S+$", description="an http:// or https:// URL"), AfterValidator(_fetchable)]
HostName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$",
        description="a host name such as 'example.org' (no scheme, port or path)",
    ),
]
OptionalUrl = Annotated[
    str, Field(pattern=r"^(https?://\S+)?$", description="'' or an http:// or https:// URL"), AfterValidator(_fetchable)
]

Architecture = Literal["mobilenet_v2", "mobilenet_v2_i320", "mobilenet_multi_avg", "mobilenet_multi_avg_i384"]
StartPoint = Literal["mobilenet_v2_imagenet", Architecture]
assert set(Architecture.__args__) == set(ARCHITECTURES)  # type: ignore[attr-defined]
assert set(StartPoint.__args__) == set(START_POINTS)  # type: ignore[attr-defined]


class Section(BaseModel):
    """One ``params.yaml`` section: every key required, unknown keys refused, values immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    name: ClassVar[str]


class DownloadParams(Section):
    name = "download"
    source: Literal["coco2017", "coco_folder", "voc"]
    source_path: str
    mirror: OptionalUrl
    annotations_url: Url
    annotations_checksum: Checksum
    relabel_url: OptionalUrl
    relabel_checksum: Checksum
    pretrained: Literal[StartPoint, "scratch"]
    checkpoint_url: OptionalUrl
    checkpoint_checksum: Checksum
    images: Literal["per_image", "zips"]
    image_workers: PositiveInt
    train_zip_url: Url
    train_zip_checksum: Checksum
    val_zip_url: Url
    val_zip_checksum: Checksum
    allowed_hosts: Annotated[list[HostName], Field(description="a list of host names (may be empty)")]
    retries: NonNegativeInt
    backoff_s: NonNegativeFloat
    timeout_s: PositiveFloat
    min_kbytes_per_s: PositiveFloat


class FilterParams(Section):
    name = "filter"
    classes: Annotated[list[str], Field(min_length=1, description="a list of class names")]
    include_all: Annotated[list[str], Field(description="a list of class names (may be empty)")]
    images_per_class: Annotated[NonNegativeInt | Literal["all"], Field(description="an integer >= 0 or 'all'")]
    keep_all_from: Annotated[
        list[Literal["train2017", "val2017"]], Field(description="a list of train2017, val2017 (may be empty)")
    ]
    seed: int
    unrelabelled_lights: Literal["exclude", "traffic_light", "ignore"]
    min_box_side: NonNegativeFloat

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[str]) -> list[str]:
        if len(set(classes)) != len(classes):
            raise ValueError("distinct class names")
        return classes


class SplitParams(Section):
    name = "split"
    method: Literal["coco", "stratified", "published"]
    val_fraction: Fraction
    seed: int


class QatParams(Section):
    enabled: bool
    epochs: PositiveInt
    learning_rate: PositiveFloat
    batch_size: PositiveInt


class TrainParams(Section):
    name = "train"
    architecture: Architecture
    init: Literal["pretrained", "scratch"]
    epochs: PositiveInt
    batch_size: PositiveInt
    learning_rate: PositiveFloat
    cosine_decay_epochs: Annotated[PositiveInt | None, Field(description="null or a positive integer")]
    cosine_decay_alpha: Annotated[float, Field(ge=0, le=1, description="a number in [0, 1]")]
    l2_weight_decay: NonNegativeFloat
    bn_momentum: Annotated[float | None, Field(ge=0, lt=1, description="null or a number in [0, 1)")]
    shuffle: bool
    seed: int
    distribution_strategy: Literal["off", "one_device", "mirrored", "multi_worker_mirrored"]
    num_gpus: NonNegativeInt
    cpu_replicas: PositiveInt
    qat: QatParams
    mixed_precision: Literal["off", "float16", "bfloat16"]
    jit_compile: bool
    resume_remote: Annotated[
        str,
        Field(
            pattern=r"^(|/\S.*|[A-Za-z][A-Za-z0-9+.-]*://\S+)$",
            description="'' (off), an absolute folder path or a URL such as s3://bucket/prefix",
        ),
    ]
    device: Literal["auto", "gpu", "cpu"]

    @field_validator("distribution_strategy", "mixed_precision", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads an unquoted `off` as false

    def machine_replicas(self) -> int:
        """Replicas on this machine (one worker's share for multi_worker_mirrored: its GPUs, or 1)."""
        if self.distribution_strategy == "mirrored":
            return self.num_gpus or self.cpu_replicas
        return max(self.num_gpus, 1) if self.distribution_strategy == "multi_worker_mirrored" else 1

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        """The keys that contradict each other, refused at load: they need no data, TF_CONFIG or TensorFlow.

        What needs them stays where it runs: the stage's validate() (data, TF_CONFIG, the start point),
        distribute.make_strategy and the stage's float16 check (the GPUs TensorFlow finds).
        """
        strategy, gpus, replicas = self.distribution_strategy, self.num_gpus, self.machine_replicas()
        if self.cpu_replicas > 1 and (strategy != "mirrored" or gpus):
            raise refuse(
                "cpu_replicas",
                f"{self.cpu_replicas} logical CPU devices only apply to distribution_strategy: mirrored with "
                f"num_gpus: 0 (got {strategy}, num_gpus {gpus}); set cpu_replicas: 1",
            )
        if strategy in ("off", "one_device") and gpus > 1:
            raise refuse(
                "num_gpus",
                f"{strategy} trains on one device, got num_gpus {gpus}; use distribution_strategy: mirrored for several GPUs",
            )
        if self.device == "cpu" and gpus:
            raise refuse("device", f"cpu, but train.num_gpus is {gpus}: set num_gpus: 0, or device: auto")
        if self.device == "cpu" and self.mixed_precision == "float16":
            raise refuse("mixed_precision", "float16 needs a GPU, and train.device is cpu: use off or bfloat16 on the CPU")
        if strategy == "mirrored" and self.batch_size % replicas:  # over several workers: distribute.check_batches
            raise refuse(
                "batch_size",
                f"{self.batch_size} does not split evenly over {replicas} replicas ({strategy}); "
                f"it is the global batch, use a multiple of {replicas}",
            )
        if self.qat.enabled and self.mixed_precision != "off":
            raise refuse(
                "qat.enabled",
                f"QAT with train.mixed_precision: {self.mixed_precision} is not supported "
                "(fake-quantization is float32); set mixed_precision: off for a QAT run",
            )
        if self.qat.enabled and strategy == "mirrored" and replicas > 1:  # several workers: the stage's validate()
            raise refuse(
                "qat.enabled",
                f"QAT runs on one device only (distribution_strategy {strategy} gives {replicas} replicas); "
                "set train.distribution_strategy: off or one_device, or qat.enabled: false",
            )
        return self


class ExportParams(Section):
    name = "export"
    quantization: Literal["float32", "float16", "int8", "dynamic", "qat_int8"]
    representative_steps: PositiveInt
    latency_images: PositiveInt
    latency_repeats: PositiveInt


class EvaluateParams(Section):
    name = "evaluate"
    backend: Literal["pycocotools", "faster_coco_eval"]
    batch_size: PositiveInt
    max_detections: PositiveInt
    confusion_score_threshold: Score


S = TypeVar("S", bound=Section)


def read_params_file(path: Path = PARAMS) -> dict[str, Any]:
    """The whole ``params.yaml`` as a dict, or one line saying why it cannot be read."""
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (run from the repository root)") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(params, dict):
        raise PipelineError(f"{path}: expected a mapping of sections (download:, filter:, ...)")
    return params


def load(model: type[S], path: Path = PARAMS) -> S:
    """Parse and validate ``params.yaml``'s section for ``model``; one clear line if anything is off."""
    params = read_params_file(path)
    if model.name not in params:
        near = difflib.get_close_matches(model.name, [str(key) for key in params], n=1)
        hint = f" (is '{near[0]}:' a typo?)" if near else ""
        raise PipelineError(f"{path}: missing section '{model.name}:'{hint}")
    return parse(model, params[model.name], path)


def parse(model: type[S], values: Any, path: Path = PARAMS) -> S:
    """Validate one section's values (already read) into ``model``."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise PipelineError(describe(model, err, path)) from None


def describe(model: type[Section], err: ValidationError, path: Path = PARAMS) -> str:
    """The first problem of ``err`` as ``params.yaml section.key: expected ..., got ...``."""
    problems = err.errors(include_url=False)
    # A typo shows up twice, as an unknown key and as the missing one: name the typo.
    problem = next((p for p in problems if p["type"] == "extra_forbidden"), problems[0])
    if problem["type"] == CROSS_FIELD:
        return f"{path} {model.name}.{problem['msg']}"
    owner, keys = _walk(model, problem["loc"], problem["type"])
    where = f"{path} {'.'.join([model.name, *keys])}"
    kind, found = problem["type"], problem.get("input")
    if kind == "missing":
        return f"{where}: missing (every key is required; see the comments in {path} for its meaning)"
    if kind == "extra_forbidden":
        known = list(owner.model_fields)
        near = difflib.get_close_matches(keys[-1], known, n=1)
        suggestion = f"did you mean '{near[0]}'?" if near else f"known keys: {', '.join(known)}"
        return f"{where}: unknown key; {suggestion}"
    if kind in ("model_type", "dict_type"):
        return f"{where}: expected a section of keys ({', '.join(owner.model_fields)}), got {found!r}"
    field = owner.model_fields.get(keys[-1]) if keys else None
    described = field is not None and field.description and kind != "value_error"
    expected = field.description if described else _expected(problem)
    return f"{where}: expected {expected}, got {found!r}"


def _walk(model: type[Section], loc: tuple[Any, ...], kind: str) -> tuple[type[Section], list[str]]:
    """Follow ``loc`` through nested sections to the key it names (pydantic's union tags dropped)."""
    owner, keys = model, []
    for index, part in enumerate(loc):
        unknown_key = kind == "extra_forbidden" and index == len(loc) - 1
        if not isinstance(part, str) or (part not in owner.model_fields and not unknown_key):
            break
        keys.append(part)
        annotation = owner.model_fields[part].annotation if part in owner.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, Section)):
            break
        owner = annotation
    return owner, keys


def _expected(problem: dict[str, Any]) -> str:
    """pydantic's own wording, turned around: 'Input should be a valid integer' -> 'a valid integer'."""
    message = problem["msg"]
    for prefix in ("Input should be ", "Value error, "):
        message = message.removeprefix(prefix)
    return message
