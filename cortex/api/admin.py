"""The admin HTTP API under /admin/v1/.

Who may call it is a strategy given per listener (`Authorize`): on TCP a
bearer admin token (`bearer_token`); on the data dir's Unix socket the
file's mode already let only the owner connect (`data_dir_owner`, see
cortex/admin_socket.py). The CLI runs these same handlers on the ledger
files when no server is running, so its output is the same either way.

    GET  /admin/v1/keys                    list keys
    POST /admin/v1/keys                    create one: {"name", "account"?, limits...}; the key is shown once
    GET  /admin/v1/keys/{id}[?recent=N]    one key, its usage and its N most recent requests (default 20)
    POST /admin/v1/keys/{id}/topup         {"tokens": N}
    POST /admin/v1/keys/{id}/limits        {"balance_tokens", "window_tokens", "window_seconds", "max_concurrency"}
    POST /admin/v1/keys/{id}/revoke
    GET  /admin/v1/accounts                list accounts
    POST /admin/v1/accounts                {"id", limits...}
    GET  /admin/v1/accounts/{id}
    POST /admin/v1/accounts/{id}/topup | /limits
    GET  /admin/v1/usage[?recent=N]        usage of every key; with `recent`, each in full, as GET keys/{id}
    GET  /admin/v1/usage/{key id}          usage of one key (as GET keys/{id})
    POST /admin/v1/fleet/reload            read the model catalogue again (400, old one kept, if invalid)
    GET  /admin/v1/fleet                   per neuron: its models, memory used and free, requests in flight
    POST /admin/v1/fleet/load              {"model", "neuron"?}: load it (where placement says, or there)
    POST /admin/v1/fleet/unload            {"model", "neuron"?}: unload it (everywhere, or there)

Limits are given whole: a field left out or null means no such cap.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from common import asgi
from common import errors
from common.errors import ApiError
from common.openai_schema import parse_json_object
from cortex.budget.ledger import Caps
from cortex.budget.periods import PeriodError, PeriodSpec, parse_period_spec
from cortex.budget.pricing import usd_to_micro
from cortex.budget.service import TOKENS_MAX, WINDOW_HORIZON_MAX_S, BudgetService
from cortex.fleet.catalogue import Catalogue, CatalogueError

PREFIX = "/admin/v1/"
ADMIN_BODY_MAX_BYTES = 64 * 1024
WINDOW_S_MAX = WINDOW_HORIZON_MAX_S  # windows longer than the usage replayed at start-up could not hold
# A window's usage is kept in 64 buckets (pg_schema.WINDOW_BUCKETS); far below a second a bucket is
# shorter than a timestamp's resolution, and no operator means a window that short.
WINDOW_S_MIN = 1.0
CONCURRENCY_MAX = 1_000_000
RECENT_DEFAULT = 20
RECENT_MAX = 10_000
LIMIT_FIELDS = ("balance_tokens", "window_tokens", "window_seconds", "max_concurrency", "period_tokens")
USD_FIELDS = ("balance_usd", "window_usd", "period_usd")
PERIOD_FIELDS = ("period", "period_timezone", "period_anchor_day")
POLICY_FIELDS = ("output_holds",)  # not caps: how the principal's requests hold their output
OUTPUT_HOLDS = ("worst_case", "incremental")


def caps_from(body: dict[str, Any], period_timezone: str = "UTC", also: tuple[str, ...] = ()) -> Caps:
    """Validated caps from API or CLI fields; errors name the field. USD amounts are exact (micro-USD).

    A field that is not a limit (nor one of `also`) is refused: a typo, or another gateway's
    name for a budget, must not create an uncapped key.
    """
    _known_fields(body, (*LIMIT_FIELDS, *USD_FIELDS, *PERIOD_FIELDS, *POLICY_FIELDS, *also))
    values: dict[str, Any] = {}
    for name in LIMIT_FIELDS:
        value = body.get(name)
        if value is None:
            values[name] = None
            continue
        if name == "window_seconds":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not WINDOW_S_MIN <= value <= WINDOW_S_MAX:
                raise errors.invalid_request(
                    f"'{name}' must be a number of seconds from {WINDOW_S_MIN:g} to {WINDOW_S_MAX:g}.", param=name)
            values[name] = float(value)
        else:
            high = CONCURRENCY_MAX if name == "max_concurrency" else TOKENS_MAX
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
                raise errors.invalid_request(f"'{name}' must be an integer from 0 to {high}.", param=name)
            values[name] = value
    for name in USD_FIELDS:
        try:
            values[name] = usd_to_micro(body[name], name) if body.get(name) is not None else None
        except ValueError as exc:
            raise errors.invalid_request(f"{exc}.", param=name) from None
    has_window = values["window_tokens"] is not None or values["window_usd"] is not None
    if has_window != (values["window_seconds"] is not None):
        param = next(n for n in ("window_tokens", "window_usd", "window_seconds") if values[n] is not None)
        raise errors.invalid_request("'window_seconds' goes with 'window_tokens' or 'window_usd' (or both).", param=param)
    output_holds = body.get("output_holds")
    if output_holds is not None and output_holds not in OUTPUT_HOLDS:
        raise errors.invalid_request(f"'output_holds' must be one of {', '.join(OUTPUT_HOLDS)} (or null: inherited).",
                                     param="output_holds")
    return Caps(
        values["balance_tokens"], values["window_tokens"], values["window_seconds"], values["max_concurrency"],
        values["balance_usd"], values["window_usd"], _period(body, values, period_timezone), values["period_tokens"],
        values["period_usd"], output_holds,
    )


def _known_fields(body: dict[str, Any], known: tuple[str, ...]) -> None:
    for name in body:
        if name not in known:
            raise errors.invalid_request(f"Unknown field {name!r}; known: {', '.join(known)}.", param=name)


def _period(body: dict[str, Any], values: dict[str, Any], default_timezone: str) -> PeriodSpec | None:
    kind = body.get("period")
    has_amount = values["period_tokens"] is not None or values["period_usd"] is not None
    if kind is None:
        if has_amount or body.get("period_timezone") is not None or body.get("period_anchor_day") is not None:
            raise errors.invalid_request("'period' (daily, weekly or monthly) goes with 'period_tokens' or 'period_usd'.",
                                         param="period")
        return None
    if not has_amount:
        raise errors.invalid_request("A 'period' needs 'period_tokens' or 'period_usd' (or both).", param="period_tokens")
    zone, anchor = body.get("period_timezone") or default_timezone, body.get("period_anchor_day")
    if not isinstance(kind, str) or not isinstance(zone, str) or (
        anchor is not None and (not isinstance(anchor, int) or isinstance(anchor, bool))
    ):
        raise errors.invalid_request("'period' and 'period_timezone' are strings, 'period_anchor_day' an integer.",
                                     param="period")
    try:
        return parse_period_spec(kind, zone, anchor)
    except PeriodError as exc:
        raise errors.invalid_request(f"{exc}.", param="period") from None


def _recent_limit(request: asgi.Request) -> int:
    raw = request.query.get("recent", str(RECENT_DEFAULT))
    if not (raw.isascii() and raw.isdigit()) or not 0 <= int(raw) <= RECENT_MAX:
        raise errors.invalid_request(f"'recent' must be an integer from 0 to {RECENT_MAX}.", param="recent")
    return int(raw)


def _top_up_amounts(body: dict[str, Any]) -> tuple[int, int]:
    """(tokens, micro-USD) from a top-up body: either or both."""
    _known_fields(body, ("tokens", "usd"))
    tokens, usd = body.get("tokens"), body.get("usd")
    if tokens is None and usd is None:
        raise errors.invalid_request("A top-up needs 'tokens' or 'usd'.", param="tokens")
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or not 0 < tokens <= TOKENS_MAX):
        raise errors.invalid_request(f"'tokens' must be an integer from 1 to {TOKENS_MAX}.", param="tokens")
    micro = 0
    if usd is not None:
        try:
            micro = usd_to_micro(usd, "usd")
        except ValueError as exc:
            raise errors.invalid_request(f"{exc}.", param="usd") from None
        if micro == 0:
            raise errors.invalid_request("'usd' must be more than 0.", param="usd")
    return tokens or 0, micro


# Admits a request or raises the ApiError that refuses it.
Authorize = Callable[[asgi.Request], None]


def bearer_token(token: str) -> Authorize:
    assert token
    expected = token.encode()

    def authorize(request: asgi.Request) -> None:
        auth = request.headers.get("authorization", "")
        scheme, _, presented = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected):
            raise ApiError(401, "Missing or incorrect admin token.", code="invalid_admin_token")

    return authorize


def data_dir_owner(request: asgi.Request) -> None:
    """Admit all: the caller already proved it owns the data dir. It connected to
    the 0600 admin socket in it, or (the offline CLI) opened the ledger itself."""


class AdminApi:
    def __init__(
        self, budget: BudgetService, token: str | None, body_timeout_s: float = 60.0,
        reload_catalogue: Callable[[], Catalogue] | None = None, authorize: Authorize | None = None,
        fleet: Any = None,
    ) -> None:
        assert (token is None) != (authorize is None), "either an admin token or another way to authorize"
        self.budget = budget
        self._reload_catalogue = reload_catalogue
        self._fleet = fleet  # cortex.fleet.lifecycle.Lifecycle: status, load_on, unload_from
        self._authorize = authorize or bearer_token(token or "")
        self.body_timeout_s = body_timeout_s

    async def handle(self, request: asgi.Request) -> None:
        self._authorize(request)
        parts = request.path[len(PREFIX):].strip("/").split("/")
        status, body = await self._route(request, parts)
        await asgi.send_json(request.send, status, body)

    async def _route(self, request: asgi.Request, parts: list[str]) -> tuple[int, Any]:
        method = request.method
        head, rest = parts[0], parts[1:]
        if head == "keys" and not rest:
            if method == "GET":
                return 200, {"data": await self._key_views(await self.budget.key_records())}
            if method == "POST":
                return await self._create_key(await self._body(request))
        elif head == "accounts" and not rest:
            if method == "GET":
                return 200, {"data": await self.budget.usages("account", self.budget.account_ids())}
            if method == "POST":
                body = await self._body(request)
                account_id = body.get("id")
                if not isinstance(account_id, str):
                    raise errors.invalid_request("'id' must be a string.", param="id")
                await self.budget.create_account(account_id, caps_from(body, self.budget.config.period_timezone, ("id",)))
                return 201, await self.budget.usage("account", account_id)
        elif head in ("keys", "accounts") and rest:
            return await self._principal(request, "key" if head == "keys" else "account", rest)
        elif head == "fleet" and rest == ["reload"]:
            if method == "POST":
                return self._reload()
            raise errors.method_not_allowed(method, request.path, ["POST"])
        elif head == "fleet" and self._fleet is not None and not rest:
            if method == "GET":
                return 200, self._fleet.status()
            raise errors.method_not_allowed(method, request.path, ["GET"])
        elif head == "fleet" and self._fleet is not None and rest in (["load"], ["unload"]):
            if method != "POST":
                raise errors.method_not_allowed(method, request.path, ["POST"])
            body = await self._body(request)
            model, neuron = body.get("model"), body.get("neuron")
            if not isinstance(model, str) or not model:
                raise errors.invalid_request("'model' must be a model id.", param="model")
            if neuron is not None and (not isinstance(neuron, str) or not neuron):
                raise errors.invalid_request("'neuron' must be a neuron's URL.", param="neuron")
            act = self._fleet.load_on if rest == ["load"] else self._fleet.unload_from
            return 200, await act(model, neuron.rstrip("/") if neuron else None)
        elif head == "usage" and len(parts) <= 2:
            if method == "GET":
                if rest:
                    return 200, await self._key_detail(rest[0], _recent_limit(request))
                if "recent" in request.query:
                    recent = _recent_limit(request)
                    # A snapshot: keys created while this awaits come next time.
                    ids = [k.id for k in await self.budget.key_records()]
                    return 200, {"data": [await self._key_detail(i, recent) for i in ids]}
                return 200, {"data": await self._key_views(await self.budget.key_records())}
        else:
            raise errors.not_found(request.path)
        raise errors.method_not_allowed(method, request.path, ["GET", "POST"])

    def _reload(self) -> tuple[int, Any]:
        if self._reload_catalogue is None:
            raise errors.not_found("/admin/v1/fleet/reload")
        try:
            fresh = self._reload_catalogue()
        except CatalogueError as exc:
            raise ApiError(
                400, f"The catalogue was not reloaded: {exc}. The one in force stays.",
                code="invalid_catalogue",
            ) from None
        return 200, {"reloaded": True, "models": sorted(fresh.models), "aliases": dict(sorted(fresh.aliases.items()))}

    async def _principal(self, request: asgi.Request, kind: str, rest: list[str]) -> tuple[int, Any]:
        principal_id, action = rest[0], (rest[1] if len(rest) > 1 else None)
        if len(rest) > 2:
            raise errors.not_found(request.path)
        if action is None:
            if request.method != "GET":
                raise errors.method_not_allowed(request.method, request.path, ["GET"])
            if kind == "key":
                return 200, await self._key_detail(principal_id, _recent_limit(request))
            return 200, {**await self.budget.usage("account", principal_id), "spend": await self.budget.spend("account", principal_id)}
        if request.method != "POST":
            raise errors.method_not_allowed(request.method, request.path, ["POST"])
        if action == "topup":
            await self.budget.top_up(kind, principal_id, *_top_up_amounts(await self._body(request)))
        elif action == "limits":
            await self.budget.set_caps(kind, principal_id, caps_from(await self._body(request), self.budget.config.period_timezone))
        elif action == "revoke" and kind == "key":
            await self.budget.revoke(principal_id)
        else:
            raise errors.not_found(request.path)
        if kind == "key":
            return 200, await self._key_detail(principal_id)
        return 200, await self.budget.usage("account", principal_id)

    async def _create_key(self, body: dict[str, Any]) -> tuple[int, Any]:
        name, account = body.get("name"), body.get("account")
        if not isinstance(name, str):
            raise errors.invalid_request("'name' must be a string.", param="name")
        if account is not None and not isinstance(account, str):
            raise errors.invalid_request("'account' must be a string.", param="account")
        record, plaintext = await self.budget.create_key(name, account, caps_from(body, self.budget.config.period_timezone, ("name", "account")))
        return 201, {**(await self._key_views([record]))[0], "key": plaintext}

    async def _key_views(self, records: list[Any]) -> list[dict[str, Any]]:
        usages = await self.budget.usages("key", [r.id for r in records])
        return [{**r.view(), "limits": u["limits"], "usage": u} for r, u in zip(records, usages)]

    async def _key_detail(self, key_id: str, recent: int = RECENT_DEFAULT) -> dict[str, Any]:
        record = await self.budget.key_record(key_id)
        if record is None:
            raise ApiError(404, f"No key {key_id!r}.", code="not_found")
        view = (await self._key_views([record]))[0]
        view["usage"]["spend"] = await self.budget.spend("key", key_id)
        return {
            **view,
            "account_usage": await self.budget.usage("account", record.account_id),
            "recent": await self.budget.recent(key_id, recent),
        }

    async def _body(self, request: asgi.Request) -> dict[str, Any]:
        try:
            return parse_json_object(await request.body(ADMIN_BODY_MAX_BYTES, self.body_timeout_s))
        except asgi.BodyTooLarge as exc:
            raise errors.payload_too_large(exc.limit_bytes) from None
        except asgi.BodyTimeout:
            raise errors.body_timeout(self.body_timeout_s) from None

