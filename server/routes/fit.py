"""`POST /v1/profiles/{name}/fit`: a profile from a few contrastive examples, saved to the store (admin).

Parses and checks the body, tokenises the examples (`steering_vectors.training.quickfit`, which truncates a
side longer than its token budget rather than refusing it: the schema can bound characters, not tokens,
so no schema-valid body is refused for its tokens), runs their forward
passes through the engine's `run_between_steps` one batch at a time (running requests wait at most one
batch between two of their steps), fits the offsets, stores the profile like an upload and returns its
summary. One fit runs at a time; others wait for it.
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator, model_validator

from steering_vectors.core.errors import ProfileError
from steering_vectors.training import quickfit

from ..auth import AdminKey, require_api_key
from ..errors import APIError, bad_request, to_api_error
from ..openapi import PROFILE, json_ok, responses
from ..protocol import PositionMode, integral, require_valid_unicode
from .deps import ServingDep
from .profiles import _name, describe, store_error

router = APIRouter(prefix="/v1/profiles", tags=["profiles"], dependencies=[Depends(require_api_key)])

LIMITS = quickfit.DEFAULT_LIMITS
Text = Annotated[str, StringConstraints(min_length=1, max_length=8192)]
Layer = Annotated[int, Field(ge=0), BeforeValidator(integral)]  # the validator last: the schema keeps `minimum`


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PairExample(_Strict):
    """Two texts: the states are read over all of each text's tokens."""

    positive: Text
    negative: Text


class ReplyExample(_Strict):
    """A prompt with two replies: the states are read over each reply's tokens."""

    prompt: Text
    positive: Text
    negative: Text


class Instructions(_Strict):
    """Two instructions, each given as the system message before every prompt."""

    positive: Text
    negative: Text


class FitRequest(_Strict):
    """Contrastive examples: `examples` (pairs of texts, or prompts with two replies), or `instructions`
    with `prompts`. At most 64 examples; a side over 512 tokens (chat template included) is truncated, not
    refused (the response's `truncated` lists the truncated sides); `layers` must exist in the model (default: a
    middle band)."""

    examples: (
        Annotated[list[PairExample], Field(min_length=1, max_length=LIMITS.max_pairs)]
        | Annotated[list[ReplyExample], Field(min_length=1, max_length=LIMITS.max_pairs)]
        | None
    ) = None
    instructions: Instructions | None = None
    prompts: Annotated[list[Text], Field(min_length=1, max_length=LIMITS.max_pairs)] | None = None
    method: Literal["caa", "pca", "mean"] = "caa"
    # repeats count once; 2.0 is the layer 2 (JSON Schema's integer), as in the generation requests
    layers: Annotated[list[Layer], Field(min_length=1, max_length=1024)] | None = None
    default_strength: float = Field(1.0, allow_inf_nan=False)
    position_mode: PositionMode = "all"
    description: Annotated[str, StringConstraints(max_length=1000)] = ""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        return require_valid_unicode(data)

    @field_validator("examples", mode="before")
    @classmethod
    def _one_shape(cls, value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):
            if len({"prompt" in item for item in value}) > 1:
                raise ValueError("every example must have the same shape: {positive, negative} pairs of texts, or "
                                 "{prompt, positive, negative} prompts with two replies")
        return value

    def to_examples(self) -> quickfit.Examples:
        given = [self.examples is not None, self.instructions is not None or self.prompts is not None]
        if given == [True, True]:
            raise bad_request("give either `examples` or `instructions` with `prompts`, not both", "examples")
        if self.examples is not None:
            if isinstance(self.examples[0], ReplyExample):
                return quickfit.Examples.from_replies([(e.prompt, e.positive, e.negative) for e in self.examples])
            return quickfit.Examples.from_pairs([(e.positive, e.negative) for e in self.examples])
        if self.instructions is None or self.prompts is None:
            missing = "instructions" if self.instructions is None else "prompts"
            if self.instructions is None and self.prompts is None:
                raise bad_request("give `examples`, or `instructions` with `prompts`", "examples",
                                  code="missing_required_parameter")
            raise bad_request(f"`instructions` and `prompts` go together: {missing} is missing", missing,
                              code="missing_required_parameter")
        return quickfit.Examples.from_instructions(self.instructions.positive, self.instructions.negative,
                                                   self.prompts)


# The two shapes of a fit body (`FitRequest.to_examples`): `examples`, or `instructions` with `prompts`; the
# fields of the other shape absent or null.
FIT_SHAPES = [
    {"title": "examples", "required": ["examples"],
     "properties": {"examples": {"type": "array"}, "instructions": {"type": "null"}, "prompts": {"type": "null"}}},
    {"title": "instructions", "required": ["instructions", "prompts"],
     "properties": {"examples": {"type": "null"}, "instructions": {"type": "object"}, "prompts": {"type": "array"}}},
]
# method pca finds a direction among the examples' differences: it needs two of them
PCA_NEEDS_TWO = {
    "if": {"required": ["method"], "properties": {"method": {"const": "pca"}}},
    "then": {"properties": {"examples": {"minItems": 2}, "prompts": {"minItems": 2}}},
}
FIT_INVALID = (
    "Invalid fit: a field is invalid; the body mixes the two shapes (`examples`, or `instructions` with "
    "`prompts`) or gives neither; `default_strength` is outside the server's bounds; a layer is not in the "
    "model; `pca` has fewer than two examples; a text of a pair or a reply encodes to no tokens (it is made "
    "of characters the tokenizer drops, which the texts' `pattern` excludes where there are any); or the fit "
    f"gives non-finite offsets. Long texts are not refused: a side over {LIMITS.max_side_tokens} tokens (chat "
    "template included) is truncated and listed in the response's `truncated`"
)
TRUNCATED = {
    "type": "array",
    "description": "the sides the fit truncated, as it or (sharing its prompt) the other side of its example "
                   f"had over {LIMITS.max_side_tokens} tokens, chat template included: a text of a pair and "
                   "a reply keep their first tokens, a reply's prompt its last ones, an instructions prompt (then "
                   "an instruction) its first ones; empty when none was",
    "items": {"type": "object", "required": ["example", "side", "tokens_before", "tokens_after"],
              "properties": {"example": {"type": "integer", "minimum": 0},
                             "side": {"enum": ["positive", "negative"]},
                             "tokens_before": {"type": "integer", "minimum": 1},
                             "tokens_after": {"type": "integer", "minimum": 1,
                                              "maximum": LIMITS.max_side_tokens}}},
}
FITTED = copy.deepcopy(PROFILE)
FITTED["required"].append("truncated")
FITTED["properties"]["truncated"] = TRUNCATED


def document(schema: dict[str, Any], settings: Any, num_layers: int | None, tokenizer: Any = None) -> None:
    """Put what the route checks beyond the model's types into the API description: one of the two body
    shapes, pca's two examples, the strength bounds of the settings and, once the model is loaded, the
    highest layer index and the characters its tokenizer encodes to nothing (a text that is read, of a
    pair or a reply, needs another one)."""
    components = schema.get("components", {}).get("schemas", {})
    request = components.get("FitRequest")
    if request is None:
        return
    request["oneOf"] = [dict(shape) for shape in FIT_SHAPES]
    request["allOf"] = [PCA_NEEDS_TWO]
    props = request["properties"]
    props["default_strength"] = {"type": "number", "minimum": settings.strength_min,
                                 "maximum": settings.strength_max, "default": 1.0}
    if num_layers is not None:
        props["layers"]["anyOf"][0]["items"]["maximum"] = num_layers - 1
    silent = quickfit.silent_characters(tokenizer) if tokenizer is not None else ""
    if silent:
        listed = ", ".join(f"U+{ord(char):04X}" for char in silent)
        for model in ("PairExample", "ReplyExample"):
            for side in ("positive", "negative"):
                text = components[model]["properties"][side]
                text["pattern"] = "[^" + "".join(f"\\u{ord(char):04x}" for char in silent) + "]"
                text["description"] = (f"read by the fit: at least one character other than {listed}, which "
                                       "this model's tokenizer encodes to no tokens")


def _fit_lock(request: Request) -> asyncio.Lock:
    lock = getattr(request.app.state, "fit_lock", None)
    if lock is None:
        lock = request.app.state.fit_lock = asyncio.Lock()
    return lock


@router.post(
    "/{name}/fit",
    responses=responses(400, 401, 403, 413, 500, 503, 507, ok={
        200: json_ok(FITTED, "replaced"), 201: json_ok(FITTED, "created")}, why={400: FIT_INVALID}),
)
async def fit_profile(name: str, body: FitRequest, request: Request, serving: ServingDep, _: AdminKey) -> JSONResponse:
    """Fit a profile (CAA, PCA or difference of means) from a few contrastive examples with forward passes
    only, store it as `name` (created or replaced) and return its summary with `truncated`: the sides the fit
    truncated (a side over 512 tokens, chat template included, is truncated rather than refused)."""
    name = _name(name)
    settings = request.app.state.settings
    if not settings.strength_min <= body.default_strength <= settings.strength_max:
        raise bad_request(f"default_strength must be within [{settings.strength_min}, {settings.strength_max}]",
                          "default_strength")
    examples = body.to_examples()
    if not getattr(serving.registry, "writable", True):
        raise APIError(403, "this replica serves its profile directory read-only: fit the profile where it is "
                       "written", type="permission_error", code="profile_store_read_only")
    backend = request.app.state.backend
    model = getattr(backend, "model", None)
    if model is None:
        raise APIError(400, "this server's backend cannot fit profiles (it exposes no model for forward passes)",
                       param=None, code="unsupported")
    fingerprint = backend.fingerprint
    layers = _checked(lambda: quickfit.check_layers(body.layers, fingerprint.num_layers))
    sides = await run_in_threadpool(_checked, lambda: quickfit.encode_examples(serving.tokenizer, examples, LIMITS))
    truncated = quickfit.truncations(sides)
    pad = quickfit.pad_token_id(serving.tokenizer)
    async with _fit_lock(request):
        started = time.perf_counter()
        states: list[quickfit.SideStates] = []
        for batch in quickfit.batches(sides, LIMITS.batch_tokens):
            states.extend(await serving.engine.run_between_steps(
                lambda batch=batch: quickfit.read_batch(model, batch, layers, pad)))
        offsets = await run_in_threadpool(_checked, lambda: quickfit.offsets_from_states(states, layers, body.method))
        seconds = time.perf_counter() - started
    bad = [layer for layer, offset in offsets.items() if not bool(offset.isfinite().all())]
    if bad:
        raise bad_request(f"the fit gave non-finite offsets at layers {bad}; check the examples", "examples")
    try:
        profile = quickfit.make_quick_profile(
            name, offsets, examples=examples, method=body.method, fingerprint=fingerprint,
            default_strength=body.default_strength, position_mode=body.position_mode, description=body.description,
            tokens=sum(len(s.input_ids) for s in sides), seconds=seconds, truncated=truncated,
        )
        stored, created = await run_in_threadpool(serving.registry.put, name, profile.to_bytes())
    except ProfileError as exc:
        raise to_api_error(exc, param="examples") from None
    except OSError as exc:
        raise store_error(exc, f"store profile {name!r}") from None
    # the digest of the file as stored (what /v1/profiles and X-Steering report), not of a re-serialisation
    summary = {**describe(stored, serving.registry.state().digest(name)), "truncated": truncated}
    return JSONResponse(summary, status_code=201 if created else 200)


def _checked(work):  # noqa: ANN001, ANN202 - a small adapter: the library's input errors as 400s
    try:
        return work()
    except quickfit.FitInputError as exc:
        raise bad_request(str(exc), exc.param) from None
