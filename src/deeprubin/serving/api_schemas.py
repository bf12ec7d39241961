"""The HTTP service's request and response schemas (pydantic; they make its published OpenAPI schema), and the 422
reply that names the offending field and the light curve it belongs to.

:func:`request_models` builds the request models with the configured limits; :mod:`deeprubin.serving.service`
serves them."""

from typing import Annotated, Any, Literal

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, model_validator

MAX_ERRORS_SHOWN = 50
MAX_OID_LENGTH = 256
ECHO_CHARS = 100  # an oid or a key echoed in a 422 is cut to this many characters
MSG_CHARS = 300


# --- request and response models -----------------------------------------------------------------------------------

# JSON numbers only: a numeric string ("60000.5") or a boolean is refused, an integer is a number.
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Positive = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]


def _valid_oid(oid: str) -> str:
    if not oid.strip():
        raise ValueError("oid is blank: it needs a character other than white space")
    try:
        oid.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"oid is not valid Unicode: a lone surrogate {oid[exc.start]!r} at character {exc.start} "
                         "(a \\ud800-\\udfff escape must be half of a pair)") from None
    return oid


Oid = Annotated[str, Strict(), Field(min_length=1, max_length=MAX_OID_LENGTH), AfterValidator(_valid_oid)]


class Detection(BaseModel):
    """One detection: time, band, and either difference flux (µJy) or AB magnitude, each with its error. Numbers
    are JSON numbers (an integer is one; a numeric string or a boolean is not)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"mjd": 60123.31, "band": "g", "flux": 52.3, "flux_err": 4.1},
                     {"mjd": 60125.27, "band": "r", "mag": 19.12, "mag_err": 0.08}]})

    mjd: Finite = Field(..., description="Modified Julian Date of the detection.")
    band: Literal["g", "r"] = Field(..., description="ZTF band: g or r.")
    flux: Finite | None = Field(None, description="Difference flux, µJy (negative allowed), or the total flux of "
                                                  "apparent photometry; with flux_err.")
    flux_err: Positive | None = Field(None, description="Flux error, µJy (> 0).")
    mag: Finite | None = Field(None, description="AB magnitude (zero point 23.9), used when flux is absent.")
    mag_err: Positive | None = Field(None, description="Magnitude error (> 0).")

    @model_validator(mode="after")
    def _flux_or_mag(self) -> "Detection":
        if self.flux is not None or self.flux_err is not None:
            if self.flux is None or self.flux_err is None:
                missing = "flux" if self.flux is None else "flux_err"
                raise ValueError(f"{missing} is missing: flux and flux_err come together")
            return self
        if self.mag is None or self.mag_err is None:
            if self.mag is None and self.mag_err is None:
                raise ValueError("needs flux and flux_err (µJy) or mag and mag_err (AB)")
            missing = "mag" if self.mag is None else "mag_err"
            raise ValueError(f"{missing} is missing: mag and mag_err come together")
        return self


def request_models(max_curves: int, max_detections: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """``(LightCurve, ClassifyRequest)`` with the configured limits in their schema (maxItems)."""

    class LightCurve(BaseModel):
        """One object's detections (any order; they are sorted by time)."""

        model_config = ConfigDict(extra="forbid")

        oid: Oid = Field(..., description=f"Object id, unique within the request: 1 to {MAX_OID_LENGTH} "
                                          "characters, not all white space.")
        detections: list[Detection] = Field(..., min_length=1, max_length=max_detections,
                                            description=f"At most {max_detections} detections.")
        photometry: Literal["difference", "apparent"] | None = Field(
            None, description="What this curve's brightness is: difference flux (as an alert stream gives it) or "
                              "apparent magnitudes (turned into difference flux first); unset: the request's "
                              "`photometry`.")

    class ClassifyRequest(BaseModel):
        """A batch of light curves."""

        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"light_curves": [
            {"oid": "ZTF21aaxtctv", "detections": [
                {"mjd": 59340.21, "band": "g", "flux": 35.0, "flux_err": 3.9},
                {"mjd": 59342.25, "band": "r", "flux": 48.1, "flux_err": 4.4},
                {"mjd": 59345.19, "band": "g", "mag": 19.35, "mag_err": 0.09}]}]}]})

        light_curves: list[LightCurve] = Field(..., min_length=1, max_length=max_curves,
                                               description=f"1 to {max_curves} light curves, distinct oids.")
        photometry: Literal["auto", "difference", "apparent"] | None = Field(
            None, description="What the curves' brightness is where a curve does not say: difference, apparent, or "
                              "auto (recognised per curve: apparent only for a long, steady, high-S/N curve); unset: "
                              "the server's classify.photometry.")

    return LightCurve, ClassifyRequest


class ModelRef(BaseModel):
    name: str = Field(..., description="Registered model name (or the local model directory's name).")
    version: str = Field(..., description="Registry version that produced the probabilities ('local' for a path).")
    uri: str = Field(..., description="Pinned model URI (models:/name/version).")


class Classification(BaseModel):
    oid: str
    predicted_class: str = Field(..., description="The class of highest probability.")
    probabilities: dict[str, float] = Field(..., description="Probability per class (QSO, CEP, SNIa, SNII); sums "
                                                              "to 1 over the model's classes.")
    n_det: int = Field(..., description="Detections classified: those received less the ones dropped (`n_dropped`) "
                                        "and, for an apparent curve, less those not 5 sigma from its reference.")
    n_dropped: int = Field(0, description="Detections of the object dropped before classification: a repeated "
                                          "(mjd, band) point (the first given is kept) or an implausible brightness "
                                          "(brighter than magnitude 5, a sentinel such as 99); see `points_dropped`.")
    days_since_first_detection: float = Field(..., description="Last minus first detection of the classified window.")
    photometry: Literal["difference", "apparent"] = Field(
        ..., description="The path the curve took: difference flux as given, or apparent magnitudes turned into "
                         "difference flux (median reference per band, points 5 sigma from it).")
    photometry_declared: bool = Field(..., description="True when the request said so, false when recognised.")


class Rejected(BaseModel):
    oid: str
    reason: str = Field(..., description="Why the object could not be classified (e.g. no usable detections, or a "
                                         "steady apparent curve with no point 5 sigma from its reference).")
    detail: str = ""


class ClassifyResponse(BaseModel):
    model: ModelRef
    classifications: list[Classification]
    rejected: list[Rejected] = Field(..., description="Objects valid as JSON that could not be classified.")
    points_dropped: dict[str, int] = Field(
        default_factory=dict, description="Detections dropped from the objects before classification, counted by "
                                          "reason as `deeprubin classify` counts them in a file: `duplicate key "
                                          "('oid', 'mjd', 'band')` for a repeated (mjd, band) point of one object, "
                                          "the brightness reasons for implausible points. Objects rejected whole are "
                                          "in `rejected`.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model_loaded: bool
    model_version: str | None = None
    last_reload_error: str | None = None


class ModelInfo(BaseModel):
    name: str
    version: str
    uri: str = Field(..., description="Pinned URI of the serving version.")
    source_uri: str = Field(..., description="What the service follows (classify.model_uri), e.g. an alias.")
    run_id: str | None = None
    classes: list[str]
    loaded_at: str = Field(..., description="When this version was loaded (UTC, ISO 8601).")
    last_checked_at: str | None = Field(None, description="Last look at the registry alias (UTC).")
    reload_interval_s: float
    follows_alias: bool = Field(..., description="Whether a moved alias is picked up without a restart.")
    last_reload_error: str | None = Field(None, description="The last failed reload (the old model kept serving).")


class ErrorItem(BaseModel):
    field: str = Field(..., description="Dotted path of the offending field, e.g. light_curves.3.detections.7.band")
    msg: str
    type: str
    oid: str | None = Field(None, description="The light curve the field belongs to, when known.")
    loc: list[str | int]


class ValidationErrorResponse(BaseModel):
    message: str = Field(..., description="One line per problem: field path, what is wrong, which oid.")
    errors: list[ErrorItem]
    n_errors: int


class Problem(BaseModel):
    """Every error reply other than a 422 (404, 405, 408, 413, 500, 503, ...): one ``message`` saying what went
    wrong; a 422 (:class:`ValidationErrorResponse`) has the same ``message`` and adds the errors one by one."""

    message: str = Field(..., description="What went wrong, in one line.")


# --- error replies: one shape ---------------------------------------------------------------------------------------

def http_error_response(exc: Any, method: str, path: str, endpoints: str = "") -> Response:
    """A Starlette ``HTTPException`` (404 no such route, 405 wrong method, ...) as a :class:`Problem` reply, the
    shape every other error has, rather than Starlette's ``{"detail": ...}``; its headers (``Allow`` for a 405) are
    kept. ``endpoints`` (the service's routes, in a line) is named in a 404."""
    status, headers = int(exc.status_code), getattr(exc, "headers", None)
    if status in (204, 304):  # no body allowed
        return Response(status_code=status, headers=headers)
    method = shown(method, 20)  # a method is any token the client sends
    where = f"{method} {shown(path)}"
    detail = exc.detail if isinstance(exc.detail, str) else None
    if status == 404:
        message = f"not found: {where}" + (f"; the endpoints are {endpoints}" if endpoints else "")
    elif status == 405:
        allowed = (headers or {}).get("Allow") or (headers or {}).get("allow")
        message = f"method {method} not allowed on {shown(path)}" + (f"; allowed: {allowed}" if allowed else "")
    else:
        message = f"{shown(detail or 'error', MSG_CHARS)} ({where})"
    return JSONResponse(status_code=status, content={"message": message}, headers=headers)


# --- validation errors that name the field and the object ---------------------------------------------------------

def shown(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` as it may be echoed in a reply: lone surrogates escaped (``\\ud800``; they cannot be encoded), and
    cut to ``limit`` characters with an ellipsis and the full length."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _oid_at(body: Any, loc: list) -> str | None:
    """The oid of the light curve that ``loc`` (light_curves, i, ...) points into, when the body has one (as it
    may be echoed: :func:`shown`)."""
    if len(loc) >= 2 and loc[0] == "light_curves" and isinstance(loc[1], int) and isinstance(body, dict):
        curves = body.get("light_curves")
        if isinstance(curves, list) and 0 <= loc[1] < len(curves) and isinstance(curves[loc[1]], dict):
            oid = curves[loc[1]].get("oid")
            return shown(oid) if isinstance(oid, str) else None
    return None


def validation_error_response(exc: RequestValidationError, content_type: str | None = None) -> JSONResponse:
    """422 with ``message`` (one line per problem: field path, what is wrong, which oid) and ``errors``; the input
    values are not echoed back (one of them may be the whole request), and the oids and keys that are (the field
    path, the light curve) are cut to ``ECHO_CHARS`` characters, lone surrogates escaped."""
    errors = exc.errors()
    items, lines = [], []
    for e in errors[:MAX_ERRORS_SHOWN]:
        raw_loc = list(e.get("loc", ()))
        loc = [p if isinstance(p, int) else shown(str(p)) for p in raw_loc]  # a key may be long, or not Unicode
        path = loc[1:] if loc and loc[0] == "body" else loc
        msg, kind = str(e.get("msg", "invalid")), str(e.get("type", ""))
        if kind == "json_invalid":  # loc is (body, character offset)
            path, msg = [], f"{msg} at character {loc[-1]}: {(e.get('ctx') or {}).get('error', '')}".rstrip(": ")
        elif kind == "string_unicode":  # a key (or a string) with a lone surrogate: "\\ud800" unpaired
            msg = ("not valid Unicode: a key or a string in it holds a lone surrogate (a \\ud800-\\udfff escape "
                   "that is not half of a pair)")
        msg = shown(msg, MSG_CHARS)
        field = ".".join(str(p) for p in path) or "body"
        oid = _oid_at(getattr(exc, "body", None), raw_loc[1:] if raw_loc and raw_loc[0] == "body" else raw_loc)
        items.append({"field": field, "msg": msg, "type": kind, "oid": oid, "loc": loc})
        lines.append(f"{field}: {msg}" + (f" (light curve {oid!r})" if oid else ""))
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"... and {len(errors) - MAX_ERRORS_SHOWN} more")
    hint = ""
    if content_type is not None and "json" not in content_type.lower():
        hint = (" (the body must be JSON sent as Content-Type: application/json, not "
                f"{shown(content_type) or 'none'!r})")
    return JSONResponse(status_code=422, content=jsonable_encoder(
        {"message": "invalid request" + hint + ": " + "; ".join(lines), "errors": items, "n_errors": len(errors)}))
