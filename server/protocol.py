"""The OpenAI request models and the steering extension.

Knows the JSON shapes clients send to `/v1/chat/completions` and `/v1/completions`, their bounds, and
how a request normalises itself: `generation()` is a chat or completion request as the serving layer
takes it (`Generation`: the steering entries with the parameter that named each, stop strings, the
max-tokens field that counts, chat-template turns or prompts, and each choice's sampling parameters), read
once; `TokenizeRequest` fills in its own `add_special_tokens` default. Knows nothing about tokenisers,
profiles on disk, the served model's name or the engine's scheduling: the serving layer checks the model
alias, resolves profile names against the store, applies the server's limits and tokenises.

Unknown fields are refused with a 400 naming them, so a client never silently loses a parameter it
relies on (tools, logit_bias, response_format on /v1/completions …); given at the value that asks for
nothing (`"tools": null`, `"response_format": {"type": "text"}`, `"logit_bias": {}` …) they are taken
as absent. Chat requests take `response_format` json_object and json_schema (OpenAI's shapes; the
serving layer compiles them, `structured.py`). Types
are strict, as in the OpenAI API: `"stream": "yes"` or `"n": "2"` is a 400, not a guess; null means
the default where the API allows null. Text with an unpaired UTF-16 surrogate (`"\\ud800"` in the
JSON) is refused before it reaches the tokeniser.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from .backends.base import SamplingParams

PositionMode = Literal["all", "generated", "prompt"]  # steering_vectors.core.profile.POSITION_MODES
POSITION_MODES: tuple[str, ...] = get_args(PositionMode)


_NULL_IS_DEFAULT = frozenset({"n", "stream", "presence_penalty", "frequency_penalty", "logprobs", "echo"})
# OpenAI parameters this server does not implement, given with the value that asks for nothing (what
# some SDKs and gateways send by default): taken as absent; any other value is refused as unsupported
_UNSUPPORTED_AT_DEFAULT: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "metadata": (None, {}),
    "store": (None, False),
}
REPETITION_PENALTY = (0.01, 100.0)  # vLLM takes any positive value; this keeps logits / penalty finite
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, as the OpenAI API documents `seed`


def integral(value: Any) -> Any:
    """JSON has one number type: `2.0` is the integer 2 (as JSON Schema's `integer` says); `2.5` stays a
    float and is refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(integral)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _unpaired_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string in a JSON value that is not valid Unicode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = ((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    for where, item in items:
        found = _unpaired_surrogate(item, where)
        if found:
            return found
    return None


def require_valid_unicode(data: Any) -> Any:
    """`data` itself when every string in it is valid Unicode; else a ValueError naming the first bad one
    (for the `mode="before"` validators of request bodies)."""
    where = _unpaired_surrogate(data, "")
    if where:
        raise ValueError(f"{where} contains an unpaired UTF-16 surrogate; text must be valid Unicode")
    return data


class SteeringEntry(_Strict):
    """One profile and its strength; `position` overrides the profile's token-position mode."""

    profile: str = Field(min_length=1)
    strength: float | None = None  # None = the profile's default strength
    position: PositionMode | None = None
    # a profile with a condition acts only when its probe on the prompt fires ("honour", the default); "ignore"
    # applies it regardless, as a profile without one
    condition: Literal["honour", "ignore"] = "honour"


SteeringSpec = SteeringEntry | list[SteeringEntry] | None


@dataclass(frozen=True)
class SteeringWish:
    """One profile a request asks for, from a `steering` entry or the model alias."""

    profile: str
    strength: float | None  # None: the profile's default strength
    position: PositionMode | None
    param: str  # where the client named it, for error messages: "steering", "steering[i]" or "model"
    condition: Literal["honour", "ignore"] = "honour"  # "ignore": the profile's condition is not read


def steering_wishes(spec: SteeringSpec) -> tuple[SteeringWish, ...]:
    """The `steering` field's entries, each with the parameter that names it."""
    if spec is None:
        return ()
    if isinstance(spec, SteeringEntry):
        return (SteeringWish(spec.profile, spec.strength, spec.position, "steering", spec.condition),)
    return tuple(SteeringWish(entry.profile, entry.strength, entry.position, f"steering[{i}]", entry.condition)
                 for i, entry in enumerate(spec))


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required in a {self.role} message")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def chat_turns(messages: list[ChatMessage]) -> tuple[dict[str, str], ...]:
    """The messages as a chat template takes them: text content, `developer` as `system`."""
    return tuple({"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages)


Stop = str | list[str] | None


RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
JSON_SCHEMA_NAME = r"^[a-zA-Z0-9_-]+$"  # OpenAI's rule for json_schema.name (at most 64 characters)


class JsonSchemaFormat(_Strict):
    """OpenAI's `response_format.json_schema`: the schema the reply must be an instance of."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=JSON_SCHEMA_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]
_RESPONSE_FORMAT = TypeAdapter(ResponseFormat)


def parse_response_format(value: Any) -> TextFormat | JsonObjectFormat | JsonSchemaResponseFormat:
    """A `response_format` value checked against OpenAI's shapes; ValueError with one readable message
    (the error's `param` is then `response_format` whatever part of it is wrong)."""
    if isinstance(value, dict) and "type" in value and value["type"] not in RESPONSE_FORMAT_TYPES:
        raise ValueError(f"type must be one of {', '.join(map(repr, RESPONSE_FORMAT_TYPES))}, not {value['type']!r}")
    try:
        return _RESPONSE_FORMAT.validate_python(value, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first["loc"]
        where = ".".join(str(p) for p in (loc[1:] if loc and loc[0] in RESPONSE_FORMAT_TYPES else loc))
        if first["type"] == "missing":
            raise ValueError(f"{where} is required") from None
        if first["type"] == "extra_forbidden":
            raise ValueError(f"{where} is not a field of response_format") from None
        if first["type"] == "union_tag_not_found":
            raise ValueError("type is required") from None
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ValueError(f"{where}: {message}" if where else message) from None


@dataclass(frozen=True)
class Generation:
    """A chat or completion request as the serving layer takes it, normalised once by its model: what the
    client asked for, in the form serving uses, with nothing of the server's limits applied yet."""

    model: str
    n: int
    steering: tuple[SteeringWish, ...]  # the `steering` field's entries (the model alias is serving's to read)
    stop: tuple[str, ...]
    max_tokens: int | None  # as the client set it; None: not set
    max_tokens_param: str  # the field that set it, for error messages
    default_max_tokens: int | None  # when not set (None: the server's default_max_tokens)
    sampling_template: SamplingParams  # choice 0's, before the server's stop ids, length and default penalty
    repetition_penalty: float | None  # None: the server's default
    ignore_eos: bool
    turns: tuple[dict[str, str], ...] = ()  # chat: the messages as chat-template turns
    prompts: tuple[str | list[int], ...] = ()  # completions: texts or token-id lists
    response_format: JsonObjectFormat | JsonSchemaResponseFormat | None = None  # chat: None is free text

    @property
    def open_sampling(self) -> frozenset[str]:
        """The sampling fields this request leaves to its steering profiles' decoding defaults (`Profile.decoding`),
        before the server's default: those it does not set."""
        return frozenset({"repetition_penalty"} if self.repetition_penalty is None else ())

    def sampling(
        self, index: int, max_new_tokens: int, stop_token_ids: frozenset[int], default_repetition_penalty: float = 1.0
    ) -> SamplingParams:
        """Choice `index`'s sampling: choice i of a seeded request uses seed + i, so the n choices differ but
        each is reproducible; `default_repetition_penalty` (the server's setting) where the request sets none."""
        seed = self.sampling_template.seed
        return dataclasses.replace(
            self.sampling_template,
            max_new_tokens=max_new_tokens,
            seed=None if seed is None else seed + index,
            stop_token_ids=frozenset() if self.ignore_eos else stop_token_ids,
            repetition_penalty=(
                default_repetition_penalty if self.repetition_penalty is None else self.repetition_penalty
            ),
        )


class _GenerationRequest(_Strict):
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: Int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Stop = None
    n: Int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # vLLM's extra sampling parameters, per row: -1 or 0 = every token; min_p 0 = off; 1 = no penalty
    top_k: Int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1])
    # vLLM's extension: generate past the model's end-of-sequence tokens until max_tokens (benchmarks that need
    # every reply of one length); stop strings still apply
    ignore_eos: bool = False
    user: str | None = None
    steering: SteeringSpec = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        data = require_valid_unicode(data)
        if isinstance(data, dict):
            # the OpenAI API documents these as "... or null", null meaning the default (n: null is n = 1)
            data = {
                key: value
                for key, value in data.items()
                if not (value is None and key in _NULL_IS_DEFAULT)
                and not any(value == v and type(value) is type(v) for v in _UNSUPPORTED_AT_DEFAULT.get(key, ()))
            }
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Stop) -> Stop:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(item == "" for item in items):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _generation(
        self,
        *,
        max_tokens: int | None,
        max_tokens_param: str,
        default_max_tokens: int | None,
        logprobs: bool,
        top_logprobs: int,
        prompt_logprobs: bool,
        **inputs: Any,
    ) -> Generation:
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        template = SamplingParams(
            max_new_tokens=0,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            top_k=max(0, self.top_k or 0),
            min_p=self.min_p or 0.0,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        return Generation(
            model=self.model, n=self.n, steering=steering_wishes(self.steering), stop=stop, max_tokens=max_tokens,
            max_tokens_param=max_tokens_param, default_max_tokens=default_max_tokens, sampling_template=template,
            repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos, **inputs,
        )


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    # None (or {"type": "text"}, dropped by _normalise): free text
    response_format: JsonObjectFormat | JsonSchemaResponseFormat | None = None

    @field_validator("response_format", mode="wrap")
    @classmethod
    def _response_format(cls, value: Any, handler: Any) -> Any:
        if value is None:
            return None
        parsed = parse_response_format(value)
        return None if isinstance(parsed, TextFormat) else parsed

    def generation(self) -> Generation:
        """The request as serving takes it; max_completion_tokens, when set, counts before max_tokens."""
        if self.max_completion_tokens is not None:
            max_tokens, param = self.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param = self.max_tokens, "max_tokens"
        return self._generation(
            max_tokens=max_tokens,
            max_tokens_param=param,
            default_max_tokens=None,
            logprobs=self.logprobs,
            top_logprobs=(self.top_logprobs or 0) if self.logprobs else 0,
            prompt_logprobs=False,
            turns=chat_turns(self.messages),
            response_format=self.response_format,
        )


Prompt = str | list[str] | list[Int] | list[list[Int]]


class CompletionRequest(_GenerationRequest):
    prompt: Prompt
    max_tokens: Int | None = Field(16, ge=0)
    logprobs: Int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: Int | None = Field(None, ge=1, le=1)
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Prompt) -> Prompt:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> tuple[str | list[int], ...]:
        """The prompt as texts or token-id lists."""
        if isinstance(self.prompt, str):
            return (self.prompt,)
        if all(isinstance(item, int) for item in self.prompt):
            return (list(self.prompt),)  # type: ignore[arg-type]
        return tuple(self.prompt)  # type: ignore[arg-type]

    def generation(self) -> Generation:
        """The request as serving takes it; an absent max_tokens is the OpenAI default of 16 (within the
        server's limit and the context window, which serving applies)."""
        wants = self.logprobs is not None
        return self._generation(
            max_tokens=self.max_tokens if "max_tokens" in self.model_fields_set else None,
            max_tokens_param="max_tokens",
            default_max_tokens=CompletionRequest.model_fields["max_tokens"].default,
            logprobs=wants,
            top_logprobs=self.logprobs or 0,
            prompt_logprobs=wants and self.echo,
            prompts=self.prompts(),
        )


class TokenizeRequest(_Strict):
    """vLLM's `/tokenize` body: a `prompt`, or chat `messages` formatted with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True  # messages only
    # default (filled in on validation): true for a prompt, false for messages (the template has them)
    add_special_tokens: bool | None = None
    return_token_strs: bool = False

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        return require_valid_unicode(data)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        if self.add_special_tokens is None:
            self.add_special_tokens = self.messages is None
        return self

    @property
    def turns(self) -> tuple[dict[str, str], ...] | None:
        """The messages as chat-template turns, or None for a prompt."""
        return None if self.messages is None else chat_turns(self.messages)


class DetokenizeRequest(_Strict):
    """vLLM's `/detokenize` body."""

    model: str | None = None
    tokens: list[Int]
