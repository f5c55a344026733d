"""One config schema machinery for every app: a YAML file plus `section.key=value` overrides,
validated with pydantic so that an unknown key or a wrong type fails with one message naming the key.

Values in overrides are parsed as YAML scalars/flow collections (`3`, `true`, `1e-4`, `["a","b"]`), so
lists are written as JSON: 'generation.prompts=["a","b"]'.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llamazoo.io.yamlfile import read_yaml_mapping


class Section(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelSection(Section):
    """The model knobs of the original Model Zoo (defaults as in its shipped configs)."""

    fp32_ln: bool = False
    fp32_logits: bool = True
    fp32_skip_add: bool = True
    mixedp_attn: bool = True
    max_seq_length: int | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    device: Literal["cpu", "cuda", "auto"] = "auto"
    quantize: Literal["none", "int8", "int4"] = Field(
        "none", description="generate/chat/serve/eval: weight-only quantization of the projections at load "
        "(int8 per channel; int4 in groups of quantize_group_size, the LM head int8); a quantized folder "
        "(llamazoo convert --quantize) loads as it is")
    quantize_group_size: Literal[32, 64, 128, 256] = Field(32, description="int4: weights per scale and zero")

    @field_validator("quantize", mode="before")
    @classmethod
    def _quantize_none(cls, v: Any) -> Any:
        return "none" if v is None else v  # an override's `none` parses as null

    def precision_options(self):
        from llamazoo.model.llama import PrecisionOptions

        return PrecisionOptions(fp32_ln=self.fp32_ln, fp32_logits=self.fp32_logits,
                                fp32_skip_add=self.fp32_skip_add, mixedp_attn=self.mixedp_attn)

    def torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


class CheckpointSection(Section):
    model_name_or_path: str | None = None
    config_name: str | None = None
    # a LoRA adapter folder (PEFT's format): generate/chat merge it into the weights at load; train
    # continues training it (its rank, alpha and target_modules)
    adapter: str | None = None


class ParallelSection(Section):
    """Scale-out under torchrun (`torchrun --nproc_per_node N -m llamazoo train|generate ...`).

    data_parallel: how the world / tensor_parallel replicas share the work: ddp (full replicas,
    gradients all-reduced) or fsdp (FSDP2: weights, gradients and optimizer states sharded).
    tensor_parallel: ranks that split every layer (attention heads, MLP columns, vocabulary); must
    divide the number of processes and the model's KV heads. Without torchrun both must stay 1/default.
    """

    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    tensor_parallel: int = Field(1, ge=1)


C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected section.key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ValueError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None and raw.strip().lower() not in ("null", "none", "~"):
        value = raw
    if isinstance(value, str) and raw.strip().lower() == "none":
        value = None
    return key.split("."), value


def merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def format_validation_error(e: ValidationError, source: str) -> str:
    msgs = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            msgs.append(f"unknown key {key!r}")
        elif err["type"] == "literal_error":
            msgs.append(f"{key}: got {err.get('input')!r}, allowed: {err['ctx']['expected']}")
        else:
            msgs.append(f"{key}: {err['msg'].lower()} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(msgs)


def allowed_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in schema.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += allowed_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def load_config(schema: type[C], config_file: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """YAML file (optional) + overrides -> validated config; errors name the file or key."""
    data: dict[str, Any] = {}
    source = "config"
    if config_file:
        path = Path(config_file)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        data = read_yaml_mapping(path, "a mapping of sections at the top level")
    if overrides:
        data = merge_overrides(data, list(overrides))
        source = f"{source} (with overrides)" if config_file else "command-line overrides"
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        msg = format_validation_error(e, source)
        if "unknown key" in msg:
            msg += f". Allowed keys: {', '.join(allowed_keys(schema))}"
        raise ValueError(msg) from None


# -- training (llamazoo train) ------------------------------------------------------------------------
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRASection(Section):
    """LoRA / QLoRA fine-tuning (llamazoo.model.lora): rank 0 trains every weight; rank > 0 freezes the
    base model and trains adapters of that rank on target_modules (scaled by alpha / rank), the base kept
    in its dtype (base_quantization none) or quantized (nf4: QLoRA's 4-bit NormalFloat with double
    quantization; int8)."""

    rank: int = Field(0, ge=0, description="0 = off (full fine-tuning)")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)
    base_quantization: Literal["none", "nf4", "int8"] = "none"

    @field_validator("base_quantization", mode="before")
    @classmethod
    def _none_is_none(cls, v: Any) -> Any:
        return "none" if v is None else v  # an override's `none` parses as null

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else v
        if isinstance(v, list):
            v = list(LORA_TARGETS) if v == ["all-linear"] else v
            bad = [t for t in v if t not in LORA_TARGETS]
            if bad:
                raise ValueError(f"{bad[0]!r} is not a projection of the decoder layers; expected some of "
                                 f"{', '.join(LORA_TARGETS)} (or all-linear)")
        return v


class TrainingSection(Section):
    """The original Model Zoo training keys (same names and defaults) plus what it lacked."""

    dataset: str | None = None
    batch_size: int = Field(1, ge=1)
    num_epochs: int = Field(1, ge=1)
    learning_rate: float = Field(1e-5, ge=0)
    output_dir: str = "finetuned_model"
    seed: int = 42
    end_early_at_step: int | None = Field(None, ge=1)
    evaluate: bool = True
    grad_accumulation_steps: int = Field(1, ge=1)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)
    prompt_loss_weight: float = Field(1.0, ge=0)
    article_attention: bool = True
    reset_position_ids: bool = False
    dtype: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    eval_every_steps: int | None = Field(None, ge=1)
    save_every_steps: int | None = Field(None, ge=1)
    keep_last_checkpoints: int = Field(2, ge=1)
    resume_from: str | None = None
    log_every_steps: int = Field(1, ge=1)
    tensorboard: bool = False
    lora: LoRASection = LoRASection()


class TrainConfig(Section):
    model: ModelSection = ModelSection()
    checkpoint: CheckpointSection = CheckpointSection()
    training: TrainingSection = TrainingSection()
    parallel: ParallelSection = ParallelSection()


# -- generation (llamazoo generate / chat) ----------------------------------------------------------
class GenerationSection(Section):
    """The original's generation keys (same names and defaults) plus sampling, stops, chat and output.

    batch_size rule: 1 <= batch_size <= number of prompts; prompts run in order in batches of
    batch_size, the last batch may be smaller. Each batch needs longest prompt + max_new_tokens <=
    model.max_seq_length, unless truncate_prompt=left keeps the last tokens of a long prompt.
    """

    prompts: list[str] = Field(default_factory=lambda: ["Once upon a time"], min_length=1)
    max_new_tokens: int = Field(20, ge=1)
    batch_size: int = Field(1, ge=1)
    seed: int = 12345
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: list[str] = Field(default_factory=list)
    eos_token_ids: list[int] | None = None
    chat: bool = False
    system: str | None = None
    truncate_prompt: Literal["error", "left"] = "error"
    output_dir: str | None = "generate_output"
    output_format: Literal["text", "jsonl"] = "text"
    stream: bool = True
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile the batch-1 decode step (seconds "
                                            "to compile, cached on disk); auto: where measured to pay (small "
                                            "layers or unpacked bf16, 256+ tokens to decode, a C++ compiler)")
    threads: int | None = Field(None, ge=1, description="CPU threads; None: the cores other jobs leave idle")

    @field_validator("prompts", "stop", mode="before")
    @classmethod
    def _one_string_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class GenerateConfig(Section):
    checkpoint: CheckpointSection = CheckpointSection()
    model: ModelSection = ModelSection()
    generation: GenerationSection = GenerationSection()
    parallel: ParallelSection = ParallelSection()


# -- evaluation (llamazoo eval perplexity / harness) ----------------------------------------------------
class EvalSection(Section):
    """`llamazoo eval`: what to score and where the results go.

    perplexity: input is a .txt file (one document), a .jsonl file (one document per line: `text`, or
    `prompt` + `completion`), a prepared HDF5 folder or one .hdf5 file (rows scored with the dataset's
    loss weights). Documents are cut into windows of max_seq_length tokens starting every stride tokens;
    each token after a document's first is scored once, by the first window holding it with context.
    harness: batch_size and output apply; the tasks are command-line flags.
    """

    input: str | None = None
    max_seq_length: int | None = Field(None, ge=2, description="window length; default: the model's "
                                       "max_position_embeddings")
    stride: int | None = Field(None, ge=1, description="tokens between window starts (< max_seq_length); "
                               "default: max_seq_length // 2")
    batch_size: int = Field(8, ge=1, description="windows (text) or rows (prepared data) per forward pass; "
                            "harness: the tensor lm_eval's hf backend runs for this many requests")
    split: Literal["auto", "train", "dev"] = Field("auto", description="prepared folder: which files "
                                                   "(auto: dev when there are dev files, else train)")
    prompt_loss_weight: float = Field(1.0, ge=0, description="prepared data: weight of prompt tokens")
    output: str | None = Field(None, description="results JSON file (written whole); none: print only")
    threads: int | None = Field(None, ge=1, description="CPU threads; None: the cores other jobs leave idle")


class EvalConfig(Section):
    checkpoint: CheckpointSection = CheckpointSection()
    model: ModelSection = ModelSection()
    eval: EvalSection = EvalSection()
    parallel: ParallelSection = ParallelSection()


# -- serving (llamazoo serve) ---------------------------------------------------------------------------
class ServeSection(Section):
    """The HTTP server. max_concurrent sequences decode together (continuous batching); up to max_queue
    more wait, beyond that a request gets 429 with Retry-After. Prompts are prefilled in chunks of
    prefill_chunk tokens (also the granularity of prefix reuse), at most prefill_tokens_per_step of them
    between two decode steps while streams are running (more: earlier first tokens for new requests,
    longer pauses for running streams)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0: any free port (the URL is printed)")
    max_concurrent: int = Field(8, ge=1)
    max_queue: int = Field(64, ge=0)
    api_key: str | None = Field(None, description="when set, /v1/* needs 'Authorization: Bearer <api_key>'")
    served_model_name: str | None = Field(None, description="the model id of the API; default: the folder name")
    prefill_chunk: int = Field(128, ge=16)
    prefill_tokens_per_step: int = Field(512, ge=16)
    shutdown_timeout: float = Field(30.0, ge=0, description="seconds in-flight streams get after SIGTERM")
    log_every_s: float = Field(10.0, gt=0, description="progress line interval while busy")
    batch_invariant: bool = Field(True, description="a sequence gives bit-identical numbers alone and among "
                                  "others; false: a lone sequence may use faster one-row kernels (CPU fp32: "
                                  "up to ~2x at one stream) that change its last digits")


class ServeConfig(Section):
    """`llamazoo serve`: the generate keys (generation.* are the requests' sampling defaults) + serve."""

    checkpoint: CheckpointSection = CheckpointSection()
    model: ModelSection = ModelSection()
    generation: GenerationSection = GenerationSection()
    parallel: ParallelSection = ParallelSection()
    serve: ServeSection = ServeSection()
